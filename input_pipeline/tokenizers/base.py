"""What the tokenizers share: reading their one file (a path or its bytes) and decoding
rows of ids."""

from __future__ import annotations

import os

import numpy as np


def read_source(
    path: str | os.PathLike | None, data: bytes | None, what: str, owner: str
) -> tuple[bytes, str]:
    """(bytes, where) of a tokenizer file given as exactly one of a path or its bytes; a
    missing file is a FileNotFoundError naming it (`what`: e.g. "tokenizer.json")."""
    if (path is None) == (data is None):
        raise ValueError(f"{owner}: give exactly one of a path or the {what} bytes")
    if data is not None:
        return bytes(data), f"<{what} bytes>"
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise FileNotFoundError(f"{what} not found: {where}")
    with open(where, "rb") as f:
        return f.read(), where


class RowDecoder:
    """`decode(ids)`: one row [L] to a string, rows [B, L] to a list, through the
    subclass's `_decode_row`."""

    def _decode_row(self, row: np.ndarray) -> str:
        raise NotImplementedError

    def decode(self, ids) -> str | list[str]:
        """Decodes one row [L] to a string, or rows [B, L] to a list (see `_decode_row` for
        where a row ends)."""
        arr = np.asarray(ids)
        if arr.ndim == 1:
            return self._decode_row(arr)
        if arr.ndim == 2:
            return [self._decode_row(r) for r in arr]
        raise ValueError(f"decode expects ids of rank 1 or 2, got shape {arr.shape}")
