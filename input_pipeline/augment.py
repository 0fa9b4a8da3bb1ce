"""Photometric SSL augmentations in JAX, run on the device inside the jitted train step.

The host sends uint8 crops (input_pipeline/transforms.py); here each sample gets SLIP's /
SimCLR's colour recipe, vmapped over the batch:

1. colour jitter with p=0.8: brightness, contrast, saturation factors ~ U(1-x, 1+x) and a hue
   shift ~ U(-h, h), applied in a random order per sample (like torchvision's ColorJitter;
   `jitter_random_order=False` uses the fixed order b, c, s, h and is 4x cheaper);
2. grayscale with p=0.2 (ITU-R 601 luma, replicated to 3 channels);
3. Gaussian blur with p=0.5, sigma ~ U(0.1, 2.0), separable, edge-replicated borders (PIL's
   GaussianBlur(radius=sigma) used by SLIP is a Gaussian of std `radius`);
4. solarize with p=`solarize_prob` (0 for SLIP; MoCo v3 uses 0.2 on its second view).

Flip happens on the host (it commutes with all of the above). Maths follows the PIL ops
torchvision calls (ImageEnhance blends clipped to [0, 1]; contrast blends towards the mean
luma of the image), in float32 without PIL's rounding to uint8 between ops.

Randomness: the per-sample key is `fold_in(key, index)` with the sample's global index, so
a sample's augmentation depends only on (key, index), not on the batch it lands in or the
device it runs on. Nothing branches in Python on traced values; probabilities become
`jnp.where` selects (under vmap a `lax.cond` would run both sides anyway).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)  # PIL's convert("L") weights


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """SSL colour augmentation settings (defaults: SLIP / SimCLR v1 recipe)."""

    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_random_order: bool = True
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # Kernel taps ~ this fraction of the image side (odd, >= 3), capped at the 3-sigma width
    # of the largest sigma (more taps would only add weights below 1e-2 of the centre).
    blur_kernel_frac: float = 0.1
    solarize_prob: float = 0.0
    solarize_threshold: float = 0.5


def make_config(cfg: AugmentConfig | Mapping | None = None) -> AugmentConfig:
    """Returns an AugmentConfig from None (defaults), an AugmentConfig, or a mapping /
    ml_collections.ConfigDict with a subset of its fields."""
    if cfg is None:
        return AugmentConfig()
    if isinstance(cfg, AugmentConfig):
        return cfg
    values = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    unknown = set(values) - {f.name for f in dataclasses.fields(AugmentConfig)}
    if unknown:
        raise ValueError(f"unknown augmentation options: {sorted(unknown)}")
    if "blur_sigma" in values:
        values["blur_sigma"] = tuple(values["blur_sigma"])
    return AugmentConfig(**values)


def is_active(cfg: AugmentConfig) -> bool:
    """Whether `cfg` changes any image: some colour operation has a probability above 0."""
    return max(cfg.jitter_prob, cfg.grayscale_prob, cfg.blur_prob, cfg.solarize_prob) > 0


def to_float(images: jax.Array) -> jax.Array:
    """uint8 images -> float32 in [0, 1]."""
    # A multiply (not a divide, which XLA rewrites to one): same bits eager and jitted.
    return images.astype(jnp.float32) * jnp.float32(1.0 / 255.0)


def normalize(x: jax.Array) -> jax.Array:
    """(x - mean) / std with the ImageNet statistics, over the last (channel) axis."""
    mean = jnp.asarray(IMAGENET_MEAN, x.dtype)
    std = jnp.asarray(IMAGENET_STD, x.dtype)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------
# Single-image ops on float [H, W, 3] in [0, 1]


def _gray(x: jax.Array) -> jax.Array:
    """Luma [..., 1]; an explicit weighted sum, not a matmul (which may run in TF32 on GPU)."""
    r, g, b = _LUMA
    return r * x[..., 0:1] + g * x[..., 1:2] + b * x[..., 2:3]


def _blend(x: jax.Array, degenerate: jax.Array, factor: jax.Array) -> jax.Array:
    return jnp.clip(degenerate + factor * (x - degenerate), 0.0, 1.0)


def adjust_brightness(x: jax.Array, factor: jax.Array) -> jax.Array:
    return _blend(x, jnp.zeros_like(x), factor)


def adjust_contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
    return _blend(x, jnp.mean(_gray(x)), factor)


def adjust_saturation(x: jax.Array, factor: jax.Array) -> jax.Array:
    return _blend(x, _gray(x), factor)


def rgb_to_hsv(x: jax.Array) -> jax.Array:
    """RGB [..., 3] in [0, 1] -> HSV [..., 3] with hue in [0, 1)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    # Pick the max channel by comparing channels with each other, not by `maxc == r`: XLA
    # may recompute a fused input with different rounding for each use, and then no
    # equality holds and every pixel would take the last branch. Hue is continuous across
    # the branches at ties, so the choice there does not matter.
    r_max = (r >= g) & (r >= b)
    g_max = ~r_max & (g >= b)
    maxc = jnp.where(r_max, r, jnp.where(g_max, g, b))
    minc = jnp.minimum(jnp.minimum(r, g), b)
    delta = maxc - minc
    s = delta / jnp.where(maxc > 0, maxc, 1.0)
    safe = jnp.where(delta > 0, delta, 1.0)
    h = jnp.where(
        r_max, (g - b) / safe, jnp.where(g_max, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
    )
    h = jnp.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(x: jax.Array) -> jax.Array:
    """HSV [..., 3] (hue in turns) -> RGB [..., 3], branch-free: channel n (R=5, G=3, B=1)
    is v - v*s*clip(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6."""
    h, s, v = x[..., 0:1], x[..., 1:2], x[..., 2:3]
    n = jnp.asarray((5.0, 3.0, 1.0), x.dtype)
    k = (n + 6.0 * (h % 1.0)) % 6.0
    return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def adjust_hue(x: jax.Array, shift: jax.Array) -> jax.Array:
    """Rotates the hue by `shift` turns (in [-0.5, 0.5])."""
    hsv = rgb_to_hsv(x)
    hsv = hsv.at[..., 0].set((hsv[..., 0] + shift) % 1.0)
    return jnp.clip(hsv_to_rgb(hsv), 0.0, 1.0)


def grayscale(x: jax.Array) -> jax.Array:
    return jnp.broadcast_to(_gray(x), x.shape)


def solarize(x: jax.Array, threshold: float = 0.5) -> jax.Array:
    return jnp.where(x >= threshold, 1.0 - x, x)


def blur_kernel_size(side: int, cfg: AugmentConfig) -> int:
    """Odd number of taps tied to the image side, at least 3, at most 2*ceil(3*sigma_max)+1."""
    k = int(round(cfg.blur_kernel_frac * side))
    k = min(k, 2 * math.ceil(3 * cfg.blur_sigma[1]) + 1)
    k = max(k, 3)
    return k if k % 2 else k + 1


def gaussian_blur(x: jax.Array, sigma: jax.Array, ksize: int) -> jax.Array:
    """Separable Gaussian blur of [H, W, C] with std `sigma` (a traced scalar), edge padding."""
    radius = ksize // 2
    offsets = jnp.arange(-radius, radius + 1, dtype=x.dtype)
    w = jnp.exp(-0.5 * (offsets / sigma) ** 2)
    w = w / w.sum()
    height, width = x.shape[0], x.shape[1]
    xp = jnp.pad(x, ((radius, radius), (0, 0), (0, 0)), mode="edge")
    x = sum(w[i] * xp[i : i + height] for i in range(ksize))
    xp = jnp.pad(x, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(w[i] * xp[:, i : i + width] for i in range(ksize))


def _color_jitter(x: jax.Array, key: jax.Array, cfg: AugmentConfig) -> jax.Array:
    k_order, k_b, k_c, k_s, k_h = jax.random.split(key, 5)

    def factor(k, amount):
        return jax.random.uniform(k, (), x.dtype, max(0.0, 1.0 - amount), 1.0 + amount)

    fb, fc, fs = factor(k_b, cfg.brightness), factor(k_c, cfg.contrast), factor(k_s, cfg.saturation)
    fh = jax.random.uniform(k_h, (), x.dtype, -cfg.hue, cfg.hue)
    ops = (
        lambda y: adjust_brightness(y, fb),
        lambda y: adjust_contrast(y, fc),
        lambda y: adjust_saturation(y, fs),
        lambda y: adjust_hue(y, fh),
    )
    if not cfg.jitter_random_order:
        for op in ops:
            x = op(x)
        return x
    order = jax.random.permutation(k_order, 4)
    # A 4-step loop keeps the compiled graph at one copy of each op. Under vmap the switch
    # becomes a select over all four ops, so each step computes all four (cheap next to
    # the encoders; `jitter_random_order=False` avoids it).
    return jax.lax.fori_loop(0, 4, lambda step, y: jax.lax.switch(order[step], ops, y), x)


def _augment_one(image: jax.Array, key: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """SSL colour augmentation of one float [H, W, 3] image in [0, 1]."""
    keys = jax.random.split(key, 8)
    x = image
    u = jax.random.uniform(keys[0], (4,))
    if cfg.jitter_prob > 0:
        x = jnp.where(u[0] < cfg.jitter_prob, _color_jitter(x, keys[1], cfg), x)
    if cfg.grayscale_prob > 0:
        x = jnp.where(u[1] < cfg.grayscale_prob, grayscale(x), x)
    if cfg.blur_prob > 0:
        ksize = blur_kernel_size(min(x.shape[0], x.shape[1]), cfg)
        lo, hi = cfg.blur_sigma
        sigma = jax.random.uniform(keys[2], (), x.dtype, lo, hi)
        x = jnp.where(u[2] < cfg.blur_prob, gaussian_blur(x, sigma, ksize), x)
    if cfg.solarize_prob > 0:
        x = jnp.where(u[3] < cfg.solarize_prob, solarize(x, cfg.solarize_threshold), x)
    return x


def ssl_augment(
    images: jax.Array,
    key: jax.Array,
    indices: jax.Array,
    cfg: AugmentConfig | Mapping | None = None,
) -> jax.Array:
    """Augments uint8 [B, H, W, 3] images -> float32 [B, H, W, 3] in [0, 1].

    `indices` [B] are the samples' global indices: sample b uses `fold_in(key, indices[b])`.
    Use different `key`s for the two views of a pair (e.g. `fold_in(step_key, view)`).
    Jitted (the config is static); inside a jitted train step it is simply inlined.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [B, H, W, 3], got {images.shape}")
    return _ssl_augment(images, key, indices, make_config(cfg))


@functools.partial(jax.jit, static_argnames="cfg")
def _ssl_augment(images, key, indices, cfg: AugmentConfig) -> jax.Array:
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, indices.astype(jnp.uint32))
    out = jax.vmap(lambda im, k: _augment_one(im, k, cfg))(to_float(images), keys)
    # Blur weights sum to 1 only up to rounding: keep the [0, 1] promise exactly.
    return jnp.clip(out, 0.0, 1.0)


# ---- geometry on the device (fine-tuning) ---------------------------------------------


def random_resized_crop(
    image: jax.Array,
    key: jax.Array,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
    """RandomResizedCrop of one float image [H, W, C] back to [H, W, C] (bilinear,
    antialiased): a box of U(scale) of the area and log-uniform aspect `ratio`, clipped to
    the image, at a uniform position."""
    h, w = image.shape[:2]
    k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1]) * h * w
    log_r = jax.random.uniform(k_ratio, (), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
    aspect = jnp.exp(log_r)
    cw = jnp.clip(jnp.sqrt(area * aspect), 1.0, w)
    ch = jnp.clip(jnp.sqrt(area / aspect), 1.0, h)
    y0 = jax.random.uniform(k_y, ()) * (h - ch)
    x0 = jax.random.uniform(k_x, ()) * (w - cw)
    sy, sx = h / ch, w / cw
    return jax.image.scale_and_translate(
        image,
        image.shape,
        (0, 1),
        jnp.stack([sy, sx]),
        jnp.stack([-y0 * sy, -x0 * sx]),
        method="linear",
        antialias=True,
    )


def crop_flip(
    images: jax.Array, key: jax.Array, scale: tuple[float, float] = (0.08, 1.0)
) -> jax.Array:
    """uint8 [B, H, W, 3] -> float32 in [0, 1]: random resized crop, then a flip with p=0.5."""
    x = to_float(images)
    k_crop, k_flip = jax.random.split(key)
    keys = jax.random.split(k_crop, x.shape[0])
    x = jax.vmap(lambda im, k: random_resized_crop(im, k, scale))(x, keys)
    flip = jax.random.bernoulli(k_flip, 0.5, (x.shape[0], 1, 1, 1))
    return jnp.clip(jnp.where(flip, x[:, :, ::-1], x), 0.0, 1.0)
