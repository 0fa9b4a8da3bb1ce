"""Rotation prediction (Gidaris et al. 2018, RotNet): classify 0/90/180/270 degrees.

The rotated view is made on the device inside the train step (`rotate_batch`): each sample
of the `rotated` crop is turned by k * 90 degrees, k drawn from fold_in(step key, global
sample index), so the label needs no host transfer, is the same on any mesh, and a resumed
run draws the same k. A 4-way head on the image feature gives `rot_logits`; the term is the
cross-entropy to k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from input_pipeline import augment
from mmssl_jax.models.extra_heads import NUM_ROTATIONS
from mmssl_jax.objectives import core
from mmssl_jax.objectives.outputs import Forward, register_output, register_view
from mmssl_jax.objectives.registry import register_term


def rotate_one(image: jax.Array, k: jax.Array) -> jax.Array:
    """`image` [H, W, C] (H == W) turned counter-clockwise by k * 90 degrees (np.rot90)."""
    return jax.lax.switch(
        k, [lambda x, i=i: jnp.rot90(x, i, axes=(0, 1)) for i in range(NUM_ROTATIONS)], image
    )


def rotation_labels(key: jax.Array, indices: jax.Array) -> jax.Array:
    """k in {0, 1, 2, 3} per sample from fold_in(key, global index): int32 [B]."""
    draw = lambda i: jax.random.randint(jax.random.fold_in(key, i), (), 0, NUM_ROTATIONS)
    return jax.vmap(draw)(jnp.asarray(indices).astype(jnp.uint32)).astype(jnp.int32)


def rotate_batch(
    images: jax.Array, key: jax.Array, indices: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(rotated images [B, S, S, C], labels k [B]). Images must be square (rotation keeps
    the shape); under vmap the switch becomes a select over the four (cheap) rotations."""
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"rotation needs square images, got {images.shape}")
    k = rotation_labels(key, indices)
    return jax.vmap(rotate_one)(images, k), k


def rotation_loss(
    logits: jax.Array, labels: jax.Array, *, axis_name: str | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of 4-way `logits` [n, 4] against `labels` [n]; metric acc."""
    logits = logits.astype(jnp.float32)
    labels = jnp.asarray(labels).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    row = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    ones = jnp.ones(row.shape, jnp.float32)
    loss = core.reduce_rows(row, ones, axis_name)
    hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return loss, {"loss": loss, "acc": core.reduce_rows(hit, ones, axis_name)}


# fold_in constant of the step key for the rotation draw (views a, b use 1, 2).
ROTATION_KEY = 3


def _rotated_view(f: Forward) -> jax.Array:
    rotated, _ = rotate_batch(
        f.batch["rotated"], jax.random.fold_in(f.key, ROTATION_KEY), f.batch["index"]
    )
    return augment.normalize(augment.to_float(rotated))


register_view("rotated", _rotated_view)
register_output(
    "rotation",
    lambda f: rotation_labels(jax.random.fold_in(f.key, ROTATION_KEY), f.batch["index"]),
    views=("rotated",),
)
register_output(
    "rot_logits",
    lambda f: f.module.apply_head("rotation_head", f.feature("rotated"), train=f.train),
    views=("rotated",),
    parts=("rotation_head",),
)


@register_term("rotation", {"rot_logits", "rotation"})
def _rotation(outputs, axis_name):
    return rotation_loss(outputs["rot_logits"], outputs["rotation"], axis_name=axis_name)
