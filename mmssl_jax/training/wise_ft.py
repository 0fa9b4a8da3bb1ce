"""WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): the fine-tuned
weights interpolated with the ones fine-tuning started from,
theta(alpha) = (1 - alpha) * theta_zero_shot + alpha * theta_fine_tuned:

    python tools/wise_ft.py --config=configs/finetune_tiny.py:init=WORKDIR_OR_EXPORT \\
        --workdir=FINETUNE_DIR --output=OUT_DIR --alpha=0.5
    python -m mmssl_jax.main --config=configs/finetune_tiny.py:init=... --workdir=OUT_DIR \\
        --mode=eval

writes OUT_DIR/checkpoints/<step> (the fine-tuned train state with interpolated parameters)
and OUT_DIR/config.json, so evaluation and tools/export.py read it like any run.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from mmssl_jax.training.checkpoint import Checkpointer
from mmssl_jax.training.init_from import InitFromError, load_init_params
from mmssl_jax.training.trainer import Trainer


def interpolate(zero_shot: Any, fine_tuned: Any, alpha: float) -> Any:
    """(1 - alpha) * zero_shot + alpha * fine_tuned, leaf by leaf (same tree structure);
    alpha 0 gives the zero-shot weights, 1 the fine-tuned ones, exactly."""
    if not 0.0 <= alpha <= 1.0:
        logging.warning("WiSE-FT alpha %s is outside [0, 1]: extrapolating", alpha)

    def mix(a: Any, b: Any) -> Any:
        if alpha == 0.0:
            return a
        if alpha == 1.0:
            return b
        a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return ((1.0 - alpha) * a32 + alpha * b32).astype(np.asarray(b).dtype)

    return jax.tree.map(mix, jax.device_get(zero_shot), jax.device_get(fine_tuned))


def wise_ft(
    config: Any,
    fine_tuned_workdir: str,
    output_workdir: str,
    alpha: float,
    zero_shot: str | None = None,
) -> str:
    """Writes `output_workdir` holding the fine-tuned run's latest state with parameters
    interpolated towards `zero_shot` (default: `config.init_from.path`, where fine-tuning
    started). Parameters in `init_from.skip` have no zero-shot value and stay fine-tuned."""
    zero_shot = zero_shot or config.init_from.path
    if not zero_shot:
        raise InitFromError("wise_ft: no zero-shot weights (set init_from.path or --zero_shot)")
    trainer = Trainer(config, fine_tuned_workdir)
    source = Checkpointer(fine_tuned_workdir)
    try:
        step = source.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {fine_tuned_workdir}; fine-tune first")
        state = source.restore(trainer.abstract_state(), None, step)
    finally:
        source.close()
    fine = jax.device_get(state.params)
    start = load_init_params(zero_shot, fine, tuple(config.init_from.get("skip", ()) or ()))
    mixed = interpolate(start, fine, alpha)
    state = state.replace(params=jax.device_put(mixed, trainer.state_sharding.params))
    os.makedirs(output_workdir, exist_ok=True)
    out = Checkpointer(output_workdir, async_save=False)
    try:
        out.save(step, state, None, force=True)
        out.wait()
    finally:
        out.close()
    with open(os.path.join(output_workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2, default=str)
    with open(os.path.join(output_workdir, "wise_ft.json"), "w") as f:
        json.dump(
            dict(alpha=alpha, zero_shot=zero_shot, fine_tuned=fine_tuned_workdir, step=step), f
        )
    logging.info("WiSE-FT alpha=%s: wrote %s/checkpoints/%d", alpha, output_workdir, step)
    return output_workdir
