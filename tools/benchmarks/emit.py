"""How every benchmark ends: its result as JSON on stdout and, with --out, in a file."""

from __future__ import annotations

import json
from typing import Any


def emit(result: dict[str, Any], out: str | None, *, show: bool = True) -> dict[str, Any]:
    """Prints `result` as indented JSON (unless `show` is False) and writes it to `out`."""
    text = json.dumps(result, indent=2)
    if show:
        print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return result
