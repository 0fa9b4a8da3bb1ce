"""Tokenizers behind one interface: `encode(texts, length) -> int32 [B, length]`, `decode`,
`vocab_size`, `pad_id`. Sentencepiece (trained here), CLIP's byte-level BPE (converted CLIP,
open_clip and SLIP weights) and WordPiece (pretrained BERT-family towers, `tokenizer.json`).
"""

from __future__ import annotations

import os
from typing import Any

from input_pipeline.tokenizers.clip_bpe import ClipBpeTokenizer
from input_pipeline.tokenizers.spm import Tokenizer, train_sentencepiece
from input_pipeline.tokenizers.wordpiece import WordPieceTokenizer

KINDS = ("sentencepiece", "clip_bpe", "wordpiece")

# Tokenizers shipped with the package, by name: CLIP's BPE merges (49,408 ids, as OpenAI's CLIP
# and open_clip ship them; MIT licence in LICENSE.bpe_simple_vocab_16e6.txt).
PACKAGED = {"clip_bpe": os.path.join(os.path.dirname(__file__), "bpe_simple_vocab_16e6.txt.gz")}


def resolve(path_or_name: str | os.PathLike) -> str:
    """A packaged tokenizer's file for its name (see PACKAGED), else the path as given."""
    return PACKAGED.get(os.fspath(path_or_name), os.fspath(path_or_name))


def kind_of_path(path: str | os.PathLike) -> str:
    """The tokenizer kind a file holds, by its name: `*.json` WordPiece (a Hugging Face
    tokenizer.json), `*.txt[.gz]` CLIP's BPE merges, anything else a sentencepiece model."""
    name = os.fspath(path)
    if name.endswith(".json"):
        return "wordpiece"
    if name.endswith((".txt", ".txt.gz")):
        return "clip_bpe"
    return "sentencepiece"


def open_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer stored at `path` or packaged under that name (kind by `kind_of_path`)."""
    path = resolve(path)
    kind = kind_of_path(path)
    if kind == "wordpiece":
        return WordPieceTokenizer(path)
    if kind == "clip_bpe":
        return ClipBpeTokenizer(path)
    return Tokenizer(path)


def kind_of(tokenizer: Any) -> str:
    """ "sentencepiece" | "clip_bpe" | "wordpiece" of an opened tokenizer."""
    if isinstance(tokenizer, WordPieceTokenizer):
        return "wordpiece"
    if isinstance(tokenizer, ClipBpeTokenizer):
        return "clip_bpe"
    return "sentencepiece"


def to_bytes(tokenizer: Any) -> bytes:
    """The bytes an export stores for `tokenizer` (model proto, merges or tokenizer.json)."""
    kind = kind_of(tokenizer)
    if kind == "wordpiece":
        return tokenizer.data
    if kind == "clip_bpe":
        return tokenizer.merges_data
    return tokenizer.model_proto


def from_bytes(kind: str, data: bytes) -> Any:
    """Inverse of `to_bytes` for a tokenizer of `kind`."""
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; valid: {KINDS}")
    cls = {
        "sentencepiece": Tokenizer,
        "clip_bpe": ClipBpeTokenizer,
        "wordpiece": WordPieceTokenizer,
    }
    return cls[kind].from_bytes(data)


__all__ = [
    "ClipBpeTokenizer",
    "KINDS",
    "PACKAGED",
    "Tokenizer",
    "WordPieceTokenizer",
    "from_bytes",
    "kind_of",
    "kind_of_path",
    "open_tokenizer",
    "resolve",
    "to_bytes",
    "train_sentencepiece",
]
