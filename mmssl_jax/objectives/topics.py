"""Text-topic supervision: the image network predicts the topic vector of its paired text.

TextTopicNet (Gomez et al. 2017; Patel et al. 2018) embeds each caption with a text model
(LDA topics, LSA, word vectors; `input_pipeline/sources/topics.py`) and trains the visual network
to predict that vector from the image alone. Here the prediction `pred` [n, K] is a head on
the image feature (`MultimodalModel.topic_head`) and the target `t` [n, K] comes with the
batch (`topics`). Five losses, each `(loss, metrics)`:

- `topic_softmax_loss`: cross-entropy to the distribution t / sum(t) (the thesis's best with
  LDA). Targets must be non-negative (LDA); negative entries are clipped to 0.
- `topic_bce_loss`: per-topic sigmoid cross-entropy with targets clipped to [0, 1], summed
  over topics, averaged over samples.
- `topic_mse_loss`: 0.5 * ||pred - t||^2 averaged over samples (Caffe's EuclideanLoss, the
  framework of the thesis line of work).
- `topic_triplet_loss`: on L2-normalised vectors, max(0, margin + d(p_i, t_i) - d(p_i, t_j))
  with d the squared Euclidean distance and t_j the hardest (closest to p_i) or a random
  in-batch negative among the samples whose topic vector differs from t_i.
- `topic_contrastive_loss`: InfoNCE of the normalised prediction against the batch's
  normalised topic vectors (the own topic vector is the positive), optionally symmetric.

Sharding. Under `jax.shard_map` (axis_name set) the per-sample losses are local means
(every device holds the same number of rows, so `pmean` gives the global mean); triplet and
contrastive all-gather the topic vectors, so negatives come from the global batch exactly
as on one device. Targets carry no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmssl_jax.objectives import core
from mmssl_jax.objectives.outputs import register_output
from mmssl_jax.objectives.registry import register_term

Metrics = dict[str, jax.Array]
NEGATIVES = ("hardest", "random")
# Fixed key for random triplet negatives: the draw for a row is fold_in(key, its global
# sample index), so it changes every step (the index does) and is the same on any mesh.
_NEG_KEY_SEED = 0x70E1C


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _mean_rows(values: jax.Array, axis_name: str | None) -> jax.Array:
    """Mean over rows; all devices hold equally many rows, so pmean is the global mean."""
    return core.reduce_rows(values, jnp.ones(values.shape[:1], jnp.float32), axis_name)


def _top1(pred: jax.Array, topics: jax.Array, axis_name: str | None) -> jax.Array:
    """Fraction of samples whose highest predicted topic is their highest target topic."""
    hit = (jnp.argmax(pred, -1) == jnp.argmax(topics, -1)).astype(jnp.float32)
    return _mean_rows(hit, axis_name)


def topic_softmax_loss(
    pred: jax.Array, topics: jax.Array, *, axis_name: str | None = None
) -> tuple[jax.Array, Metrics]:
    """-sum_k q_k log softmax(pred)_k with q = max(t, 0) / sum(max(t, 0)); mean over rows.

    A row whose target sums to 0 contributes 0 (and still counts in the mean)."""
    pred, t = _f32(pred), jax.lax.stop_gradient(jnp.maximum(_f32(topics), 0.0))
    total = jnp.sum(t, axis=-1, keepdims=True)
    q = t / jnp.where(total > 0, total, 1.0)
    row = -jnp.sum(q * jax.nn.log_softmax(pred, axis=-1), axis=-1)
    loss = _mean_rows(row, axis_name)
    return loss, {"loss": loss, "top1": _top1(pred, t, axis_name)}


def topic_bce_loss(
    pred: jax.Array, topics: jax.Array, *, axis_name: str | None = None
) -> tuple[jax.Array, Metrics]:
    """sum_k [softplus(x_k) - t_k x_k] (= BCE(sigmoid(x_k), t_k)), t clipped to [0, 1];
    mean over rows."""
    x, t = _f32(pred), jax.lax.stop_gradient(jnp.clip(_f32(topics), 0.0, 1.0))
    row = jnp.sum(jax.nn.softplus(x) - t * x, axis=-1)
    loss = _mean_rows(row, axis_name)
    return loss, {"loss": loss, "top1": _top1(x, t, axis_name)}


def topic_mse_loss(
    pred: jax.Array, topics: jax.Array, *, axis_name: str | None = None
) -> tuple[jax.Array, Metrics]:
    """0.5 * ||pred - t||^2 per row, mean over rows (Caffe's EuclideanLoss)."""
    x, t = _f32(pred), jax.lax.stop_gradient(_f32(topics))
    row = 0.5 * jnp.sum(jnp.square(x - t), axis=-1)
    loss = _mean_rows(row, axis_name)
    return loss, {"loss": loss, "top1": _top1(x, t, axis_name)}


def triplet_negatives(
    p: jax.Array,
    t_local: jax.Array,
    t_all: jax.Array,
    index: jax.Array | None,
    negatives: str,
) -> tuple[jax.Array, jax.Array]:
    """(negative column [n], has_negative [n]) for rows with normalised predictions `p`.

    Candidates are the columns whose topic vector differs from the row's own (so the row
    itself and exact duplicates are never negatives). "hardest": the candidate closest to p
    (highest cosine). "random": a uniform candidate, drawn from fold_in(key, index_i).
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    differs = jnp.any(t_local[:, None, :] != t_all[None, :, :], axis=-1)  # [n, N]
    if negatives == "hardest":
        score = p @ t_all.T
    else:
        if index is None:
            raise ValueError("random triplet negatives need the samples' global index")
        key = jax.random.key(_NEG_KEY_SEED)
        draw = lambda i: jax.random.uniform(jax.random.fold_in(key, i), (t_all.shape[0],))
        score = jax.vmap(draw)(jnp.asarray(index).astype(jnp.uint32))
    neg = jnp.argmax(jnp.where(differs, score, -jnp.inf), axis=-1)
    return neg, jnp.any(differs, axis=-1)


def topic_triplet_loss(
    pred: jax.Array,
    topics: jax.Array,
    index: jax.Array | None = None,
    *,
    margin: float = 0.2,
    negatives: str = "hardest",
    axis_name: str | None = None,
) -> tuple[jax.Array, Metrics]:
    """max(0, margin + |p_i - t_i|^2 - |p_i - t_j|^2) on L2-normalised p = pred, t = topics,
    with t_j from `triplet_negatives` over the global batch; mean over rows that have a
    negative. Metrics: loss, active (fraction of rows with a positive hinge)."""
    p = core.l2_normalize(pred)
    t = jax.lax.stop_gradient(core.l2_normalize(topics))
    t_all = core.gather_rows(t, axis_name)
    neg, has = triplet_negatives(jax.lax.stop_gradient(p), t, t_all, index, negatives)
    d_pos = jnp.sum(jnp.square(p - t), axis=-1)
    d_neg = jnp.sum(jnp.square(p - t_all[neg]), axis=-1)
    hinge = jnp.maximum(0.0, margin + d_pos - d_neg)
    loss = core.reduce_rows(hinge, has, axis_name)
    active = core.reduce_rows((hinge > 0).astype(jnp.float32), has, axis_name)
    return loss, {"loss": loss, "active": active}


def topic_contrastive_loss(
    pred: jax.Array,
    topics: jax.Array,
    *,
    temperature: float = 0.1,
    symmetric: bool = False,
    axis_name: str | None = None,
) -> tuple[jax.Array, Metrics]:
    """InfoNCE: row i is CE(softmax_j(<p_i, t_j> / T), i) over the global batch's topic
    vectors (p, t L2-normalised). `symmetric` averages it with the topic->image direction
    (CE over the predictions for each topic vector), as CLIP. Metrics: loss, acc (top-1 of
    image->topic)."""
    p = core.l2_normalize(pred)
    t = jax.lax.stop_gradient(core.l2_normalize(topics))
    n = p.shape[0]
    rows = core.column_offset(n, axis_name) + jnp.arange(n)
    t_all = core.gather_rows(t, axis_name)
    cols = jnp.arange(t_all.shape[0])
    scale = core.as_scale(1.0 / temperature, axis_name)
    i2t = core.contrastive_rows(p, t_all, scale, rows, cols, core.same_id)
    r = lambda v, stats: core.reduce_rows(v, stats.n_pos > 0, axis_name)
    loss = r(i2t.loss, i2t)
    if symmetric:
        p_all = core.gather_rows(p, axis_name)
        t2i = core.contrastive_rows(t, p_all, scale, rows, cols, core.same_id)
        loss = (loss + r(t2i.loss, t2i)) / 2
    return loss, {"loss": loss, "acc": r(i2t.hit, i2t)}


# ---- registered terms: outputs "topic_pred" (head on the image feature), "topics" (batch) ---

_TOPIC_NEEDS = {"topic_pred", "topics"}

register_output(
    "topic_pred",
    lambda f: f.module.apply_head("topic_head", f.feature("image"), train=f.train),
    views=("image",),
    parts=("topic_head",),
)
register_output("topics", lambda f: f.batch["topics"], batch_keys=("topics",))


@register_term("topic_softmax", _TOPIC_NEEDS)
def _topic_softmax(outputs, axis_name):
    return topic_softmax_loss(outputs["topic_pred"], outputs["topics"], axis_name=axis_name)


@register_term("topic_bce", _TOPIC_NEEDS)
def _topic_bce(outputs, axis_name):
    return topic_bce_loss(outputs["topic_pred"], outputs["topics"], axis_name=axis_name)


@register_term("topic_mse", _TOPIC_NEEDS)
def _topic_mse(outputs, axis_name):
    return topic_mse_loss(outputs["topic_pred"], outputs["topics"], axis_name=axis_name)


@register_term("topic_triplet", _TOPIC_NEEDS | {"index"})
def _topic_triplet(outputs, axis_name, *, margin: float = 0.2, negatives: str = "hardest"):
    return topic_triplet_loss(
        outputs["topic_pred"],
        outputs["topics"],
        outputs["index"],
        margin=margin,
        negatives=negatives,
        axis_name=axis_name,
    )


@register_term("topic_contrastive", _TOPIC_NEEDS)
def _topic_contrastive(outputs, axis_name, *, temperature: float = 0.1, symmetric: bool = False):
    return topic_contrastive_loss(
        outputs["topic_pred"],
        outputs["topics"],
        temperature=temperature,
        symmetric=symmetric,
        axis_name=axis_name,
    )
