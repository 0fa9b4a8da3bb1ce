"""Softmax contrastive terms built on the masked core: CLIP, SimCLR, UniCL, SupCon, GDT masks.

All take unnormalised embeddings (local rows under `jax.shard_map` with `axis_name`, the
whole batch otherwise) and return (loss, metrics); accuracies are fractions in [0, 1].
`chunk_size` selects the blockwise form of the core (see `core.contrastive_rows`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmssl_jax.objectives import core
from mmssl_jax.objectives.registry import register_term


def _same_id_not_self(rows: dict, cols: dict) -> tuple[jax.Array, jax.Array]:
    """Positive where ids match and positions differ; valid where positions differ."""
    not_self = rows["pos"][:, None] != cols["pos"][None, :]
    return (rows["id"][:, None] == cols["id"][None, :]) & not_self, not_self


def _symmetric(img, txt, scale, row_ids, col_ids, axis_name, chunk_size):
    """Image->text and text->image rows over a symmetric id mask."""
    img_all = core.gather_rows(img, axis_name)
    txt_all = core.gather_rows(txt, axis_name)
    i2t = core.contrastive_rows(img, txt_all, scale, row_ids, col_ids, core.same_id, chunk_size)
    t2i = core.contrastive_rows(txt, img_all, scale, row_ids, col_ids, core.same_id, chunk_size)
    r = lambda v, rows: core.reduce_rows(v, rows.n_pos > 0, axis_name)
    loss = (r(i2t.loss, i2t) + r(t2i.loss, t2i)) / 2
    return loss, {"loss": loss, "i2t_acc": r(i2t.hit, i2t), "t2i_acc": r(t2i.hit, t2i)}


def clip_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array | float,
    *,
    axis_name: str | None = None,
    chunk_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SLIP's CLIPLoss: (CE(s * img @ txt_all.T, diag) + CE(s * txt @ img_all.T, diag)) / 2.

    logit_scale is the multiplier (already exponentiated). Metrics: loss, i2t_acc, t2i_acc
    (top-1 retrieval of the paired item over the global batch), scale.
    """
    img, txt = core.l2_normalize(image_emb), core.l2_normalize(text_emb)
    n = img.shape[0]
    N = n if axis_name is None else n * jax.lax.axis_size(axis_name)
    rows = core.column_offset(n, axis_name) + jnp.arange(n)
    scale = core.as_scale(logit_scale, axis_name)
    loss, metrics = _symmetric(img, txt, scale, rows, jnp.arange(N), axis_name, chunk_size)
    return loss, metrics | {"scale": jnp.asarray(logit_scale, jnp.float32)}


