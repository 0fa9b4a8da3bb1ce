"""The record schema: tf.train.Example encode/decode without TensorFlow.

| key    | type       | meaning                                                 |
|--------|------------|---------------------------------------------------------|
| image  | bytes      | encoded JPEG or PNG                                     |
| texts  | bytes list | UTF-8 captions (empty for image-label data)             |
| label  | int64      | class index, or -1 when the sample has no label         |
| topics | float list | optional topic vector of the paired text                |
| id     | bytes      | stable sample id                                        |

The Example proto comes from tensorflow_datasets.proto, so records read back in TensorFlow's
`tf.train.Example.FromString` and `tf.io.parse_single_example` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tensorflow_datasets.proto import tf_example_pb2

REQUIRED_KEYS = ("image", "texts", "label", "id")


class BadRecordError(ValueError):
    """A record that does not follow the schema; names where it came from."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where or 'record'}: {reason}")
        self.where, self.reason = where, reason


def first_texts(texts: Sequence[str], count: int) -> list[str]:
    """A record's first `count` texts (0: all): the captions a source trains on
    (`data.sources.NAME.captions`) or an evaluation retrieves (`evals.NAME.captions`)."""
    return list(texts[:count] if count > 0 else texts)


def encode_example(
    *,
    image: bytes,
    texts: Sequence[str] = (),
    label: int = -1,
    topics: np.ndarray | Sequence[float] | None = None,
    id: str = "",  # noqa: A002 - the schema's key name
) -> bytes:
    """Serialises one sample as a tf.train.Example."""
    example = tf_example_pb2.Example()
    feature = example.features.feature
    feature["image"].bytes_list.value.append(bytes(image))
    feature["texts"].bytes_list.value.extend(t.encode("utf-8") for t in texts)
    feature["label"].int64_list.value.append(int(label))
    feature["id"].bytes_list.value.append(id.encode("utf-8"))
    if topics is not None:
        feature["topics"].float_list.value.extend(np.asarray(topics, np.float32).tolist())
    return example.SerializeToString(deterministic=True)  # same sample, same bytes


def decode_example(data: bytes, *, where: str = "", num_classes: int | None = None) -> dict:
    """Parses one serialised Example into {image, texts, label, topics, id}.

    Raises BadRecordError naming `where` (file and record) for anything off-schema: a proto
    that does not parse, a missing key, an empty image, non-UTF-8 text, a label out of range.
    """
    try:
        example = tf_example_pb2.Example.FromString(data)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise BadRecordError(where, f"not a tf.train.Example ({e})") from None
    feature = example.features.feature
    missing = [k for k in REQUIRED_KEYS if k not in feature]
    if missing:
        raise BadRecordError(
            where, f"missing key(s) {missing}; the schema needs {list(REQUIRED_KEYS)}"
        )
    images = feature["image"].bytes_list.value
    if len(images) != 1 or not images[0]:
        raise BadRecordError(where, "image must hold exactly one non-empty encoded image")
    try:
        texts = [t.decode("utf-8") for t in feature["texts"].bytes_list.value]
        sample_id = (
            feature["id"].bytes_list.value[0].decode("utf-8")
            if feature["id"].bytes_list.value
            else ""
        )
    except UnicodeDecodeError as e:
        raise BadRecordError(where, f"text is not valid UTF-8 ({e})") from None
    labels = feature["label"].int64_list.value
    if len(labels) != 1:
        raise BadRecordError(where, f"label must be one int64, got {len(labels)} values")
    label = int(labels[0])
    if label < -1 or (num_classes is not None and label >= num_classes):
        raise BadRecordError(
            where, f"label {label} out of range [-1, {num_classes}) (-1 means no label)"
        )
    topics = None
    if "topics" in feature:
        topics = np.asarray(feature["topics"].float_list.value, dtype=np.float32)
    return {"image": images[0], "texts": texts, "label": label, "topics": topics, "id": sample_id}
