"""Tests for input_pipeline/augment.py (device-side SSL colour augmentation)."""

import colorsys
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from input_pipeline import augment as A

NONE = A.AugmentConfig(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)


def images(batch: int = 6, size: int = 16, seed: int = 0) -> np.ndarray:
    """Smooth colourful uint8 images (gradients + a random offset per image)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    base = np.stack([xx, yy, 1 - xx * yy], -1)
    out = (base[None] * 0.7 + rng.random((batch, 1, 1, 3)) * 0.3) * 255
    noise = rng.integers(-20, 20, size=out.shape)
    return np.clip(out + noise, 0, 255).astype(np.uint8)


def aug(x, key, indices, cfg=None):
    return A.ssl_augment(x, key, jnp.asarray(indices), cfg)


def test_shapes_dtype_range():
    x = images(4, 16)
    out = aug(x, jax.random.key(0), np.arange(4))
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not np.allclose(out, A.to_float(x))  # something was augmented


def test_deterministic_and_independent_of_batch_composition():
    x = images(4, 16)
    key = jax.random.key(1)
    out = np.asarray(aug(x, key, [10, 11, 12, 13]))
    np.testing.assert_array_equal(out, np.asarray(aug(x, key, [10, 11, 12, 13])))
    # Samples 12 and 10 in another batch, in other positions, with other neighbours.
    other = np.stack([images(1, 16, seed=9)[0], x[2], x[0], x[1]])
    out2 = np.asarray(aug(other, key, [99, 12, 10, 98]))
    np.testing.assert_allclose(out2[1], out[2], atol=1e-6)
    np.testing.assert_allclose(out2[2], out[0], atol=1e-6)
    assert not np.allclose(out2[3], out[1])  # same image, other index: other augmentation
    out3 = np.asarray(aug(x, jax.random.key(2), [10, 11, 12, 13]))
    assert not np.allclose(out3, out)


def test_inside_an_outer_jit():
    """Used inside the jitted train step: same values as the standalone call."""
    x = images(4, 16)
    key, idx = jax.random.key(3), jnp.arange(4)

    @jax.jit
    def step(images, key, idx):
        return A.normalize(A.ssl_augment(images, key, idx)).mean()

    expected = A.normalize(aug(x, key, idx)).mean()
    np.testing.assert_allclose(step(x, key, idx), expected, rtol=1e-5)


def test_zero_probabilities_are_identity():
    x = images(4, 16)
    out = aug(x, jax.random.key(0), np.arange(4), cfg=NONE)
    np.testing.assert_array_equal(out, A.to_float(x))


def test_grayscale_has_equal_channels():
    cfg = dataclasses.replace(NONE, grayscale_prob=1.0)
    out = np.asarray(aug(images(2, 8), jax.random.key(0), np.arange(2), cfg=cfg))
    np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-6)
    np.testing.assert_allclose(out[..., 1], out[..., 2], atol=1e-6)


def test_probabilities_are_respected():
    """Fraction of grey outputs ~ grayscale_prob over many samples."""
    cfg = dataclasses.replace(NONE, grayscale_prob=0.2)
    n = 400
    out = np.asarray(aug(images(n, 4), jax.random.key(5), np.arange(n), cfg=cfg))
    grey = np.abs(out[..., 0] - out[..., 1]).max(axis=(1, 2)) < 1e-6
    assert 0.13 < grey.mean() < 0.27


def test_solarize():
    cfg = dataclasses.replace(NONE, solarize_prob=1.0)
    x = images(2, 8)
    out = aug(x, jax.random.key(0), np.arange(2), cfg=cfg)
    f = A.to_float(x)
    np.testing.assert_allclose(out, jnp.where(f >= 0.5, 1.0 - f, f), atol=1e-6)


def test_blur_applied_with_probability_one():
    cfg = dataclasses.replace(NONE, blur_prob=1.0, blur_sigma=(1.5, 1.5))
    x = images(2, 8)
    out = aug(x, jax.random.key(0), np.arange(2), cfg=cfg)
    ref = jnp.stack([A.gaussian_blur(f, jnp.float32(1.5), 3) for f in A.to_float(x)])
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_blur():
    const = jnp.full((16, 16, 3), 0.3)
    np.testing.assert_allclose(A.gaussian_blur(const, jnp.float32(1.5), 9), const, atol=1e-6)
    x = A.to_float(images(1, 32)[0])
    blurred = A.gaussian_blur(x, jnp.float32(2.0), 13)
    assert float(jnp.abs(jnp.diff(blurred, axis=0)).mean()) < 0.5 * float(
        jnp.abs(jnp.diff(x, axis=0)).mean()
    )
    # Reference: direct 2D convolution with the same normalised Gaussian, edge padding.
    r, s = 3, 1.2
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / s) ** 2)
    g /= g.sum()
    xp = np.pad(np.asarray(x), ((r, r), (r, r), (0, 0)), mode="edge")
    ref = sum(
        g[i] * g[j] * xp[i : i + 32, j : j + 32] for i in range(2 * r + 1) for j in range(2 * r + 1)
    )
    np.testing.assert_allclose(A.gaussian_blur(x, jnp.float32(s), 2 * r + 1), ref, atol=1e-5)
    cfg = A.AugmentConfig()
    assert A.blur_kernel_size(224, cfg) == 13  # capped at 3 sigma_max on each side
    assert A.blur_kernel_size(96, cfg) == 11
    assert A.blur_kernel_size(16, cfg) == 3


def test_colour_ops_against_references():
    x = A.to_float(images(1, 8)[0])
    np.testing.assert_allclose(A.adjust_brightness(x, 1.0), x, atol=1e-6)
    np.testing.assert_allclose(A.adjust_contrast(x, 1.0), x, atol=1e-6)
    np.testing.assert_allclose(A.adjust_saturation(x, 1.0), x, atol=1e-6)
    np.testing.assert_allclose(A.adjust_hue(x, 0.0), x, atol=1e-5)
    np.testing.assert_allclose(A.adjust_brightness(x, 0.5), x * 0.5, atol=1e-6)
    grey = A.adjust_saturation(x, 0.0)
    np.testing.assert_allclose(grey[..., 0], grey[..., 2], atol=1e-6)
    flat = A.adjust_contrast(x, 0.0)
    assert float(flat.std()) < 1e-6
    red = jnp.array([[[1.0, 0.0, 0.0]]])
    np.testing.assert_allclose(A.adjust_hue(red, 1 / 3), [[[0.0, 1.0, 0.0]]], atol=1e-5)
    # HSV round trip and agreement with colorsys.
    px = np.random.default_rng(0).random((200, 3)).astype(np.float32)
    hsv = np.asarray(A.rgb_to_hsv(jnp.asarray(px)))
    np.testing.assert_allclose(hsv, [colorsys.rgb_to_hsv(*p) for p in px], atol=1e-5)
    np.testing.assert_allclose(A.hsv_to_rgb(jnp.asarray(hsv)), px, atol=1e-5)


def test_random_order_jitter_matches_explicit_order():
    """The traced random-order loop applies the four ops in the sampled order (this also
    guards the HSV branch selection against XLA's fused recomputation)."""
    x = A.to_float(images(3, 8))
    ops = (
        lambda y: A.adjust_brightness(y, 1.3),
        lambda y: A.adjust_contrast(y, 0.7),
        lambda y: A.adjust_saturation(y, 1.4),
        lambda y: A.adjust_hue(y, 0.08),
    )
    orders = jnp.array([[3, 0, 2, 1], [0, 1, 2, 3], [2, 3, 1, 0]])

    @jax.jit
    @jax.vmap
    def traced(im, order):
        return jax.lax.fori_loop(0, 4, lambda s, y: jax.lax.switch(order[s], ops, y), im)

    out = traced(x, orders)
    for im, order, got in zip(x, np.asarray(orders), out, strict=True):
        for k in order:
            im = ops[int(k)](im)
        np.testing.assert_allclose(got, im, atol=1e-5)


def test_fixed_order_jitter():
    cfg = dataclasses.replace(NONE, jitter_prob=1.0, jitter_random_order=False)
    x = images(2, 8)
    out = aug(x, jax.random.key(0), np.arange(2), cfg=cfg)
    assert out.shape == x.shape and not np.allclose(out, A.to_float(x))


def test_normalize_and_to_float():
    x = jnp.array([[[[0, 255, 128]]]], jnp.uint8)
    f = A.to_float(x)
    np.testing.assert_allclose(f, [[[[0.0, 1.0, 128 / 255]]]])
    n = A.normalize(f)
    expected = (np.array([0.0, 1.0, 128 / 255]) - A.IMAGENET_MEAN) / A.IMAGENET_STD
    np.testing.assert_allclose(n[0, 0, 0], expected, rtol=1e-6)


def test_config_from_mapping():
    cfg = ml_collections.ConfigDict({"solarize_prob": 0.2, "blur_sigma": [0.1, 1.0]})
    made = A.make_config(cfg)
    assert made.solarize_prob == 0.2 and made.blur_sigma == (0.1, 1.0) and made.jitter_prob == 0.8
    assert A.make_config(None) == A.AugmentConfig()
    with pytest.raises(ValueError, match="bogus"):
        A.make_config({"bogus": 1})
    off = {"jitter_prob": 0.0, "grayscale_prob": 0.0, "blur_prob": 0.0}
    out = aug(images(2, 8), jax.random.key(0), np.arange(2), cfg=off)
    np.testing.assert_array_equal(out, A.to_float(images(2, 8)))


def test_rejects_bad_shape():
    with pytest.raises(ValueError):
        A.ssl_augment(jnp.zeros((8, 8, 3), jnp.uint8), jax.random.key(0), jnp.arange(1))
