"""SigLIP: pairwise sigmoid loss (Zhai et al. 2023), dense and as a chunked ppermute ring.

loss = -(1/N) sum_{i,j} log_sigmoid(z_ij * (scale * <x_i, y_j> + bias)), z_ij = +1 on the
diagonal and -1 elsewhere: summed over the N columns, averaged over the N rows of the global
batch, as in the paper and big_vision's `sigmoid_loss`.

Sharded (paper section 3.1): each device keeps its images and passes its text block around
a ring with `jax.lax.ppermute`. Step k scores the local images against the text of device
(i - k) mod D, so no device ever holds more than an [n, n] logit block. The loop is a
`lax.scan` whose body is rematerialised, so the backward also recomputes one block at a
time and stores only the [n, d] text block of each step; the transpose of ppermute is the
reverse ring, so the gradient equals the single-device one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmssl_jax.objectives import core
from mmssl_jax.objectives.registry import register_term


def _pair_sum(img, txt, scale, bias, col_start, num_cols, positive_diagonal):
    """-sum log_sigmoid(z * logits) of local images against text columns
    [col_start, col_start + len(txt)) of a block; columns >= num_cols are padding."""
    logits = scale * (img @ txt.T) + bias
    cols = col_start + jnp.arange(txt.shape[0])
    if positive_diagonal:
        labels = jnp.where(jnp.arange(img.shape[0])[:, None] == cols[None, :], 1.0, -1.0)
    else:
        labels = -1.0
    return -jnp.sum(jnp.where(cols < num_cols, jax.nn.log_sigmoid(labels * logits), 0.0))


def _block_sum(img, txt, scale, bias, positive_diagonal: bool, chunk_size: int | None):
    """Loss sum of the local images against one text block, `chunk_size` columns at a time
    (a rematerialised scan) so at most [n, chunk_size] logits are live."""
    num = txt.shape[0]
    if chunk_size is None or chunk_size >= num:
        return _pair_sum(img, txt, scale, bias, 0, num, positive_diagonal)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    nb = -(-num // chunk_size)
    blocks = core.split_blocks(txt, chunk_size, nb)
    starts = jnp.arange(nb) * chunk_size

    @jax.checkpoint
    def step(acc, x):
        blk, start = x
        return acc + _pair_sum(img, blk, scale, bias, start, num, positive_diagonal), None

    zero = jnp.zeros((), jnp.float32) * scale
    return jax.lax.scan(step, zero, (blocks, starts))[0]


def siglip_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array | float,
    logit_bias: jax.Array | float,
    *,
    axis_name: str | None = None,
    chunk_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sigmoid image-text loss; logit_scale is the multiplier (already exponentiated).

    chunk_size: score each [n, n] block `chunk_size` text columns at a time (less memory).

    Returns (loss, {"loss", "scale", "bias"}); under shard_map the loss is the local mean
    over this device's rows (the caller pmeans, giving the global mean).
    """
    img, txt = core.l2_normalize(image_emb), core.l2_normalize(text_emb)
    n = img.shape[0]
    scale = core.as_scale(logit_scale, axis_name)
    bias = core.as_scale(logit_bias, axis_name)
    total = _block_sum(img, txt, scale, bias, True, chunk_size)
    if axis_name is not None:
        num = jax.lax.axis_size(axis_name)
        ring = [(j, (j + 1) % num) for j in range(num)]

        @jax.checkpoint
        def step(carry, _):
            block, acc = carry
            block = jax.lax.ppermute(block, axis_name, ring)
            return (block, acc + _block_sum(img, block, scale, bias, False, chunk_size)), None

        (_, total), _ = jax.lax.scan(step, (txt, total), None, length=num - 1)
    loss = total / n
    return loss, {
        "loss": loss,
        "scale": jnp.asarray(logit_scale, jnp.float32),
        "bias": jnp.asarray(logit_bias, jnp.float32),
    }


@register_term("siglip", {"image_emb", "text_emb", "logit_scale", "logit_bias"})
def _siglip(outputs, axis_name, *, chunk_size: int | None = None):
    return siglip_loss(
        outputs["image_emb"],
        outputs["text_emb"],
        outputs["logit_scale"],
        outputs["logit_bias"],
        axis_name=axis_name,
        chunk_size=chunk_size,
    )
