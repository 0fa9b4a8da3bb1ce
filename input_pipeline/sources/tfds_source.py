"""A prepared TensorFlow Datasets dataset, read without TensorFlow.

Both of tfds' file formats convert: ArrayRecord (`file_format='array_record'`) through
tfds' own random-access data source, and TFRecord (tfds' default, e.g. a prepared
`imagenet2012`) through the project's random-access TFRecord reader (input_pipeline/
tfrecord.py; tfds writes no .idx, so the shards are indexed in memory from their record
headers). Records are decoded with tfds' NumPy decoding (`deserialize_example_np`), only the
features that are used. A used feature whose decoding needs TensorFlow (a feature class
without NumPy decoding) is a clear error naming the dataset and the feature. Nothing is
downloaded: the dataset must already be in `data_dir`.

Images are read as their stored encoded bytes (tfds' image decoding is skipped) and decoded,
flattened, resized and re-encoded by the shared writer; a `ClassLabel` label brings its class
names along.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from input_pipeline.sources.shard_writer import (
    Bad,
    BadImageError,
    ImageOptions,
    Plan,
    Record,
    encode_image,
    open_image,
)


@dataclasses.dataclass(frozen=True)
class Task:
    id: str
    image: Any  # encoded bytes, or a uint8 array [H, W] / [H, W, C]
    texts: tuple[str, ...]
    label: int


def _to_pil(image: Any) -> Image.Image:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise BadImageError(f"image array has dtype {arr.dtype}, expected uint8")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise BadImageError(f"image array has shape {arr.shape}")
    return Image.fromarray(arr)


def process(task: Task, options: ImageOptions) -> Record | Bad:
    try:
        if isinstance(task.image, bytes):
            img = open_image(
                task.image, max_short_side=options.max_short_side, max_side=options.max_side
            )
        else:
            img = _to_pil(task.image)
    except BadImageError as e:
        return Bad(task.id, str(e))
    return Record(task.id, encode_image(img, options), task.texts, task.label)


def _texts(value: Any) -> tuple[str, ...]:
    values = value if isinstance(value, list | tuple | np.ndarray) else [value]
    out = []
    for v in values:
        v = v.item() if isinstance(v, np.generic) else v
        text = v.decode("utf-8") if isinstance(v, bytes) else str(v)
        if text.strip():
            out.append(text)
    return tuple(out)


class TensorFlowRequiredError(RuntimeError):
    """A feature that is needed can only be decoded with TensorFlow, which is not installed."""


def _needs_tensorflow(error: BaseException) -> bool:
    """tfds' way of failing when NumPy decoding is missing: NotImplementedError, or the
    import of TensorFlow behind its lazy `tf` module."""
    if isinstance(error, NotImplementedError):
        return True
    return isinstance(error, ImportError) and "tensorflow" in str(error)


class _Decoder:
    """Decodes a serialised tfds example into the used features only, with NumPy.

    Unused features are not parsed, so a feature that would need TensorFlow (or is merely
    slow to decode) does not matter unless it is one of image/label/text.
    """

    def __init__(self, name: str, features: Any, keys: Sequence[str], image_key: str):
        import tensorflow_datasets as tfds

        self.name = name
        self._features = {k: features[k] for k in keys}
        self._decoders = {}
        if isinstance(features[image_key], tfds.features.Image):
            self._decoders[image_key] = tfds.decode.SkipDecoding()
        self._all = tfds.features.FeaturesDict(self._features)

    def __call__(self, raw: bytes) -> dict:
        try:
            return self._all.deserialize_example_np(raw, decoders=self._decoders)
        except Exception as e:
            if _needs_tensorflow(e):
                self.check(raw)  # names the feature
            raise

    def check(self, raw: bytes) -> None:
        """Decodes each used feature of `raw` alone; raises TensorFlowRequiredError naming
        the first one whose decoding needs TensorFlow."""
        import tensorflow_datasets as tfds

        for key, feature in self._features.items():
            one = tfds.features.FeaturesDict({key: feature})
            decoders = {key: self._decoders[key]} if key in self._decoders else None
            try:
                one.deserialize_example_np(raw, decoders=decoders)
            except Exception as e:
                if not _needs_tensorflow(e):
                    continue
                raise TensorFlowRequiredError(
                    f"{self.name}: feature {key!r} ({type(feature).__name__}) can only be "
                    f"decoded with TensorFlow ({type(e).__name__}: {str(e) or 'no NumPy decoding'}"
                    "), and TensorFlow is not installed. Install it (pip install tensorflow), "
                    "or name another feature with --image_key/--label_key/--text_key."
                ) from None


class _TFRecordSplit(Sequence):
    """Raw examples of a tfds split stored as TFRecord files, by index.

    `file_instructions` (tfds' per-file skip/take of the split, sub-splits like `train[:10%]`
    included) map split index i to a record of one shard.
    """

    def __init__(self, file_instructions: Sequence[Any]):
        from input_pipeline.tfrecord import TFRecordSource

        self._shards, self._skips, takes = [], [], []
        for f in file_instructions:
            if f.take <= 0:
                continue
            shard = TFRecordSource([os.fspath(f.filename)], scan_missing_index=True)
            if len(shard) != f.examples_in_shard:
                raise ValueError(
                    f"{f.filename}: holds {len(shard)} records but the tfds dataset info "
                    f"says {f.examples_in_shard}; the dataset files were changed or cut short"
                )
            self._shards.append(shard)
            self._skips.append(f.skip)
            takes.append(f.take)
        self._ends = np.cumsum(takes, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, i: int) -> bytes:
        if not 0 <= i < len(self):
            raise IndexError(i)
        j = int(np.searchsorted(self._ends, i, side="right"))
        first = int(self._ends[j - 1]) if j else 0
        return self._shards[j][self._skips[j] + i - first]


@dataclasses.dataclass(frozen=True, eq=False)
class _Tasks(Sequence):
    """Lazy task list over raw tfds examples (records are read when iterated)."""

    name: str
    split: str
    source: Any  # index -> serialised example
    decode: Callable[[bytes], dict]
    length: int
    image_key: str
    label_key: str | None
    text_key: str | None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i):
        if not 0 <= i < self.length:
            raise IndexError(i)
        sample_id = f"{self.name}/{self.split}/{i}"
        try:
            rec = self.decode(self.source[i])
        except TensorFlowRequiredError:
            raise
        except Exception as e:  # any reader error: report the record, keep going
            return Bad(sample_id, f"cannot read record ({type(e).__name__}: {e})")
        label = int(rec[self.label_key]) if self.label_key else -1
        texts = _texts(rec[self.text_key]) if self.text_key else ()
        return Task(sample_id, rec[self.image_key], texts, label)


def _check_first(decode: _Decoder, source: Sequence) -> None:
    """Decodes the first record's used features, so that a feature needing TensorFlow fails
    the command now, not as one bad record after another."""
    try:
        raw = source[0]
    except Exception:  # an unreadable record is reported as bad with the others
        return
    decode.check(raw)


def _raw_source(builder: Any, split: str) -> Sequence:
    """Serialised examples of `split` by index, for either tfds file format."""
    import tensorflow_datasets as tfds

    file_format = builder.info.file_format
    if file_format == tfds.core.FileFormat.TFRECORD:
        return _TFRecordSplit(builder.info.splits[split].file_instructions)
    if file_format in tfds.core.FileFormat.with_random_access():
        return builder.as_data_source(
            split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
        )
    raise ValueError(
        f"{builder.name}: file format {file_format} is not supported; prepare it with "
        "file_format='array_record' or 'tfrecord'"
    )


def plan(
    *,
    name: str,
    data_dir: str | None = None,
    splits: Sequence[str] = ("train",),
    image_key: str = "image",
    label_key: str | None = None,
    text_key: str | None = None,
    limit: int | None = None,
    module: str | None = None,
) -> Plan:
    """Tasks for each split of a prepared tfds dataset.

    label_key: None uses "label" when the dataset has that feature; "" disables labels.
    module: a module to import first (one that defines a GeneratorBasedBuilder); prepared
      datasets are found from their files in data_dir without it.
    """
    import tensorflow_datasets as tfds

    if module:
        importlib.import_module(module)
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"{name}: not prepared in {builder.data_dir}; nothing is downloaded here "
            "(prepare it with tfds first, or give --data_dir)"
        )
    features = builder.info.features
    for key in (image_key, label_key, text_key):
        if key and key not in features:
            raise KeyError(f"{name}: no feature {key!r}; features are {list(features)}")
    key = label_key
    if key is None:
        key = "label" if "label" in features else ""
    classnames = None
    if key and isinstance(features[key], tfds.features.ClassLabel):
        classnames = list(features[key].names)
    used = [k for k in (image_key, key, text_key) if k]
    decode = _Decoder(name, features, list(dict.fromkeys(used)), image_key)
    tasks: dict[str | None, Sequence] = {}
    for split in splits:
        source = _raw_source(builder, split)
        n = min(len(source), limit) if limit else len(source)
        if n:
            _check_first(decode, source)
        tasks[split] = _Tasks(name, split, source, decode, n, image_key, key or None, text_key)
    return Plan(
        name=name, splits=tasks, process=process, classnames=classnames, default_format="jpeg"
    )
