"""MoCo v3's momentum encoder: an EMA copy of the online image encoder and projector.

The train state holds `ema_params`, a copy of the parameter subtrees named in
`MOMENTUM_MODULES` (the image encoder and `ssl_head`, MoCo v3's projector). The keys of the
`mocov3` term come from the model applied with those subtrees swapped in (`merged`), under
`stop_gradient`; after every optimizer step

    ema <- m * ema + (1 - m) * params,   m = 1 - (1 - m0) * (cos(pi * step / total) + 1) / 2

(MoCo v3's `adjust_moco_momentum`, per iteration: m0 = 0.99 at step 0 rising to 1 at the
end). The predictor and every other parameter stay online-only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

MOMENTUM_MODULES = ("image_encoder", "ssl_head")
# Outputs made by the momentum encoder (the train step adds them to the model outputs).


def momentum_schedule(
    base: float = 0.99, total_steps: int = 1, final: float = 1.0
) -> Callable[[jax.Array], jax.Array]:
    """step -> m: half-cosine from `base` at step 0 to `final` at `total_steps`."""
    total = max(int(total_steps), 1)

    def schedule(step: jax.Array) -> jax.Array:
        frac = jnp.clip(jnp.asarray(step, jnp.float32) / total, 0.0, 1.0)
        return final - (final - base) * (jnp.cos(math.pi * frac) + 1.0) / 2.0

    return schedule


def init_ema(params: Mapping[str, Any]) -> dict[str, Any]:
    """The momentum copy: the `MOMENTUM_MODULES` subtrees of `params` (those present)."""
    missing = [k for k in MOMENTUM_MODULES if k not in params]
    if missing:
        raise ValueError(f"MoCo v3 needs params {missing} (is model.ssl_head set?)")
    return {k: jax.tree.map(jnp.array, params[k]) for k in MOMENTUM_MODULES}


def ema_update(ema: Mapping[str, Any], params: Mapping[str, Any], m: jax.Array) -> dict:
    """m * ema + (1 - m) * params over the subtrees of `ema`."""
    return {k: jax.tree.map(lambda e, p: m * e + (1.0 - m) * p, ema[k], params[k]) for k in ema}


def merged(params: Mapping[str, Any], ema: Mapping[str, Any]) -> dict[str, Any]:
    """`params` with the momentum subtrees swapped in, all without gradient."""
    return jax.lax.stop_gradient({**params, **ema})
