"""TFRecord framing against the published spec, the .idx sidecar, and the record schema."""

import os
import pickle  # noqa: S403 - only to prove the source survives grain's worker pickling
import struct

import numpy as np
import pytest

from input_pipeline import records, tfrecord


def _crc32c_reference(data: bytes) -> int:
    """Bitwise CRC-32C (Castagnoli, reflected poly 0x82F63B78), written from the definition."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_crc32c_check_value():
    # The standard check value of CRC-32C (RFC 3720 / iSCSI).
    assert tfrecord.crc32c(b"123456789") == 0xE3069283 == _crc32c_reference(b"123456789")


def test_framing_matches_hand_made_bytes():
    payload = b"hello tfrecord"
    length = struct.pack("<Q", len(payload))
    expected = (
        length
        + struct.pack("<I", _masked(_crc32c_reference(length)))
        + payload
        + struct.pack("<I", _masked(_crc32c_reference(payload)))
    )
    assert tfrecord.frame(payload) == expected
    # The empty record: 8 zero length bytes, their masked CRC, no data, masked CRC of b"".
    assert tfrecord.frame(b"")[:8] == b"\0" * 8
    assert struct.unpack("<I", tfrecord.frame(b"")[-4:])[0] == _masked(0)


def _write(path, payloads):
    with tfrecord.TFRecordWriter(str(path)) as w:
        for p in payloads:
            w.write(p)
    return str(path)


def test_round_trip_index_and_random_access(tmp_path):
    rng = np.random.default_rng(0)
    payloads = [rng.bytes(int(n)) for n in rng.integers(0, 5000, size=50)]
    a = _write(tmp_path / "s-00000-of-00002.tfrecord", payloads[:20])
    _write(tmp_path / "s-00001-of-00002.tfrecord", payloads[20:])
    src = tfrecord.TFRecordSource(str(tmp_path / "s-*.tfrecord"))
    assert len(src) == 50
    for i in rng.permutation(50):
        assert src[int(i)] == payloads[i]
    # The hand-written reader over the whole file agrees with the index.
    assert [d for _, _, d in tfrecord.iter_frames(a)] == payloads[:20]
    # Rebuilding the index by scanning gives identical bytes.
    before = open(a + ".idx").read()
    os.remove(a + ".idx")
    assert tfrecord.write_index(a) == 20
    assert open(a + ".idx").read() == before
    # Picklable for grain workers; reads still work after unpickling.
    clone = pickle.loads(pickle.dumps(src))  # noqa: S301
    assert clone[49] == payloads[49]
    assert src.locate(20) == (str(tmp_path / "s-00001-of-00002.tfrecord"), 0)


def test_flipped_byte_is_a_crc_error_naming_file_and_offset(tmp_path):
    path = _write(tmp_path / "x.tfrecord", [b"a" * 100, b"b" * 100])
    data = bytearray(open(path, "rb").read())
    second = 16 + 100
    data[second + 12 + 50] ^= 0xFF
    open(path, "wb").write(bytes(data))
    src = tfrecord.TFRecordSource(path)
    assert src[0] == b"a" * 100
    with pytest.raises(tfrecord.RecordError, match=rf"x.tfrecord @ byte {second}.*CRC"):
        src[1]


def test_truncated_shard_and_stale_index(tmp_path):
    path = _write(tmp_path / "t.tfrecord", [b"a" * 100, b"b" * 100])
    with open(path, "r+b") as f:
        f.truncate(150)
    with pytest.raises(tfrecord.StaleIndexError, match="stale index"):
        tfrecord.TFRecordSource(path)
    with pytest.raises(tfrecord.RecordError, match="truncated shard"):
        tfrecord.write_index(path)


def test_missing_index_and_empty_glob(tmp_path):
    path = _write(tmp_path / "m.tfrecord", [b"x"])
    os.remove(path + ".idx")
    with pytest.raises(FileNotFoundError, match="make_shards.py index"):
        tfrecord.TFRecordSource(path)
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        tfrecord.TFRecordSource(str(tmp_path / "nothing-*.tfrecord"))
    empty = _write(tmp_path / "e.tfrecord", [])
    with pytest.raises(ValueError, match="zero records"):
        tfrecord.TFRecordSource(empty)


def test_scan_missing_index_reads_shards_without_idx(tmp_path):
    """Shards written elsewhere (a tfds data dir) are indexed in memory, nothing written."""
    rng = np.random.default_rng(1)
    payloads = [rng.bytes(int(n)) for n in rng.integers(0, 3000, size=30)]
    path = _write(tmp_path / "foreign.tfrecord", payloads)
    offsets = tfrecord.read_index(path)
    os.remove(path + ".idx")
    np.testing.assert_array_equal(tfrecord.scan_offsets(path), offsets)
    src = tfrecord.TFRecordSource(path, scan_missing_index=True)
    assert [src[i] for i in range(30)] == payloads
    assert os.listdir(tmp_path) == ["foreign.tfrecord"]
    with open(path, "r+b") as f:  # a cut-short last record is an error naming the offset
        f.truncate(os.path.getsize(path) - 1)
    with pytest.raises(tfrecord.RecordError, match=rf"@ byte {offsets[-1]}: truncated"):
        tfrecord.scan_offsets(path)


# A script as the training tools are: JAX imported (with it, __main__'s globals outlive the
# globals of input_pipeline.tfrecord at interpreter exit), sources held in several ways.
_HOLD_AT_EXIT = """
import sys
sys.path.insert(0, sys.argv[1])
import jax
from input_pipeline import tfrecord
sources = [tfrecord.TFRecordSource(sys.argv[2]) for _ in range(3)]
assert all(s[0] == b"x" for s in sources)  # every source has an open descriptor
held = sources[0]  # a __main__ global
jax.held_source = sources[1]  # a module attribute
cycle = [sources[2]]
cycle.append(cycle)  # freed by the last garbage collection
del sources, cycle
"""


def test_source_held_at_exit_prints_nothing(tmp_path):
    """A script holding sources at exit used to print `Exception ignored in:
    TFRecordSource.__del__ ... 'NoneType' object has no attribute 'suppress'`."""
    import subprocess
    import sys

    path = _write(tmp_path / "held.tfrecord", [b"x"])
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-c", _HOLD_AT_EXIT, root, path], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_descriptors_closed_when_source_is_collected(tmp_path):
    import gc

    path = _write(tmp_path / "c.tfrecord", [b"x"])
    src = tfrecord.TFRecordSource(path)
    assert src[0] == b"x"
    fd = src._fds[0]
    clone = pickle.loads(pickle.dumps(src))  # noqa: S301 - a clone opens its own descriptor
    assert clone[0] == b"x" and clone._fds[0] != fd
    del src
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)
    assert clone[0] == b"x"


def test_aborted_writer_leaves_no_shard(tmp_path):
    path = tmp_path / "a.tfrecord"
    with pytest.raises(RuntimeError), tfrecord.TFRecordWriter(str(path)) as w:
        w.write(b"x")
        raise RuntimeError("crash")
    assert not path.exists() and not (tmp_path / "a.tfrecord.tmp").exists()


def test_example_round_trip():
    data = records.encode_example(
        image=b"\x89PNG...", texts=["a cat", "ünïcode"], label=3, topics=[0.25, 0.75], id="s1"
    )
    out = records.decode_example(data)
    assert out["image"] == b"\x89PNG..."
    assert out["texts"] == ["a cat", "ünïcode"]
    assert out["label"] == 3 and out["id"] == "s1"
    np.testing.assert_allclose(out["topics"], [0.25, 0.75])
    plain = records.decode_example(records.encode_example(image=b"x"))
    assert plain["texts"] == [] and plain["label"] == -1 and plain["topics"] is None


def test_bad_records_name_where():
    from tensorflow_datasets.proto import tf_example_pb2

    ex = tf_example_pb2.Example()
    ex.features.feature["image"].bytes_list.value.append(b"x")
    with pytest.raises(records.BadRecordError, match=r"f.tfrecord#3: missing key"):
        records.decode_example(ex.SerializeToString(), where="f.tfrecord#3")
    bad_text = tf_example_pb2.Example.FromString(records.encode_example(image=b"x"))
    bad_text.features.feature["texts"].bytes_list.value.append(b"\xff\xfe")
    with pytest.raises(records.BadRecordError, match="UTF-8"):
        records.decode_example(bad_text.SerializeToString())
    with pytest.raises(records.BadRecordError, match="out of range"):
        records.decode_example(records.encode_example(image=b"x", label=10), num_classes=10)
    with pytest.raises(records.BadRecordError, match="non-empty"):
        records.decode_example(records.encode_example(image=b""))
    with pytest.raises(records.BadRecordError, match="not a tf.train.Example"):
        records.decode_example(b"\xff\xff\xff")
