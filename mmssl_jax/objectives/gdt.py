"""GDT (Patrick et al., ICCV 2021): contrastive learning over generalised data transformations.

Every view of a sample is a transformation T = (sample i, t_1, ..., t_M): here the views are
model outputs (e.g. `image_emb`, `text_emb`, `ssl_a`, `ssl_b`) and each view declares its
value of each transformation component (e.g. modality 0/1, augmentation 0/1). Each
component m is

- invariant: views that differ in t_m may still be positives (c_m = 1), or
- distinctive: only views with the same t_m are positives (c_m = [t_m == t'_m]), so the
  sample's other values of t_m become hard negatives,

and sample selection is always distinctive, so the positives are

    c(T, T') = [i == i'] * prod_m c_m(t_m, t'_m)        (built from `gdt_masks`)

The pairs compared at all, w(T, T'), exclude the view itself and, per component, keep
"all" pairs, only pairs that "differ" in t_m (GDT's cross-modal w = [m != m']) or only the
"same" t_m. Every view is an anchor against every view of the global batch:

    L = mean over anchors with a positive of  -sum_T' (c w / sum c w) log softmax_w(s <a, b>)

Special cases (tests/objectives/test_topic_rotation_mocov3_gdt_vs_numpy.py checks them to
float precision):
- CLIP: views (image_emb, text_emb), one component modality (0, 1), invariant, compare
  "differ", scale = logit_scale.
- SimCLR: views (ssl_a, ssl_b), one component view (0, 1), invariant, compare "all",
  scale 1 / 0.1.

Sharding: anchors are the local rows of every view, candidates the all-gathered views
([N * V, d]); masks come from metadata (sample id, component ids, position), so the
chunked form of the core (`chunk_size`) works unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mmssl_jax.objectives import core
from mmssl_jax.objectives.contrastive import gdt_masks
from mmssl_jax.objectives.registry import register_term

COMPARE = ("all", "differ", "same")


def check_spec(
    num_views: int,
    view_ids: Sequence[Sequence[int]],
    invariant: Sequence[bool],
    compare: Sequence[str],
) -> tuple[tuple[tuple[int, ...], ...], tuple[bool, ...], tuple[str, ...]]:
    """Validated (view_ids [V][M], invariant [M], compare [M]) as tuples."""
    ids = tuple(tuple(int(t) for t in v) for v in view_ids)
    invariant, compare = tuple(bool(b) for b in invariant), tuple(str(c) for c in compare)
    if len(ids) != num_views:
        raise ValueError(f"view_ids has {len(ids)} entries for {num_views} views")
    m = len(invariant)
    if len(compare) != m or any(len(v) != m for v in ids):
        raise ValueError(
            f"every view needs one id per component: view_ids {ids}, invariant {invariant}, "
            f"compare {compare}"
        )
    bad = [c for c in compare if c not in COMPARE]
    if bad:
        raise ValueError(f"compare must be one of {COMPARE}, got {bad}")
    return ids, invariant, compare


def gdt_pair_masks(rows: dict, cols: dict, invariant, compare) -> tuple[jax.Array, jax.Array]:
    """(positives, valid) [r, c] from metadata dicts with "sample" [.], "pos" [.] and
    "comp" [., M] (component ids); see the module docstring."""
    valid = rows["pos"][:, None] != cols["pos"][None, :]
    positives = rows["sample"][:, None] == cols["sample"][None, :]
    for m, (inv, how) in enumerate(zip(invariant, compare, strict=True)):
        pos_m, _ = gdt_masks(
            rows["sample"], cols["sample"], rows["comp"][:, m], cols["comp"][:, m], inv
        )
        positives = positives & pos_m
        same_m = rows["comp"][:, m][:, None] == cols["comp"][:, m][None, :]
        if how == "differ":
            valid = valid & ~same_m
        elif how == "same":
            valid = valid & same_m
    return positives & valid, valid


def gdt_loss(
    views: Sequence[jax.Array],
    view_ids: Sequence[Sequence[int]],
    invariant: Sequence[bool],
    compare: Sequence[str],
    scale: jax.Array | float,
    *,
    sample_ids: jax.Array | None = None,
    axis_name: str | None = None,
    chunk_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GDT loss over V views [n, d] (same d) of the same n samples.

    view_ids[v][m]: the value of component m for view v; invariant[m], compare[m] as in the
    module docstring; scale: logit multiplier (exp(logit_scale) or 1/temperature).
    sample_ids [n]: which sample each row is (default: its global position, every row its
    own sample; pass e.g. id_hash to make duplicates of one record positives).
    Metrics: loss, acc (the highest valid logit is a positive).
    """
    ids, invariant, compare = check_spec(len(views), view_ids, invariant, compare)
    V, n = len(views), views[0].shape[0]
    z = jnp.stack([core.l2_normalize(v) for v in views], axis=1)  # [n, V, d]
    d = z.shape[-1]
    offset = core.column_offset(n, axis_name)
    if sample_ids is None:
        sample_ids = offset + jnp.arange(n)
    sample_ids = jnp.asarray(sample_ids).astype(jnp.int32)
    comp = jnp.asarray(ids, jnp.int32).reshape(V, len(invariant))
    keys = core.gather_rows(z, axis_name)  # [N, V, d]
    samples_all = core.gather_rows(sample_ids, axis_name)
    N = keys.shape[0]
    rows = {
        "sample": jnp.repeat(sample_ids, V),
        "comp": jnp.tile(comp, (n, 1)),
        "pos": (offset * V + jnp.arange(n * V)).astype(jnp.int32),
    }
    cols = {
        "sample": jnp.repeat(samples_all, V),
        "comp": jnp.tile(comp, (N, 1)),
        "pos": jnp.arange(N * V, dtype=jnp.int32),
    }

    def mask_fn(r, c):
        return gdt_pair_masks(r, c, invariant, compare)

    stats = core.contrastive_rows(
        z.reshape(n * V, d),
        keys.reshape(N * V, d),
        core.as_scale(scale, axis_name),
        rows,
        cols,
        mask_fn,
        chunk_size,
    )
    has = stats.n_pos > 0
    loss = core.reduce_rows(stats.loss, has, axis_name)
    return loss, {"loss": loss, "acc": core.reduce_rows(stats.hit, has, axis_name)}


