"""The optimizer: AdamW with SLIP's schedule and weight-decay rule, as one optax chain."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def warmup_cosine(
    peak_lr: float,
    total_steps: int,
    warmup_steps: int,
    start_lr: float = 1e-6,
    end_lr: float = 1e-5,
) -> optax.Schedule:
    """Linear warmup from start_lr to peak_lr, then cosine decay to end_lr (SLIP's schedule)."""
    warmup_steps = max(0, min(warmup_steps, total_steps))
    decay_steps = max(1, total_steps - warmup_steps)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = start_lr + (peak_lr - start_lr) * step / max(1, warmup_steps)
        progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = end_lr + 0.5 * (peak_lr - end_lr) * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: matrices and embeddings (ndim >= 2).

    This is SLIP's rule: biases, LayerNorm/BatchNorm scales and the logit scale/bias (all
    ndim < 2) are not decayed.
    """
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ optional global-norm clipping) from `config.optim`; returns (tx, schedule)."""
    warmup_steps = int(round(cfg.get("warmup_epochs", 1.0) * steps_per_epoch))
    if cfg.get("warmup_steps", -1) >= 0:
        warmup_steps = int(cfg.warmup_steps)
    schedule = warmup_cosine(
        cfg.lr, total_steps, warmup_steps, cfg.get("start_lr", 1e-6), cfg.get("end_lr", 1e-5)
    )
    chain = []
    if cfg.get("grad_clip_norm", 0.0):
        chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    chain.append(
        optax.adamw(
            schedule,
            b1=cfg.get("b1", 0.9),
            b2=cfg.get("b2", 0.98),
            eps=cfg.get("eps", 1e-8),
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*chain), schedule
