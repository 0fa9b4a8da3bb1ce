"""Sentencepiece tokenizer: train a model, load it, encode captions to fixed-length int32.

Id convention (INTERFACES.md): pad=0, unk=1, bos=2, eos=3. Every encoded row is
`ids + [EOS]`, right-padded with 0; a caption longer than `length - 1` tokens is truncated so
that EOS always sits at `length - 1`. The text tower therefore pools at
`(tokens != 0).sum(-1) - 1`. No BOS is added (the pooled EOS already sees the whole caption
through causal attention; CLIP's SOT carries no information).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from input_pipeline.tokenizers.base import RowDecoder, read_source

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

# Fixed seed for sentencepiece's global RNG (sentence sampling/shuffling); with one thread
# the same corpus gives the same model bytes.
_SEED = 0


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    *,
    input_sentence_size: int = 0,
) -> str:
    """Trains a sentencepiece model on `texts` and writes `<model_prefix>.model`.

    Normalisation is NFKC plus case folding (`nmt_nfkc_cf`), i.e. lowercased like CLIP's
    tokenizer. `vocab_size` is a soft limit (`hard_vocab_limit=False`) so a small corpus
    still trains. Training is single-threaded with a fixed seed: the same texts give the
    same model bytes. `input_sentence_size > 0` samples that many sentences (deterministic
    under the fixed seed). Returns the path of the .model file.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    # Sentencepiece treats newlines as sentence separators; keep one caption per sentence.
    lines = [" ".join(t.split()) for t in texts]
    lines = [t for t in lines if t]
    if not lines:
        raise ValueError("train_sentencepiece: no non-empty text to train on")
    spm.set_random_generator_seed(_SEED)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc_cf",
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        hard_vocab_limit=False,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=1,
        minloglevel=2,
    )
    path = model_prefix + ".model"
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


class Tokenizer(RowDecoder):
    """A loaded sentencepiece model that encodes captions to fixed-length int32 arrays.

    Build it from a file (`Tokenizer(path)`) or from the serialized model bytes
    (`Tokenizer.from_bytes(proto)`, e.g. read back from an export). Picklable (the model
    travels as its bytes), so grain worker processes can receive it.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, *, model_proto=None):
        data, where = read_source(model_path, model_proto, "sentencepiece model", "Tokenizer")
        self._path = None if model_path is None else os.fspath(model_path)
        self._load(data, where)

    @classmethod
    def from_bytes(cls, model_proto: bytes) -> Tokenizer:
        """Loads a tokenizer from serialized model bytes (see `.model_proto`)."""
        return cls(model_proto=model_proto)

    def _load(self, proto: bytes, where: str) -> None:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on bad bytes.
            raise ValueError(f"corrupt sentencepiece model {where}: {e}") from e
        if sp.get_piece_size() == 0:
            raise ValueError(f"corrupt sentencepiece model {where}: empty vocabulary")
        if sp.pad_id() != PAD_ID or sp.eos_id() < 0:
            raise ValueError(
                f"sentencepiece model {where} has pad_id={sp.pad_id()}, eos_id={sp.eos_id()}; "
                f"expected pad_id={PAD_ID} and an EOS (train with train_sentencepiece)"
            )
        self._proto = proto
        self._sp = sp

    def __getstate__(self) -> dict:
        return {"proto": self._proto, "path": self._path}

    def __setstate__(self, state: dict) -> None:
        self._path = state["path"]
        self._load(state["proto"], self._path or "<pickled model>")

    @property
    def model_proto(self) -> bytes:
        """The serialized model, to store inside an export."""
        return self._proto

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    def encode(self, texts: Sequence[str], length: int) -> np.ndarray:
        """Encodes captions to int32 [B, length]: ids + EOS, right-padded with 0."""
        if isinstance(texts, str):
            raise TypeError("Tokenizer.encode takes a sequence of strings, not one string")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        texts = list(texts)
        out = np.zeros((len(texts), length), np.int32)
        if not texts:
            return out
        eos = self.eos_id
        for row, ids in zip(out, self._sp.encode(texts, out_type=int), strict=True):
            ids = ids[: length - 1]
            row[: len(ids)] = ids
            row[len(ids)] = eos
        return out

    def _decode_row(self, row: np.ndarray) -> str:
        ids = []
        for i in row.tolist():
            if i in (self.eos_id, self.pad_id):
                break
            ids.append(i)
        return self._sp.decode(ids)
