"""Issue 9, item 5: bad data. Each kind of damage goes through the real training pipeline
twice: strict (the default) it is an error naming the shard, the byte offset and the reason;
with `data.skip_bad_records=True` the record is replaced, counted in the batch's `skipped`
column (the trainer logs it as data/skipped_records) and named in a warning. CMYK and 16-bit
images are not damage: they decode and nothing is skipped.

The shard is 8 real emoji records (from the embedded data) with record 3 damaged; unit-level
checks of the same errors live in tests/input_pipeline/test_tfrecord.py, test_transforms.py and
test_pipeline.py.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

from input_pipeline import pipeline, records, tfrecord

BAD = 3  # the damaged record of the 8
N = 8
BATCH = 4
SIZE = 16


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png_bomb(side: int = 20000) -> bytes:
    """A complete, valid 1-bit PNG of side x side white pixels: ~50 KB on disk, 400
    megapixels (1.2 GB as RGB) once decoded."""
    row = b"\x00" + b"\xff" * (side // 8)  # filter byte + packed bits
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    idat = zlib.compress(row * side, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + (_png_chunk(b"IEND", b""))
    )


def _truncated_mid_scan(jpeg: bytes) -> bytes:
    """The JPEG cut halfway through its entropy-coded scan (after the SOS marker)."""
    sos = jpeg.index(b"\xff\xda")
    assert sos < len(jpeg) - 100
    return jpeg[: (sos + len(jpeg)) // 2]


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _raw_example(**features) -> bytes:
    ex = tf_example_pb2.Example()
    for key, value in features.items():
        if isinstance(value, int):
            ex.features.feature[key].int64_list.value.append(value)
        else:
            ex.features.feature[key].bytes_list.value.extend(value)
    return ex.SerializeToString()


@pytest.fixture(scope="module")
def emoji(embedded_data) -> dict:
    shards = str(embedded_data / "emoji" / "emoji-train-*.tfrecord")
    src = tfrecord.TFRecordSource(shards)
    return {
        "records": [src[i] for i in range(N)],
        "classnames": str(embedded_data / "emoji" / "emoji-classnames.json"),
        "tokenizer": str(embedded_data / "tokenizer" / "spm.model"),
        "num_classes": len(
            json.loads((embedded_data / "emoji" / "emoji-classnames.json").read_text())
        ),
    }


def _with_image(record: bytes, image: bytes) -> bytes:
    ex = records.decode_example(record)
    return records.encode_example(image=image, texts=ex["texts"], label=ex["label"], id=ex["id"])


def _replace_record(kind: str, record: bytes, num_classes: int) -> bytes:
    """Record BAD for the per-record kinds."""
    ex = records.decode_example(record)
    if kind == "jpeg_truncated_mid_scan":
        return _with_image(record, _truncated_mid_scan(ex["image"]))
    if kind == "zero_byte_image":
        return _raw_example(image=[b""], texts=[b"x"], label=-1, id=[b"z"])
    if kind == "png_bomb_20000x20000":
        return _with_image(record, _png_bomb())
    if kind == "empty_caption":
        return records.encode_example(image=ex["image"], texts=[" "], id=ex["id"])
    if kind == "non_utf8_caption":
        return _raw_example(image=[ex["image"]], texts=[b"caf\xe9"], label=-1, id=[b"u"])
    if kind == "label_out_of_range":
        return records.encode_example(image=ex["image"], texts=ex["texts"], label=num_classes)
    if kind == "missing_label_key":
        return _raw_example(image=[ex["image"]], texts=[b"no label"], id=[b"m"])
    rgb = Image.open(io.BytesIO(ex["image"])).convert("RGB")
    if kind == "cmyk_jpeg":
        return _with_image(record, _encoded(rgb.convert("CMYK"), "JPEG"))
    if kind == "png_16bit":
        grey = (np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16)
        image = Image.fromarray(grey)
        assert image.mode.startswith("I;16")
        return _with_image(record, _encoded(image, "PNG"))
    raise AssertionError(kind)


def _shard(tmp_path: Path, emoji: dict, kind: str, num_classes: int) -> str:
    """Writes the 8-record shard with `kind` of damage; returns its path."""
    payloads = list(emoji["records"])
    if kind in GOOD_KINDS or (kind in RECORD_KINDS and kind != "flipped_byte_crc"):
        payloads[BAD] = _replace_record(kind, payloads[BAD], num_classes)
    path = str(tmp_path / "bad-00000-of-00001.tfrecord")
    with tfrecord.TFRecordWriter(path) as w:
        for p in payloads:
            w.write(p)
    offsets = tfrecord.read_index(path)
    if kind == "flipped_byte_crc":
        with open(path, "r+b") as f:
            f.seek(int(offsets[BAD]) + 12 + 40)  # inside the record's data
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x01]))
    elif kind == "truncated_shard":
        os.truncate(path, os.path.getsize(path) - 7)  # the last record loses its tail
    elif kind == "stale_index":
        with open(path, "ab") as f:  # the shard grew after its index was written
            f.write(tfrecord.frame(emoji["records"][0]))
    return path


def _config(emoji: dict, shards: str, skip: bool):
    cfg = pipeline.default_config()
    cfg.tokenizer = emoji["tokenizer"]
    cfg.image_size, cfg.text_length = SIZE, 12
    cfg.shuffle, cfg.num_threads, cfg.skip_bad_records = False, 1, skip
    cfg.sources.bad = pipeline.source_config(shards, classnames=emoji["classnames"])
    return cfg


def _epoch(cfg) -> list[dict]:
    it = pipeline.make_train_iterator(
        cfg, global_batch_size=BATCH, needs={"image", "tokens", "label"}
    )
    return [next(it) for _ in range(N // BATCH)]


# kind -> the reason the user reads (a regex)
RECORD_KINDS = {
    "flipped_byte_crc": r"data CRC mismatch \(corrupt record\)",
    "jpeg_truncated_mid_scan": r"decode failed: image file is truncated",
    "zero_byte_image": r"image must hold exactly one non-empty encoded image",
    "png_bomb_20000x20000": r"decompression bomb",
    "empty_caption": r"empty caption",
    "non_utf8_caption": r"text is not valid UTF-8",
    "label_out_of_range": r"label {n} out of range \[-1, {n}\)",  # n: number of classes
    "missing_label_key": r"missing key\(s\) \['label'\]",
}
GOOD_KINDS = ("cmyk_jpeg", "png_16bit")


@pytest.mark.parametrize("kind", list(RECORD_KINDS))
def test_bad_record_strict_error_or_counted_skip(emoji, tmp_path, kind, caplog):
    reason = RECORD_KINDS[kind].format(n=emoji["num_classes"])
    path = _shard(tmp_path, emoji, kind, emoji["num_classes"])
    offset = int(tfrecord.read_index(path)[BAD])
    with pytest.raises(pipeline.BadInputError, match=reason) as info:
        _epoch(_config(emoji, path, skip=False))
    assert f"{path} @ byte {offset} (record {BAD} of source 'bad')" in str(info.value)

    with caplog.at_level(logging.WARNING):
        batches = _epoch(_config(emoji, path, skip=True))
    skipped = np.concatenate([b["skipped"] for b in batches])
    assert skipped.tolist() == [int(i == BAD) for i in range(N)]
    warning = f"skipping bad record {path} @ byte {offset}"
    assert any(warning in r.getMessage() for r in caplog.records), caplog.text
    assert any(re.search(reason, r.getMessage()) for r in caplog.records)


@pytest.mark.parametrize("kind", GOOD_KINDS)
def test_cmyk_and_16_bit_images_are_used(emoji, tmp_path, kind):
    path = _shard(tmp_path, emoji, kind, emoji["num_classes"])
    batches = _epoch(_config(emoji, path, skip=False))
    assert all(b["skipped"].sum() == 0 for b in batches)
    image = batches[BAD // BATCH]["image"][BAD % BATCH]
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8 and image.any()


def test_truncated_shard(emoji, tmp_path, caplog):
    path = _shard(tmp_path, emoji, "truncated_shard", emoji["num_classes"])
    with pytest.raises(tfrecord.StaleIndexError, match=rf"{path}.*stale index.*make_shards"):
        _epoch(_config(emoji, path, skip=False))
    with caplog.at_level(logging.WARNING):
        batches = _epoch(_config(emoji, path, skip=True))
    # Re-indexed by a scan; the cut record is replaced and counted, nothing else is lost.
    skipped = np.concatenate([b["skipped"] for b in batches])
    assert skipped.tolist() == [int(i == N - 1) for i in range(N)]
    assert "rebuilding its index" in caplog.text
    assert "truncated shard" in caplog.text


def test_stale_index(emoji, tmp_path, caplog):
    path = _shard(tmp_path, emoji, "stale_index", emoji["num_classes"])
    with pytest.raises(tfrecord.StaleIndexError, match=rf"{path}.*stale index.*make_shards"):
        _epoch(_config(emoji, path, skip=False))
    with caplog.at_level(logging.WARNING):
        batches = _epoch(_config(emoji, path, skip=True))
    assert all(b["skipped"].sum() == 0 for b in batches)  # the shard itself is sound
    assert "rebuilding its index" in caplog.text


def test_shard_set_with_zero_records(emoji, tmp_path):
    path = str(tmp_path / "empty-00000-of-00001.tfrecord")
    with tfrecord.TFRecordWriter(path):
        pass
    for skip in (False, True):
        with pytest.raises(ValueError, match="zero records"):
            _epoch(_config(emoji, path, skip=skip))


def test_glob_that_matches_nothing(emoji, tmp_path):
    pattern = str(tmp_path / "nothing-*.tfrecord")
    for skip in (False, True):
        with pytest.raises(FileNotFoundError, match=r"no shard matches .*make_shards"):
            _epoch(_config(emoji, pattern, skip=skip))
