"""A prepared TensorFlow Datasets dataset, read through `tfds.data_source` (no TensorFlow).

`tfds.data_source` gives random access over ArrayRecord files and works without TensorFlow, so
any dataset prepared with `file_format='array_record'` (see section 5 of the tfds notes in
the project references) converts here. TFRecord-format tfds datasets need TensorFlow to read
and are not supported. Nothing is downloaded: the dataset must already be in `data_dir`.

Images are read as their stored encoded bytes (tfds' image decoding is skipped) and decoded,
flattened, resized and re-encoded by the shared writer; a `ClassLabel` label brings its class
names along.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
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
            img = open_image(task.image, max_short_side=options.max_short_side)
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


@dataclasses.dataclass(frozen=True, eq=False)
class _Tasks(Sequence):
    """Lazy task list over a tfds data source (records are read when iterated)."""

    name: str
    split: str
    source: Any
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
            rec = self.source[i]
        except Exception as e:  # any reader error: report the record, keep going
            return Bad(sample_id, f"cannot read record ({type(e).__name__}: {e})")
        label = int(rec[self.label_key]) if self.label_key else -1
        texts = _texts(rec[self.text_key]) if self.text_key else ()
        return Task(sample_id, rec[self.image_key], texts, label)


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
    tasks: dict[str | None, Sequence] = {}
    classnames = None
    for split in splits:
        probe = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        features = probe.dataset_info.features
        if image_key not in features:
            raise KeyError(f"{name}: no feature {image_key!r}; features are {list(features)}")
        key = label_key
        if key is None:
            key = "label" if "label" in features else ""
        elif key and key not in features:
            raise KeyError(f"{name}: no feature {key!r}; features are {list(features)}")
        if text_key and text_key not in features:
            raise KeyError(f"{name}: no feature {text_key!r}; features are {list(features)}")
        if key and isinstance(features[key], tfds.features.ClassLabel):
            classnames = list(features[key].names)
        decoders = None
        if isinstance(features[image_key], tfds.features.Image):
            decoders = {image_key: tfds.decode.SkipDecoding()}
        source = tfds.data_source(
            name, split=split, data_dir=data_dir, download=False, decoders=decoders
        )
        n = min(len(source), limit) if limit else len(source)
        tasks[split] = _Tasks(name, split, source, n, image_key, key or None, text_key)
    return Plan(
        name=name, splits=tasks, process=process, classnames=classnames, default_format="jpeg"
    )
