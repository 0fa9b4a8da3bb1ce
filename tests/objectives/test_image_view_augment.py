"""`config.augment_image`: the CLIP image's colour augmentation on the device. Off (every
probability 0, the recipes' default) the image goes in as cropped, as in SLIP; on, it is
augmented per sample in training only."""

import importlib

import jax
import numpy as np

from input_pipeline import augment
from mmssl_jax.objectives import outputs
from mmssl_jax.training import step as step_lib


def _batch(n: int = 4) -> dict:
    rng = np.random.default_rng(0)
    return {
        "image": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
        "index": np.arange(n, dtype=np.int32),
    }


def _image_view(aug_cfg, train: bool = True) -> np.ndarray:
    f = outputs.Forward(None, _batch(), jax.random.key(3), aug_cfg, train)
    return np.asarray(outputs.VIEWS["image"].prepare(f))


def test_recipes_leave_the_image_as_cropped():
    config = importlib.import_module("configs.tiny_minilm").get_config()
    views = step_lib.augment_configs(config)
    assert views.image is None
    plain = np.asarray(augment.normalize(augment.to_float(_batch()["image"])))
    np.testing.assert_array_equal(_image_view(views), plain)


def test_grayscale_on_the_image_in_training_only():
    config = importlib.import_module("configs.tiny_minilm").get_config()
    config.augment_image.grayscale_prob = 1.0
    views = step_lib.augment_configs(config)
    assert views.image is not None and views.image.grayscale_prob == 1.0
    assert views.view_a == augment.make_config(config.augment)  # the SSL views are untouched
    images = augment.to_float(_batch()["image"])
    gray = np.asarray(augment.normalize(augment.grayscale(images)))
    np.testing.assert_allclose(_image_view(views), gray, atol=1e-5)
    plain = np.asarray(augment.normalize(images))
    np.testing.assert_array_equal(_image_view(views, train=False), plain)


def test_jitter_differs_per_sample_and_repeats_per_key():
    config = importlib.import_module("configs.tiny_minilm").get_config()
    config.augment_image.jitter_prob = 1.0
    views = step_lib.augment_configs(config)
    once, again = _image_view(views), _image_view(views)
    np.testing.assert_array_equal(once, again)
    plain = np.asarray(augment.normalize(augment.to_float(_batch()["image"])))
    changed = np.abs(once - plain).reshape(len(once), -1).max(axis=1)
    assert (changed > 1e-3).all()
