"""CLIP's byte-level BPE tokenizer, for the text towers of converted OpenAI CLIP / open_clip /
SLIP weights (mmssl_jax/export/convert_torch.py). Written from the published algorithm.

Vocabulary (49408 ids): the 256 byte characters, the same 256 with the end-of-word marker
`</w>`, one id per merge of the first 48894 merges of `bpe_simple_vocab_16e6.txt.gz` (the
line after the header is merge 0), then `<start_of_text>` (49406) and `<end_of_text>` (49407).

Encoding a caption: ftfy's `fix_text` (only when the optional `ftfy` package is importable;
it repairs mojibake, so without it such text can tokenize differently from CLIP), HTML
unescape twice, whitespace collapsed, lower-cased; split by CLIP's pre-tokenizer regex
(contractions, runs of letters, single digits, runs of other non-space characters); each piece
is UTF-8 encoded, its bytes mapped to printable characters, and BPE-merged (the lowest-ranked
adjacent pair first, every occurrence left to right, until no pair is a known merge).

Rows are `[SOT] + ids + [EOT]`, right-padded with 0. A caption that does not fit is truncated
as the source codebase of the weights did (`truncate`): "keep_eot" (the default; OpenAI CLIP's
`truncate=True` and open_clip) keeps EOT at `length - 1`; "cut" (SLIP's tokenizer) cuts the
row at `length`, so an over-long caption has no EOT and the tower pools wherever argmax falls
(at SOT, the highest id left). Id 0 is "!", so pad and text cannot be told apart by value: the
text tower pools at `argmax(tokens)` (EOT is the highest id; `pool="argmax"`), never at
`(tokens != 0).sum(-1) - 1`. As in CLIP, a literal "<start_of_text>" / "<end_of_text>" in a
caption becomes the special id.
"""

from __future__ import annotations

import gzip
import html
import os
from collections.abc import Sequence

import numpy as np
import regex

from input_pipeline.tokenizers.base import RowDecoder, read_source

try:  # Optional: CLIP cleans with ftfy; everything else works without it.
    from ftfy import fix_text as _fix_text
except ImportError:  # pragma: no cover - depends on the environment
    _fix_text = None

SOT = "<start_of_text>"
EOT = "<end_of_text>"
NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 merges of its file.
CONTEXT_LENGTH = 77
# How a caption longer than the row is cut: EOT kept at the last position (OpenAI CLIP,
# open_clip) or plain truncation of [SOT] + ids + [EOT] (SLIP).
TRUNCATE_MODES = ("keep_eot", "cut")
END_OF_WORD = "</w>"
PAD_ID = 0
_GZIP_MAGIC = b"\x1f\x8b"
_NOT_A_MERGE = float("inf")
_CACHE_LIMIT = 200_000  # words; the cache is cleared (but for the specials) past this.

# CLIP's pre-tokenizer: special tokens, English contractions, letter runs, single digits,
# runs of anything else that is not whitespace.
_PATTERN = regex.compile(
    rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|\p{{L}}+|\p{{N}}|[^\s\p{{L}}\p{{N}}]+",
    regex.IGNORECASE,
)


def byte_to_unicode() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the others (controls, space, soft hyphen, ...)
    to chr(256), chr(257), ... in byte order. The dict's order (printable bytes first) is the
    order of the first 256 vocabulary ids.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """CLIP's caption cleaning: ftfy (if installed), HTML unescape x2, whitespace, lower."""
    if _fix_text is not None:
        text = _fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def parse_merges(data: bytes, where: str = "<bytes>") -> list[tuple[str, str]]:
    """The first NUM_MERGES merge pairs of a (gzipped or plain) CLIP merges file."""
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ValueError(f"{where}: corrupt gzip data: {e}") from e
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text: {e}") from e
    if lines[-1] == "":  # the newline ending the last line
        lines.pop()
    lines = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    if len(lines) < NUM_MERGES:
        raise ValueError(
            f"{where}: {len(lines)} merges, CLIP's BPE needs {NUM_MERGES} "
            "(expected bpe_simple_vocab_16e6.txt.gz)"
        )
    merges = []
    for i, line in enumerate(lines):
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(f"{where}: line {i + 2} is not a merge pair: {line[:80]!r}")
        merges.append((pair[0], pair[1]))
    return merges


def check_truncate(mode: str) -> str:
    """`mode` if it is one of TRUNCATE_MODES, else a ValueError saying which are."""
    if mode not in TRUNCATE_MODES:
        raise ValueError(
            f"truncate must be one of {TRUNCATE_MODES} (EOT kept at the last position, as "
            f"OpenAI CLIP and open_clip; or plain truncation, as SLIP), got {mode!r}"
        )
    return mode


