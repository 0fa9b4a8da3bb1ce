"""The objective core: one masked contrastive loss over L2-normalised embeddings.

Every contrastive term (CLIP, SimCLR, UniCL, SupCon, GDT-style) is

    row_i = -sum_j t_ij * log_softmax_{j in valid_i}(scale * <a_i, b_j>),  t_i = P_i / sum(P_i)

averaged over the rows that have at least one positive. Under `jax.shard_map` the anchors
`a` stay local ([n, d]) and the candidates `b` are all-gathered ([N, d]); each device holds
an [n, N] logit block (or, chunked, an [n, c] block at a time), never [N, N]. The gather is
differentiable (its transpose is a reduce-scatter), so the gradient of a device's rows
includes their use as candidates on other devices and sharded == single-device.

Cross-device reduction. The loss functions return this device's share such that
`jax.lax.pmean(loss, axis_name)` equals the single-device loss on the global batch, which
is what `objectives.total_loss` does. When every device has the same number of anchor rows
with positives (CLIP, SimCLR) the share is just the local mean; when the count differs per
device (UniCL, SupCon) it is local_sum / (psum(count) / num_devices), so the pmean is
psum(sum) / psum(count) exactly, not a mean of unequal means.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# A masked logit. Finite (not -inf) so that 0 * NEG == 0 and masked entries never make NaNs,
# in the loss or its gradient; exp(NEG - m) underflows to exactly 0 in float32.
NEG = -1e30

MaskFn = Callable[[Any, Any], tuple[jax.Array, jax.Array]]


class RowStats(NamedTuple):
    """Per-anchor results: loss [n] (0 for rows without positives), positive weight [n]
    (sum of the row's positive mask; > 0 means the row counts) and top-1 hit [n] (1.0 when
    the highest valid logit is a positive)."""

    loss: jax.Array
    n_pos: jax.Array
    hit: jax.Array


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) in at least float32 (the loss is always computed in float32)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def gather_rows(x: jax.Array, axis_name: str | None) -> jax.Array:
    """All-gathers the leading (batch) axis over `axis_name` (tiled: [n, ...] -> [N, ...]),
    in device order; the identity when axis_name is None. Differentiable: the backward is a
    reduce-scatter, so other devices' gradients reach this device's rows."""
    if axis_name is None:
        return x
    return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def column_offset(n: int, axis_name: str | None) -> jax.Array:
    """Global index of this device's first row in a gathered [N, ...] array (n rows each)."""
    if axis_name is None:
        return jnp.zeros((), jnp.int32)
    return jax.lax.axis_index(axis_name) * n


def as_scale(scale: jax.Array | float, axis_name: str | None) -> jax.Array:
    """The logit multiplier as a float32 scalar, marked device-varying under shard_map so
    per-device gradient contributions are summed by the transpose of the cast."""
    s = jnp.asarray(scale, jnp.float32)
    if axis_name is not None and not _is_varying(s, axis_name):
        s = jax.lax.pcast(s, axis_name, to="varying")
    return s


