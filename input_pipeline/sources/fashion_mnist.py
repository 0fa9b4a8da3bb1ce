"""Fashion-MNIST image-label records from the IDX files of the dataset-fashion-mnist package.

IDX layout (big endian): images = magic 0x00000803, count, rows, cols, then uint8 pixels;
labels = magic 0x00000801, count, then uint8 labels. Files may be gzipped.

Images are stored as 28x28 greyscale PNG by default: lossless (the pixels read back equal the
IDX bytes) and smaller than a JPEG of the same tiny image (about 300 bytes).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from collections.abc import Sequence

import numpy as np
from PIL import Image

from input_pipeline.sources.shard_writer import ImageOptions, Plan, Record, encode_image

DATA_DIR = "/usr/share/datasets/fashion-mnist"
CLASSNAMES = [
    "T-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC = 0x00000803  # uint8 data, 3 dimensions
LABELS_MAGIC = 0x00000801  # uint8 data, 1 dimension


class IdxFormatError(ValueError):
    """An IDX file whose header or size is not what Fashion-MNIST needs."""


def _open(path: str):
    if not os.path.exists(path) and os.path.exists(path + ".gz"):
        path += ".gz"
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: not found. Install it with: apt-get install dataset-fashion-mnist"
        )
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return (gzip.open if gzipped else open)(path, "rb"), path


def read_idx_images(path: str) -> np.ndarray:
    """uint8 [N, rows, cols] from an IDX3 image file (plain or gzipped)."""
    f, path = _open(path)
    with f:
        header = f.read(16)
        if len(header) < 16:
            raise IdxFormatError(f"{path}: file shorter than the 16-byte IDX image header")
        magic, n, rows, cols = struct.unpack(">IIII", header)
        if magic != IMAGES_MAGIC:
            raise IdxFormatError(
                f"{path}: magic number 0x{magic:08X}, expected 0x{IMAGES_MAGIC:08X} "
                "(IDX uint8 images); is this a label file or not IDX at all?"
            )
        data = f.read()
    if len(data) != n * rows * cols:
        raise IdxFormatError(
            f"{path}: header says {n}x{rows}x{cols} = {n * rows * cols} pixel bytes, "
            f"file holds {len(data)}"
        )
    return np.frombuffer(data, np.uint8).reshape(n, rows, cols)


def read_idx_labels(path: str) -> np.ndarray:
    """uint8 [N] from an IDX1 label file (plain or gzipped)."""
    f, path = _open(path)
    with f:
        header = f.read(8)
        if len(header) < 8:
            raise IdxFormatError(f"{path}: file shorter than the 8-byte IDX label header")
        magic, n = struct.unpack(">II", header)
        if magic != LABELS_MAGIC:
            raise IdxFormatError(
                f"{path}: magic number 0x{magic:08X}, expected 0x{LABELS_MAGIC:08X} "
                "(IDX uint8 labels); is this an image file or not IDX at all?"
            )
        data = f.read()
    if len(data) != n:
        raise IdxFormatError(f"{path}: header says {n} labels, file holds {len(data)}")
    return np.frombuffer(data, np.uint8)


@dataclasses.dataclass(frozen=True, eq=False)
class _Tasks(Sequence):
    """Lazy task list: (id, pixels, label) per image, without copying the arrays."""

    split: str
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):  # Sequence protocol; slices are not needed
        if not 0 <= i < len(self):
            raise IndexError(i)
        return (f"fashion_mnist/{self.split}/{i:05d}", self.images[i], int(self.labels[i]))


def process(task: tuple[str, np.ndarray, int], options: ImageOptions) -> Record:
    """Encodes one greyscale image."""
    sample_id, pixels, label = task
    return Record(sample_id, encode_image(Image.fromarray(pixels, "L"), options), (), label)


def load_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of one split, sizes cross-checked."""
    images_file, labels_file = FILES[split]
    images = read_idx_images(os.path.join(data_dir, images_file))
    labels = read_idx_labels(os.path.join(data_dir, labels_file))
    if len(images) != len(labels):
        raise IdxFormatError(f"{data_dir} {split}: {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() >= len(CLASSNAMES):
        raise IdxFormatError(f"{data_dir} {split}: label {labels.max()} >= {len(CLASSNAMES)}")
    return images, labels


def plan(
    *, data_dir: str = DATA_DIR, limit: int | None = None, splits: Sequence[str] = ("train", "test")
) -> Plan:
    """Tasks for the given splits; `limit` keeps the first N images of each split."""
    tasks: dict[str | None, Sequence] = {}
    for split in splits:
        if split not in FILES:
            raise ValueError(f"unknown split {split!r}; Fashion-MNIST has {list(FILES)}")
        images, labels = load_split(data_dir, split)
        if limit:
            images, labels = images[:limit], labels[:limit]
        tasks[split] = _Tasks(split, images, labels)
    return Plan(
        name="fashion_mnist",
        splits=tasks,
        process=process,
        classnames=list(CLASSNAMES),
        default_format="png",
    )
