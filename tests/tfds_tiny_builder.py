"""A tiny tfds dataset of real Fashion-MNIST images, for
tests/input_pipeline/sources/test_make_shards.py.

tfds requires a builder to live in an importable module (not __main__), hence this file.
Prepare it with `file_format="array_record"`: that path needs no TensorFlow.
"""

import tensorflow_datasets as tfds
from PIL import Image

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
