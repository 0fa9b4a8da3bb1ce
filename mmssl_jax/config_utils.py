"""Config checks that turn typos and impossible settings into errors a person can act on."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

import ml_collections


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted keys of a nested ConfigDict ('train.batch_size', ...)."""
    keys = []
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, dotted + "."))
    return keys


def override_keys(argv: Sequence[str], flag: str = "config") -> list[str]:
    """Dotted keys of `--config.a.b=v` / `--config.a.b v` overrides in argv."""
    prefix = f"--{flag}."
    return [arg[len(prefix) :].split("=", 1)[0] for arg in argv if arg.startswith(prefix)]


def check_keys(keys: Iterable[str], config: ml_collections.ConfigDict) -> None:
    """Raises KeyError for an unknown key, listing the nearest valid ones."""
    valid = flat_keys(config)
    for key in keys:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(near)}?" if near else ""
            raise KeyError(f"unknown config key {key!r}.{hint}")
