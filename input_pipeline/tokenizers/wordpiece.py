"""BERT's WordPiece tokenizer from a Hugging-Face `tokenizer.json`, for pretrained BERT towers.

The `tokenizers` library (Rust) runs the file as it is: its normalizer (BERT's: clean text,
CJK characters split, lowercase and accents stripped for uncased models), pre-tokenizer,
WordPiece model and post-processor ([CLS] ... [SEP]). The file's own padding and truncation
settings are switched off; `encode` applies this project's instead so every batch is exactly
[B, length]: the text is cut to `length - 2` word pieces before [CLS]/[SEP] are added (as the
library's truncation does, so [SEP] always ends a row), then right-padded with the pad id
(0 for BERT's vocabularies: `tokens != 0` is the attention mask).

The surface is `input_pipeline.tokenizer.Tokenizer`'s: `encode`, `decode`, `vocab_size`,
`pad_id`, `eos_id` ([SEP]), `from_bytes`, pickling as the JSON bytes (grain may copy the
tokenizer into worker processes; the Rust object is rebuilt there, never pickled).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import tokenizers

from input_pipeline.tokenizers.base import RowDecoder, read_source


class WordPieceTokenizer(RowDecoder):
    """A WordPiece `tokenizer.json` that encodes captions to fixed-length int32 arrays.

    Build it from the file (`WordPieceTokenizer(path)`) or its bytes
    (`WordPieceTokenizer.from_bytes(data)`, e.g. read back from an export; `.data` gives them).
    """

    def __init__(self, path: str | os.PathLike | None = None, *, data: bytes | None = None):
        data, where = read_source(path, data, "tokenizer.json", "WordPieceTokenizer")
        self._load(data, where)

    @classmethod
    def from_bytes(cls, data: bytes) -> WordPieceTokenizer:
        """Loads the tokenizer from the bytes of a `tokenizer.json` (see `.data`)."""
        return cls(data=data)

    def _load(self, data: bytes, where: str) -> None:
        try:
            spec = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: not a tokenizer.json (invalid JSON: {e})") from e
        model_type = (spec.get("model") or {}).get("type") if isinstance(spec, dict) else None
        if model_type != "WordPiece":
            raise ValueError(f"{where}: model.type is {model_type!r}, expected 'WordPiece'")
        try:
            tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the Rust parser raises a plain Exception
            raise ValueError(f"{where}: the tokenizers library cannot read it: {e}") from e
        tok.no_truncation()
        tok.no_padding()
        padding = spec.get("padding") or {}
        pad_id = padding.get("pad_id")
        if pad_id is None:
            pad_id = tok.token_to_id("[PAD]")
        sep_id = tok.token_to_id("[SEP]")
        if pad_id is None or sep_id is None:
            raise ValueError(f"{where}: no [PAD] / [SEP] token (not a BERT WordPiece vocabulary)")
        self._specials = max(tok.num_special_tokens_to_add(False), 0)
        self._data = data
        self._tok = tok
        self._pad_id = int(pad_id)
        self._sep_id = int(sep_id)
        cls_id = tok.token_to_id("[CLS]")
        self._cls_id = None if cls_id is None else int(cls_id)

    def __getstate__(self) -> dict:
        return {"data": self._data}

    def __setstate__(self, state: dict) -> None:
        self._load(state["data"], "<pickled tokenizer>")

    @property
    def data(self) -> bytes:
        """The `tokenizer.json` bytes as read (to store inside an export)."""
        return self._data

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def eos_id(self) -> int:
        """[SEP], the last token of every row."""
        return self._sep_id

    @property
    def cls_id(self) -> int | None:
        """[CLS], the first token of every row (None if the vocabulary has none)."""
        return self._cls_id

    def encode(self, texts: Sequence[str], length: int) -> np.ndarray:
        """Encodes captions to int32 [B, length]: [CLS] pieces [SEP], right-padded with pad_id.

        Captions longer than `length - 2` pieces keep their first pieces; [SEP] stays last.
        """
        if isinstance(texts, str):
            raise TypeError("WordPieceTokenizer.encode takes a sequence of strings, not one")
        if length < self._specials:
            raise ValueError(f"length must be >= {self._specials} (the special tokens)")
        texts = list(texts)
        out = np.full((len(texts), length), self._pad_id, np.int32)
        if not texts:
            return out
        budget = length - self._specials
        for row, enc in zip(
            out, self._tok.encode_batch(texts, add_special_tokens=False), strict=True
        ):
            if len(enc.ids) > budget:
                enc.truncate(budget)
            ids = self._tok.post_process(enc).ids
            row[: len(ids)] = ids
        return out

    def _decode_row(self, row: np.ndarray) -> str:
        ids = row.tolist()
        if self._pad_id in ids:
            ids = ids[: ids.index(self._pad_id)]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary of {self.vocab_size}")
        return self._tok.decode(ids, skip_special_tokens=True)
