"""TFRecord framing, sidecar offset indexes and a random-access grain source over shards.

A TFRecord file is a sequence of records framed as (the format TensorFlow writes and reads):

    uint64 length (little endian)
    uint32 masked_crc32c(length bytes)
    byte   data[length]
    uint32 masked_crc32c(data)

with masked_crc32c(x) = ((crc >> 15) | (crc << 17)) + 0xA282EAD8 (mod 2**32) over CRC-32C
(Castagnoli). Each shard `X.tfrecord` has a sidecar `X.tfrecord.idx`: one line per record,
"offset length" in bytes. This is the same text layout as NVIDIA DALI's tfrecord2idx, so
indexes made by either tool work with both. The index makes a shard set random-access, which
grain needs for a global shuffle and exact, worker-count-independent resume.
"""

from __future__ import annotations

import glob as globlib
import os
import struct
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence

import google_crc32c
import numpy as np

_HEADER = struct.Struct("<QI")  # length, masked crc of length
_FOOTER = struct.Struct("<I")  # masked crc of data
_MASK_DELTA = 0xA282EAD8
FRAME_OVERHEAD = _HEADER.size + _FOOTER.size  # 16 bytes around every record
INDEX_SUFFIX = ".idx"


class RecordError(ValueError):
    """A record that cannot be read; names the file and byte offset."""

    def __init__(self, path: str, offset: int, reason: str):
        super().__init__(f"{path} @ byte {offset}: {reason}")
        self.path, self.offset, self.reason = path, offset, reason