def _is_varying(x: jax.Array, axis_name: str) -> bool:
    """Whether x's type (under shard_map) already varies over axis_name."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # JAX 0.10; older releases call it vma
    varying = mat.varying if mat is not None else getattr(aval, "vma", frozenset())
    return axis_name in varying


def reduce_rows(values: jax.Array, weights: jax.Array, axis_name: str | None) -> jax.Array:
    """Weighted mean over rows whose pmean over `axis_name` is the global weighted mean.

    Single device: sum(v * w) / sum(w) (0 when no row counts). Under shard_map:
    sum(v * w) * D / psum(sum(w)), so that pmean == psum(sum(v * w)) / psum(sum(w)).
    """
    weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
    total = jnp.sum(values * weights)
    count = jnp.sum(weights)
    if axis_name is None:
        return total / jnp.maximum(count, 1.0)
    count = jax.lax.psum(count, axis_name)
    return total * jax.lax.axis_size(axis_name) / jnp.maximum(count, 1.0)


def dense_rows(
    a: jax.Array, b_all: jax.Array, positives: jax.Array, valid: jax.Array, scale: jax.Array
) -> RowStats:
    """Row losses from explicit [n, N] masks; a and b_all already normalised."""
    logits = scale * (a @ b_all.T)
    valid = valid.astype(bool)
    weight = jnp.where(valid, positives.astype(logits.dtype), 0.0)
    n_pos = jnp.sum(weight, axis=-1)
    has = n_pos > 0
    masked = jnp.where(valid, logits, NEG)
    logp = jax.nn.log_softmax(masked, axis=-1)
    target = weight / jnp.where(has, n_pos, 1.0)[:, None]
    row = -jnp.sum(jnp.where(weight > 0, target * logp, 0.0), axis=-1)
    best = jnp.argmax(masked, axis=-1)
    hit = jnp.take_along_axis(weight, best[:, None], axis=-1)[:, 0] > 0
    return RowStats(jnp.where(has, row, 0.0), n_pos, hit.astype(jnp.float32))


def split_blocks(x: jax.Array, c: int, nb: int) -> jax.Array:
    """[N, ...] -> [nb, c, ...], zero-padding the tail."""
    pad = nb * c - x.shape[0]
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((nb, c) + x.shape[1:])


def _block_masks(mask_fn, row_meta, cmeta, ok):
    pos, val = mask_fn(row_meta, cmeta)
    val = val.astype(bool) & ok[None, :]
    return jnp.where(val, pos.astype(jnp.float32), 0.0), val


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _blockwise(mask_fn, block, a, b_all, scale, row_meta, col_meta):
    out, _ = _blockwise_fwd(mask_fn, block, a, b_all, scale, row_meta, col_meta)
    return out


def _blockwise_fwd(mask_fn, block, a, b_all, scale, row_meta, col_meta):
    N = b_all.shape[0]
    c = min(block, N)
    nb = -(-N // c)
    xs = (
        split_blocks(b_all, c, nb),
        jax.tree.map(lambda m: split_blocks(m, c, nb), col_meta),
        split_blocks(jnp.ones((N,), bool), c, nb),
    )

    def body(carry, x):
        m, s, pos_sum, pos_w, best, best_hit = carry
        b_blk, cmeta, ok = x
        logits = scale * (a @ b_blk.T)
        w, val = _block_masks(mask_fn, row_meta, cmeta, ok)
        masked = jnp.where(val, logits, NEG)
        blk_max = jnp.max(masked, axis=-1)
        m_new = jnp.maximum(m, blk_max)
        p = jnp.where(val, jnp.exp(masked - m_new[:, None]), 0.0)
        s = s * jnp.exp(m - m_new) + jnp.sum(p, axis=-1)
        pos_sum = pos_sum + jnp.sum(w * logits, axis=-1)
        pos_w = pos_w + jnp.sum(w, axis=-1)
        idx = jnp.argmax(masked, axis=-1)
        blk_hit = jnp.take_along_axis(w, idx[:, None], axis=-1)[:, 0] > 0
        upd = blk_max > best
        best = jnp.where(upd, blk_max, best)
        best_hit = jnp.where(upd, blk_hit, best_hit)
        return (m_new, s, pos_sum, pos_w, best, best_hit), None

    # Carries derive from `a` so that under shard_map they share its device-varying type.
    zeros = jnp.zeros_like(a[:, 0], dtype=jnp.float32)
    init = (zeros + NEG, zeros, zeros, zeros, zeros - jnp.inf, zeros > 0)
    (m, s, pos_sum, pos_w, _, hit), _ = jax.lax.scan(body, init, xs)
    lse = m + jnp.log(jnp.where(s > 0, s, 1.0))
    has = pos_w > 0
    row = jnp.where(has, lse - pos_sum / jnp.where(has, pos_w, 1.0), 0.0)
    out = RowStats(row, pos_w, hit.astype(jnp.float32))
    return out, (a, b_all, scale, row_meta, col_meta, lse, pos_w)


def _blockwise_bwd(mask_fn, block, res, g):
    a, b_all, scale, row_meta, col_meta, lse, pos_w = res
    N = b_all.shape[0]
    c = min(block, N)
    nb = -(-N // c)
    has = pos_w > 0
    g_row = jnp.where(has, g.loss, 0.0)
    inv_w = jnp.where(has, 1.0 / jnp.where(has, pos_w, 1.0), 0.0)
    xs = (
        split_blocks(b_all, c, nb),
        jax.tree.map(lambda m: split_blocks(m, c, nb), col_meta),
        split_blocks(jnp.ones((N,), bool), c, nb),
    )

    def body(carry, x):
        da, dscale = carry
        b_blk, cmeta, ok = x
        raw = a @ b_blk.T
        w, val = _block_masks(mask_fn, row_meta, cmeta, ok)
        p = jnp.exp(jnp.where(val, scale * raw - lse[:, None], NEG))
        dlogits = g_row[:, None] * (p - w * inv_w[:, None])
        da = da + scale * (dlogits @ b_blk)
        db_blk = scale * (dlogits.T @ a)
        dscale = dscale + jnp.sum(dlogits * raw)
        return (da, dscale), db_blk

    (da, dscale), db = jax.lax.scan(body, (jnp.zeros_like(a), jnp.zeros_like(scale)), xs)
    db = db.reshape((-1,) + b_all.shape[1:])[:N]
    return da, db, dscale, None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def contrastive_rows(
    a: jax.Array,
    b_all: jax.Array,
    scale: jax.Array,
    row_meta: Any,
    col_meta: Any,
    mask_fn: MaskFn,
    chunk_size: int | None = None,
) -> RowStats:
    """Row losses with masks computed from metadata: `mask_fn(row_meta, col_meta)` returns
    (positives, valid) for the given rows and columns (pytrees of [n] / [c] arrays).

    chunk_size None: one [n, N] block. Otherwise the columns are scanned in blocks of
    `chunk_size` with an online logsumexp and a custom backward that recomputes each block,
    so neither pass holds more than a few [n, chunk_size] arrays; the result equals the
    dense form up to float rounding.
    """
    if chunk_size is None:
        positives, valid = mask_fn(row_meta, col_meta)
        return dense_rows(a, b_all, positives, valid, scale)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    return _blockwise(mask_fn, int(chunk_size), a, b_all, scale, row_meta, col_meta)


def masked_contrastive(
    a: jax.Array,
    b: jax.Array,
    positives: jax.Array,
    valid: jax.Array,
    scale: jax.Array | float,
    *,
    axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Contrastive loss of anchors `a` against candidates `b` with explicit masks.

    a, b: [n, d] unnormalised (local rows; `b` is all-gathered to [N, d] when axis_name is
    set). positives, valid: [n, N] (bool or non-negative weights; positives outside valid are
    ignored). scale: the logit multiplier (exp(logit_scale), or 1/temperature). Rows with no
    positive contribute nothing. Returns (loss, {"loss", "acc"}) with the reduction described
    in the module docstring.
    """
    a = l2_normalize(a)
    b_all = gather_rows(l2_normalize(b), axis_name)
    rows = dense_rows(a, b_all, positives, valid, as_scale(scale, axis_name))
    has = rows.n_pos > 0
    loss = reduce_rows(rows.loss, has, axis_name)
    return loss, {"loss": loss, "acc": reduce_rows(rows.hit, has, axis_name)}


def same_id(rows: jax.Array, cols: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The mask function of `contrastive_rows` for one positive per matching id (CLIP's
    diagonal, MoCo v3's query-key pairs, topic targets): positive where the ids match,
    every pair valid."""
    pos = rows[:, None] == cols[None, :]
    return pos, jnp.ones(pos.shape, bool)