# ---- the registered term -------------------------------------------------------------------

_DEFAULTS = dict(
    views=("image_emb", "text_emb"),
    view_ids=((0,), (1,)),
    invariant=(True,),
    compare=("differ",),
    temperature=None,
    sample_ids="position",
)
SAMPLE_IDS = ("position", "id_hash")


def _gdt_needs(
    *,
    views: Sequence[str] = _DEFAULTS["views"],
    temperature: float | None = None,
    sample_ids: str = "position",
    **_,
) -> set[str]:
    needs = set(views)
    if temperature is None:
        needs.add("logit_scale")
    if sample_ids == "id_hash":
        needs.add("id_hash")
    return needs


@register_term("gdt", _gdt_needs(), needs_fn=_gdt_needs)
def _gdt(
    outputs,
    axis_name,
    *,
    views: Sequence[str] = _DEFAULTS["views"],
    view_ids: Sequence[Sequence[int]] = _DEFAULTS["view_ids"],
    invariant: Sequence[bool] = _DEFAULTS["invariant"],
    compare: Sequence[str] = _DEFAULTS["compare"],
    temperature: float | None = None,
    sample_ids: str = "position",
    chunk_size: int | None = None,
):
    """GDT over model outputs `views`; the defaults are cross-modal image-text (= CLIP).
    temperature None uses the learnable `logit_scale`; sample_ids "position" (each row its
    own sample) or "id_hash" (rows of the same record id are the same sample)."""
    if sample_ids not in SAMPLE_IDS:
        raise ValueError(f"sample_ids must be one of {SAMPLE_IDS}, got {sample_ids!r}")
    scale = outputs["logit_scale"] if temperature is None else 1.0 / float(temperature)
    return gdt_loss(
        [outputs[v] for v in views],
        view_ids,
        invariant,
        compare,
        scale,
        sample_ids=outputs["id_hash"] if sample_ids == "id_hash" else None,
        axis_name=axis_name,
        chunk_size=chunk_size,
    )
