"""A tiny tfds dataset of real Fashion-MNIST images, for
tests/input_pipeline/sources/test_make_shards.py.

tfds requires a builder to live in an importable module (not __main__), hence this file.
Prepare it with `prepare(builder)`: tfds writes ArrayRecord without TensorFlow, and TFRecord
(its default format) here with the project's TFRecord framing in place of TensorFlow's writer.
"""

import os
from unittest import mock

import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import file_adapters

from input_pipeline import tfrecord
from input_pipeline.sources import fashion_mnist

NUM = {"train": 6, "test": 3}


class TinyFashion(tfds.core.GeneratorBasedBuilder):
    """The first few Fashion-MNIST images of each split, with a caption and a ClassLabel."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(names=fashion_mnist.CLASSNAMES),
                    "caption": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in NUM}

    def _generate_examples(self, split):
        images, labels = fashion_mnist.load_split(fashion_mnist.DATA_DIR, split)
        for i in range(NUM[split]):
            label = int(labels[i])
            # PIL images are encoded with Pillow (numpy arrays would need TensorFlow).
            yield (
                i,
                {
                    "image": Image.fromarray(images[i], "L"),
                    "label": label,
                    "caption": f"a photo of a {fashion_mnist.CLASSNAMES[label]}",
                },
            )


class TfOnlyText(tfds.features.Text):
    """A text feature with TensorFlow decoding only (no `decode_example_np`), as custom
    features written for tf.data often are."""

    def decode_example_np(self, example_data):
        raise NotImplementedError


class TinyFashionTfOnlyCaption(TinyFashion):
    """TinyFashion whose caption feature can only be decoded with TensorFlow."""

    def _info(self) -> tfds.core.DatasetInfo:
        info = super()._info()
        features = dict(info.features)
        features["caption"] = TfOnlyText()
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))


def _write_tfrecord(cls, path, iterator) -> None:
    """tfds' TFRecord writer without TensorFlow: the same framing, from input_pipeline."""
    with open(os.fspath(path), "wb") as f:
        for _, serialized in iterator:
            f.write(tfrecord.frame(serialized))


def prepare(builder: tfds.core.DatasetBuilder) -> None:
    """download_and_prepare, also for file_format="tfrecord" when TensorFlow is absent."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        writer = classmethod(_write_tfrecord)
        with mock.patch.object(file_adapters.TfRecordFileAdapter, "write_examples", writer):
            builder.download_and_prepare()
    else:
        builder.download_and_prepare()