class StaleIndexError(RecordError):
    """The .idx does not describe the shard beside it (rewritten or truncated shard)."""


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`."""
    return google_crc32c.value(data)


def masked_crc32c(data: bytes) -> int:
    """The masked CRC TFRecord stores (masking keeps CRCs of CRCs well distributed)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(record: bytes) -> bytes:
    """One record with its TFRecord framing."""
    length = struct.pack("<Q", len(record))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + record
        + _FOOTER.pack(masked_crc32c(record))
    )


def index_path(path: str) -> str:
    return path + INDEX_SUFFIX


class TFRecordWriter:
    """Writes framed records and, on close, the sidecar .idx of offsets.

    Writes go to `path.tmp` and are renamed on a clean close, so a crashed writer never leaves
    a shard that looks complete.
    """

    def __init__(self, path: str):
        self.path = path
        self._tmp = path + ".tmp"
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()
        self._offsets: list[tuple[int, int]] = []
        self._pos = 0

    def write(self, record: bytes) -> None:
        framed = frame(record)
        self._file.write(framed)
        self._offsets.append((self._pos, len(framed)))
        self._pos += len(framed)

    def __len__(self) -> int:
        return len(self._offsets)

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        os.replace(self._tmp, self.path)
        _write_index_lines(self.path, self._offsets)

    def abort(self) -> None:
        """Drops a partly written shard."""
        self._file.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _write_index_lines(path: str, offsets: Sequence[tuple[int, int]]) -> None:
    tmp = index_path(path) + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(f"{o} {n}\n" for o, n in offsets)
    os.replace(tmp, index_path(path))


def iter_frames(path: str, verify_crc: bool = True) -> Iterator[tuple[int, int, bytes]]:
    """Scans a shard sequentially, yielding (offset, framed length, record)."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < size:
            framed, data = _read_at(fd, path, offset, size, verify_crc)
            yield offset, framed, data
            offset += framed
    finally:
        os.close(fd)


def _read_length(fd: int, path: str, offset: int, file_size: int, verify_crc: bool) -> int:
    """The data length of the record framed at `offset`, from its header alone."""
    header = os.pread(fd, _HEADER.size, offset)
    if len(header) < _HEADER.size:
        raise RecordError(path, offset, "truncated shard: record header cut short")
    length, length_crc = _HEADER.unpack(header)
    if verify_crc and masked_crc32c(header[:8]) != length_crc:
        raise RecordError(path, offset, "length CRC mismatch (corrupt shard or stale index)")
    if offset + FRAME_OVERHEAD + length > file_size:
        raise RecordError(
            path, offset, f"truncated shard: record of {length} bytes runs past end of file"
        )
    return length


def _read_at(
    fd: int, path: str, offset: int, file_size: int, verify_crc: bool
) -> tuple[int, bytes]:
    """Reads the record framed at `offset`; returns (framed length, record)."""
    length = _read_length(fd, path, offset, file_size, verify_crc)
    body = os.pread(fd, length + _FOOTER.size, offset + _HEADER.size)
    data = body[:length]
    if verify_crc and masked_crc32c(data) != _FOOTER.unpack(body[length:])[0]:
        raise RecordError(path, offset, "data CRC mismatch (corrupt record)")
    return FRAME_OVERHEAD + length, data


def write_index(path: str) -> int:
    """Scans a shard made elsewhere (CRC-checked) and writes its .idx; returns the count."""
    offsets = [(o, n) for o, n, _ in iter_frames(path)]
    _write_index_lines(path, offsets)
    return len(offsets)


def scan_offsets(path: str) -> np.ndarray:
    """Record offsets [n] (int64) of a shard that has no .idx (e.g. one tfds wrote), found by
    following the record headers: 12 bytes read per record, length CRCs checked."""
    size = os.path.getsize(path)
    offsets = []
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < size:
            offsets.append(offset)
            offset += FRAME_OVERHEAD + _read_length(fd, path, offset, size, verify_crc=True)
    finally:
        os.close(fd)
    return np.array(offsets, dtype=np.int64)


def read_index(path: str) -> np.ndarray:
    """Record offsets [n] (int64) of a shard from its .idx, checked against the shard size."""
    idx = index_path(path)
    if not os.path.exists(idx):
        raise FileNotFoundError(
            f"{path}: no index {idx}. Build it with: python tools/make_shards.py index {path}"
        )
    with open(idx) as f:
        text = f.read()
    table = np.array(text.split(), dtype=np.int64).reshape(-1, 2)
    size = os.path.getsize(path)
    covered = int(table[-1].sum()) if len(table) else 0
    if covered != size:
        raise StaleIndexError(
            path,
            covered,
            f"stale index {idx}: it covers {covered} bytes but the shard has {size}. "
            f"Rebuild it: python tools/make_shards.py index {path}",
        )
    return table[:, 0]


def expand_paths(paths_or_glob: str | Sequence[str]) -> list[str]:
    """Sorted shard paths from a glob, a comma-separated list, or a list of globs."""
    patterns = paths_or_glob.split(",") if isinstance(paths_or_glob, str) else list(paths_or_glob)
    paths: list[str] = []
    for pattern in patterns:
        matched = sorted(p for p in globlib.glob(pattern) if not p.endswith(INDEX_SUFFIX))
        if not matched:
            raise FileNotFoundError(
                f"no shard matches {pattern!r}. Make shards with tools/make_shards.py "
                "(see README, 'Data')."
            )
        paths.extend(matched)
    return paths


def _close_fds(fds: dict[int, int], close: Callable[[int], None] = os.close) -> None:
    """Closes a source's file descriptors. Uses only its arguments and builtins, so it also
    works at interpreter exit."""
    for fd in list(fds.values()):
        try:  # noqa: SIM105 - contextlib is a module global
            close(fd)
        except OSError:
            pass
    fds.clear()


class TFRecordSource:
    """Random-access grain data source over TFRecord shards with .idx sidecars.

    `source[i]` returns the raw bytes of global record i (shards in sorted order). Reads use
    os.pread on per-process file descriptors, so the source is thread-safe and picklable for
    grain's worker processes. scan_missing_index: a shard without an .idx is indexed in
    memory by `scan_offsets` (for shards in a directory that is not ours to write to, such as
    a tfds data dir) instead of raising FileNotFoundError.
    """

    def __init__(
        self,
        paths_or_glob: str | Sequence[str],
        verify_crc: bool = True,
        scan_missing_index: bool = False,
    ):
        self.paths = expand_paths(paths_or_glob)
        self.verify_crc = verify_crc
        self._offsets = [
            scan_offsets(p)
            if scan_missing_index and not os.path.exists(index_path(p))
            else read_index(p)
            for p in self.paths
        ]
        self._sizes = [os.path.getsize(p) for p in self.paths]
        counts = np.array([len(o) for o in self._offsets], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        if self._starts[-1] == 0:
            raise ValueError(f"shard set {self.paths} holds zero records")
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[str, int]:
        """(shard path, byte offset) of global record `index`."""
        shard, local = self._shard_of(index)
        return self.paths[shard], int(self._offsets[shard][local])

    def _shard_of(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, index - int(self._starts[shard])

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            with self._lock:
                fd = self._fds.get(shard)
                if fd is None:
                    if getattr(self, "_closer", None) is None:
                        # Not __del__: at interpreter exit that can run after this module's
                        # globals are torn down (None). finalize runs at collection, or at
                        # exit before the teardown, and _close_fds needs no globals.
                        self._closer = weakref.finalize(self, _close_fds, self._fds)
                    fd = os.open(self.paths[shard], os.O_RDONLY)
                    self._fds[shard] = fd
        return fd

    def __getitem__(self, index: int) -> bytes:
        shard, local = self._shard_of(int(index))
        offset = int(self._offsets[shard][local])
        path = self.paths[shard]
        try:
            _, data = _read_at(self._fd(shard), path, offset, self._sizes[shard], self.verify_crc)
        except RecordError as e:
            raise RecordError(path, offset, f"record {local}: {e.reason}") from None
        return data

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"], state["_lock"] = {}, None
        state.pop("_closer", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        # grain stores repr(source) in iterator checkpoints as a compatibility check.
        return f"TFRecordSource(num_shards={len(self.paths)}, num_records={len(self)})"