def unicl_target_ids(labels: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """UniCL's TargetM as ids: labelled samples (label >= 0) keep their class, every caption
    pair (label < 0) gets a unique negative id from its global position. Positives are the
    pairs with equal ids, so caption pairs are positive only with their own partner."""
    labels = jnp.asarray(labels)
    position = offset + jnp.arange(labels.shape[0], dtype=labels.dtype)
    return jnp.where(labels >= 0, labels, -(position + 1))


def unicl_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    labels: jax.Array,
    logit_scale: jax.Array | float,
    *,
    axis_name: str | None = None,
    chunk_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """UniCL (Algorithm 1): bidirectional SoftCE with targets T_ij = [y_i == y_j] after
    TargetM over the global batch. labels -1 = image-text pair; with no labels this is
    exactly `clip_loss`. Metrics: loss, i2t_acc, t2i_acc (argmax is a positive), scale."""
    img, txt = core.l2_normalize(image_emb), core.l2_normalize(text_emb)
    offset = core.column_offset(img.shape[0], axis_name)
    labels = jnp.asarray(labels).astype(jnp.int32)
    col_ids = unicl_target_ids(core.gather_rows(labels, axis_name))
    row_ids = unicl_target_ids(labels, offset)
    scale = core.as_scale(logit_scale, axis_name)
    loss, metrics = _symmetric(img, txt, scale, row_ids, col_ids, axis_name, chunk_size)
    return loss, metrics | {"scale": jnp.asarray(logit_scale, jnp.float32)}


def _partner(rows: dict, cols: dict) -> tuple[jax.Array, jax.Array]:
    """One positive column per row (rows['pos']); the row's own column is invalid."""
    c = cols["col"][None, :]
    return c == rows["pos"][:, None], c != rows["self"][:, None]


def simclr_loss(
    z_a: jax.Array,
    z_b: jax.Array,
    temperature: float = 0.1,
    *,
    axis_name: str | None = None,
    chunk_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SLIP's SIMCLRLoss (NT-Xent): loss_a = CE([q_a k_b^T | q_a k_a^T - self] / t, partner),
    loss_b likewise with a and b swapped, loss = (loss_a + loss_b) / 2, so 2N - 2 negatives
    per anchor. Metric acc: top-1 of anchor a over [ab | aa] (as SLIP's ssl_acc).

    One gather of [q_a; q_b] per device ([2n, d] -> [2N, d]); the column order differs from
    SLIP's [ab | aa] but the loss is invariant to column order.
    """
    qa, qb = core.l2_normalize(z_a), core.l2_normalize(z_b)
    n = qa.shape[0]
    keys = core.gather_rows(jnp.concatenate([qa, qb], axis=0), axis_name)
    base = core.column_offset(2 * n, axis_name)
    i = base + jnp.arange(n)
    cols = {"col": jnp.arange(keys.shape[0])}
    scale = core.as_scale(1.0 / temperature, axis_name)
    rows_a = core.contrastive_rows(
        qa, keys, scale, {"pos": i + n, "self": i}, cols, _partner, chunk_size
    )
    rows_b = core.contrastive_rows(
        qb, keys, scale, {"pos": i, "self": i + n}, cols, _partner, chunk_size
    )
    r = lambda v, rows: core.reduce_rows(v, rows.n_pos > 0, axis_name)
    loss = (r(rows_a.loss, rows_a) + r(rows_b.loss, rows_b)) / 2
    return loss, {"loss": loss, "acc": r(rows_a.hit, rows_a)}


def supcon_loss(
    z: jax.Array,
    labels: jax.Array,
    temperature: float = 0.1,
    *,
    axis_name: str | None = None,
    chunk_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) over one set of views.

    z: [n, d] (one view per sample) or [n, V, d] (V views per sample); labels [n], < 0 for an
    unlabelled sample. Every view is an anchor; positives are the other views of the same
    class (an unlabelled sample's class is itself, so its positives are its own other views);
    the anchor itself is excluded from positives and from the softmax denominator. Anchors
    without positives are skipped. With V = 2 and no labels this equals `simclr_loss`.
    Metrics: loss, acc (argmax over the other views is a positive).
    """
    if z.ndim == 2:
        z = z[:, None, :]
    n, V, d = z.shape
    q = core.l2_normalize(z).reshape(n * V, d)
    labels = jnp.asarray(labels).astype(jnp.int32)
    sample_offset = core.column_offset(n, axis_name)
    keys = core.gather_rows(q, axis_name)
    col_ids = jnp.repeat(unicl_target_ids(core.gather_rows(labels, axis_name)), V)
    row_ids = jnp.repeat(unicl_target_ids(labels, sample_offset), V)
    rows_meta = {"id": row_ids, "pos": core.column_offset(n * V, axis_name) + jnp.arange(n * V)}
    cols_meta = {"id": col_ids, "pos": jnp.arange(keys.shape[0])}
    scale = core.as_scale(1.0 / temperature, axis_name)
    rows = core.contrastive_rows(
        q, keys, scale, rows_meta, cols_meta, _same_id_not_self, chunk_size
    )
    has = rows.n_pos > 0
    loss = core.reduce_rows(rows.loss, has, axis_name)
    return loss, {"loss": loss, "acc": core.reduce_rows(rows.hit, has, axis_name)}


def gdt_masks(
    sample_ids_a: jax.Array | np.ndarray,
    sample_ids_b: jax.Array | np.ndarray,
    trans_ids_a: jax.Array | np.ndarray,
    trans_ids_b: jax.Array | np.ndarray,
    invariant: bool,
    *,
    exclude_identical: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """GDT-style (positives, valid) masks [len_a, len_b] from sample and transformation ids.

    Sample selection is always distinctive: a positive needs the same sample id. The
    transformation is `invariant` (any transformation of the same sample is positive) or
    distinctive (only the same transformation id is; the sample's other transformations
    become hard negatives). `exclude_identical` drops pairs with equal sample and
    transformation ids from `valid` (a view compared with itself, when a and b are the same
    set of views). CLIP: ids = arange(N) on both sides, equal transformation ids. SimCLR:
    both sides [view a; view b], transformation ids 0/1, invariant, exclude_identical.
    """
    same_sample = jnp.asarray(sample_ids_a)[:, None] == jnp.asarray(sample_ids_b)[None, :]
    same_trans = jnp.asarray(trans_ids_a)[:, None] == jnp.asarray(trans_ids_b)[None, :]
    identical = same_sample & same_trans
    positives = same_sample if invariant else identical
    valid = ~identical if exclude_identical else jnp.ones(same_sample.shape, bool)
    return positives & valid, valid


# ---- registered terms -------------------------------------------------------------------


@register_term("clip", {"image_emb", "text_emb", "logit_scale"})
def _clip(outputs, axis_name, *, chunk_size: int | None = None):
    return clip_loss(
        outputs["image_emb"],
        outputs["text_emb"],
        outputs["logit_scale"],
        axis_name=axis_name,
        chunk_size=chunk_size,
    )


@register_term("simclr", {"ssl_a", "ssl_b"})
def _simclr(outputs, axis_name, *, temperature: float = 0.1, chunk_size: int | None = None):
    return simclr_loss(
        outputs["ssl_a"],
        outputs["ssl_b"],
        temperature,
        axis_name=axis_name,
        chunk_size=chunk_size,
    )


@register_term("unicl", {"image_emb", "text_emb", "label", "logit_scale"})
def _unicl(outputs, axis_name, *, chunk_size: int | None = None):
    return unicl_loss(
        outputs["image_emb"],
        outputs["text_emb"],
        outputs["label"],
        outputs["logit_scale"],
        axis_name=axis_name,
        chunk_size=chunk_size,
    )


@register_term("supcon", {"ssl_a", "ssl_b", "label"})
def _supcon(outputs, axis_name, *, temperature: float = 0.1, chunk_size: int | None = None):
    """SupCon over the two SSL views (stacked [n, 2, d]); label -1 = instance only."""
    views = jnp.stack([outputs["ssl_a"], outputs["ssl_b"]], axis=1)
    return supcon_loss(
        views, outputs["label"], temperature, axis_name=axis_name, chunk_size=chunk_size
    )