class ClipBpeTokenizer(RowDecoder):
    """CLIP's tokenizer with `input_pipeline.tokenizer.Tokenizer`'s surface.

    Build it from the merges file (`ClipBpeTokenizer(path)`, gzipped or plain text) or its
    bytes (`ClipBpeTokenizer.from_bytes(data)`, e.g. read back from an export). `truncate`
    is how an over-long caption is cut (`TRUNCATE_MODES`, see the module docstring), so that
    converted weights see the rows their own codebase made.
    """

    def __init__(
        self,
        merges_path: str | os.PathLike | None = None,
        *,
        merges_data: bytes | None = None,
        truncate: str = "keep_eot",
    ):
        self.truncate = check_truncate(truncate)
        data, where = read_source(
            merges_path, merges_data, "CLIP BPE merges file", "ClipBpeTokenizer"
        )
        self._load(data, where)

    @classmethod
    def from_bytes(cls, data: bytes, *, truncate: str = "keep_eot") -> ClipBpeTokenizer:
        """Loads the tokenizer from the merges file's bytes (see `.merges_data`)."""
        return cls(merges_data=data, truncate=truncate)

    def _load(self, data: bytes, where: str) -> None:
        merges = parse_merges(data, where)
        self._data = data
        self._byte_encoder = byte_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        chars = list(self._byte_encoder.values())
        vocab = chars + [c + END_OF_WORD for c in chars] + [a + b for a, b in merges]
        vocab += [SOT, EOT]
        self._decoder = vocab
        self._encoder = {piece: i for i, piece in enumerate(vocab)}
        self._ranks = {pair: i for i, pair in enumerate(merges)}
        self.sot_id, self.eos_id = self._encoder[SOT], self._encoder[EOT]
        self._specials = {SOT: [self.sot_id], EOT: [self.eos_id]}
        self._cache: dict[str, list[int]] = dict(self._specials)

    def __getstate__(self) -> dict:
        return {"data": self._data, "truncate": self.truncate}

    def __setstate__(self, state: dict) -> None:
        self.truncate = check_truncate(state.get("truncate", "keep_eot"))
        self._load(state["data"], "<pickled tokenizer>")

    @property
    def merges_data(self) -> bytes:
        """The merges file as read (to store inside an export)."""
        return self._data

    @property
    def vocab_size(self) -> int:
        return len(self._decoder)

    @property
    def pad_id(self) -> int:
        return PAD_ID

    def _bpe(self, word: str) -> list[str]:
        """BPE of one byte-mapped word: merge the best-ranked adjacent pair until none is."""
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        while len(parts) > 1:
            pairs = list(zip(parts, parts[1:], strict=False))
            pair = min(pairs, key=lambda p: self._ranks.get(p, _NOT_A_MERGE))
            if pair not in self._ranks:
                break
            first, second = pair
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _word_ids(self, piece: str) -> list[int]:
        word = "".join(self._byte_encoder[b] for b in piece.encode("utf-8"))
        ids = self._cache.get(word)
        if ids is None:
            ids = [self._encoder[p] for p in self._bpe(word)]
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache = dict(self._specials)
            self._cache[word] = ids
        return ids

    def encode_ids(self, text: str) -> list[int]:
        """The BPE ids of one caption, without SOT/EOT and without truncation."""
        ids: list[int] = []
        for piece in _PATTERN.findall(clean_text(text)):
            ids.extend(self._word_ids(piece))
        return ids

    def encode(self, texts: Sequence[str], length: int = CONTEXT_LENGTH) -> np.ndarray:
        """Encodes captions to int32 [B, length]: SOT + ids + EOT, right-padded with 0, an
        over-long caption truncated as `self.truncate` says."""
        if isinstance(texts, str):
            raise TypeError("ClipBpeTokenizer.encode takes a sequence of strings, not one string")
        if length < 2:
            raise ValueError(f"length must be >= 2 (SOT and EOT), got {length}")
        texts = list(texts)
        out = np.full((len(texts), length), PAD_ID, np.int32)
        cut = self.truncate == "cut"
        for row, text in zip(out, texts, strict=True):
            if cut:
                ids = [self.sot_id, *self.encode_ids(text), self.eos_id][:length]
            else:
                ids = [self.sot_id, *self.encode_ids(text)][: length - 1] + [self.eos_id]
            row[: len(ids)] = ids
        return out

    def _decode_row(self, row: np.ndarray) -> str:
        ids = row.tolist()
        if ids and ids[0] == self.sot_id:
            ids = ids[1:]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        pieces = []
        for i in ids:
            if not 0 <= i < len(self._decoder):
                raise ValueError(f"token id {i} is outside the vocabulary of {self.vocab_size}")
            pieces.append(self._decoder[i])
        # Special tokens' names and `</w>` are printable ASCII: they decode as themselves.
        data = bytes(self._byte_decoder[c] for c in "".join(pieces))
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()
