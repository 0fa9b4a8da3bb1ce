"""MoCo v3 (Chen, Xie, He 2021): a momentum encoder gives the keys, the online encoder plus
a predictor gives the queries, and a symmetric InfoNCE matches them over the global batch.

    loss = ctr(q_a, k_b) + ctr(q_b, k_a),
    ctr(q, k) = 2T * CE(softmax_j(<q_i, k_j> / T), j = i)      (q, k L2-normalised)

as MoCo v3's `contrastive_loss` (the 2T factor is theirs: it keeps the gradient scale
independent of T). The keys come from the momentum (EMA) encoder and projector
(`mmssl_jax/training/momentum.py`); they are stop-gradient here as well, and all-gathered over the
data axis so each query sees the N keys of the global batch (MoCo v3's concat_all_gather).
Temperature 0.2 as MoCo v3's ViT recipe.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmssl_jax.objectives import core
from mmssl_jax.objectives.outputs import register_output
from mmssl_jax.objectives.registry import register_term


def _ctr(q, k, temperature, axis_name, chunk_size):
    """2T * CE of local queries against the gathered (stop-gradient) keys."""
    q = core.l2_normalize(q)
    k_all = core.gather_rows(jax.lax.stop_gradient(core.l2_normalize(k)), axis_name)
    n = q.shape[0]
    rows = core.column_offset(n, axis_name) + jnp.arange(n)
    cols = jnp.arange(k_all.shape[0])
    scale = core.as_scale(1.0 / temperature, axis_name)
    stats = core.contrastive_rows(q, k_all, scale, rows, cols, core.same_id, chunk_size)
    has = stats.n_pos > 0
    loss = core.reduce_rows(stats.loss, has, axis_name) * (2.0 * temperature)
    return loss, core.reduce_rows(stats.hit, has, axis_name)


def mocov3_loss(
    q_a: jax.Array,
    q_b: jax.Array,
    k_a: jax.Array,
    k_b: jax.Array,
    temperature: float = 0.2,
    *,
    axis_name: str | None = None,
    chunk_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ctr(q_a, k_b) + ctr(q_b, k_a). q_*: predictor outputs of the online encoder for views
    a, b; k_*: momentum projector outputs for the same views (no gradient flows into them).
    Metrics: loss, acc (top-1 of q_a over the keys k_b)."""
    loss_ab, acc = _ctr(q_a, k_b, temperature, axis_name, chunk_size)
    loss_ba, _ = _ctr(q_b, k_a, temperature, axis_name, chunk_size)
    loss = loss_ab + loss_ba
    return loss, {"loss": loss, "acc": acc}


# Queries: MoCo v3's predictor on the projector (ssl_head) outputs. Keys: the momentum
# encoder + projector on the same augmented views, without gradient.
for _v in ("a", "b"):
    register_output(
        f"pred_{_v}",
        lambda f, v=_v: f.module.apply_head("predictor", f.get(f"ssl_{v}"), train=f.train),
        inputs=(f"ssl_{_v}",),
        parts=("predictor",),
    )
    register_output(
        f"key_{_v}",
        lambda f, v=_v: f.module.ssl_project_feature(f.feature(f"view_{v}"), train=f.train),
        views=(f"view_{_v}",),
        parts=("ssl_head",),
        momentum=True,
    )


@register_term("mocov3", {"pred_a", "pred_b", "key_a", "key_b"})
def _mocov3(outputs, axis_name, *, temperature: float = 0.2, chunk_size: int | None = None):
    return mocov3_loss(
        outputs["pred_a"],
        outputs["pred_b"],
        outputs["key_a"],
        outputs["key_b"],
        temperature,
        axis_name=axis_name,
        chunk_size=chunk_size,
    )
