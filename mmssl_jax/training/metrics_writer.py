"""Metric logs without TensorFlow: a JSONL file and TensorBoard scalar event files.

TensorBoard reads `events.out.tfevents.*`: TFRecord-framed `Event` protos. Scalars need only
three small messages, so they are encoded here by hand (protobuf wire format) instead of
pulling in TensorFlow or tensorboardX:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from collections.abc import Mapping

from input_pipeline.tfrecord import frame


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def encode_scalar_event(tag_values: Mapping[str, float], step: int, wall_time: float) -> bytes:
    """One Event proto holding a Summary of scalar values."""
    summary = b"".join(
        _length_delimited(
            1,
            _length_delimited(1, tag.encode("utf-8"))
            + _field(2, 5)
            + struct.pack("<f", float(value)),
        )
        for tag, value in tag_values.items()
    )
    return (
        _field(1, 1)
        + struct.pack("<d", wall_time)
        + _field(2, 0)
        + _varint(int(step))
        + _length_delimited(5, summary)
    )


def encode_version_event(wall_time: float) -> bytes:
    return _field(1, 1) + struct.pack("<d", wall_time) + _length_delimited(3, b"brain.Event:2")


class MetricWriter:
    """Appends metrics to `workdir/metrics.jsonl` and a TensorBoard event file.

    Only process 0 should construct one (multi-host runs write one log).
    """

    def __init__(self, workdir: str, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self._jsonl = open(self.jsonl_path, "a")
        self._events = None
        if tensorboard:
            tb_dir = os.path.join(workdir, "tensorboard")
            os.makedirs(tb_dir, exist_ok=True)
            now = time.time()
            name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
            self._events = open(os.path.join(tb_dir, name), "ab")
            self._events.write(frame(encode_version_event(now)))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(
            json.dumps({"step": int(step), **{k: _json_safe(v) for k, v in clean.items()}}) + "\n"
        )
        self._jsonl.flush()
        if self._events is not None:
            self._events.write(frame(encode_scalar_event(clean, step, time.time())))
            self._events.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._events is not None:
            self._events.close()


def _json_safe(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def read_metrics(workdir: str) -> list[dict]:
    """All rows of workdir/metrics.jsonl (for plots and tests)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
