"""The optimizer: AdamW with SLIP's schedule and weight-decay rule, as one optax chain."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mmssl_jax.training import param_rules


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


def scale_by_param_mults(mults_fn: Callable[[Any], Any]) -> optax.GradientTransformation:
    """Multiplies each update by a per-parameter python float from `mults_fn(updates)`.

    The multipliers come from parameter paths alone (see mmssl_jax/training/param_rules.py), so they
    are constants at trace time and a multiplier of 1 costs nothing.
    """

    def update_fn(updates, state, params=None):
        del params
        mults = mults_fn(updates)
        return jax.tree.map(lambda u, m: u if m == 1.0 else u * m, updates, mults), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def add_decayed_weights_by_rule(
    weight_decay: float, mults_fn: Callable[[Any], Any]
) -> optax.GradientTransformation:
    """updates + weight_decay * mult * params, with per-parameter mults (0: no decay)."""

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_decayed_weights_by_rule needs the params in tx.update")
        mults = mults_fn(params)
        out = jax.tree.map(
            lambda u, p, m: u if m == 0.0 else u + (weight_decay * m) * p, updates, params, mults
        )
        return out, state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def _adamw_with_rules(
    cfg: ml_collections.ConfigDict, schedule: optax.Schedule, rules: param_rules.Rules
) -> optax.GradientTransformation:
    """AdamW whose weight decay follows the `wd_mults` rules.

    With 0/1 decay multipliers this is exactly `optax.adamw(..., mask=...)` (same state
    tree, so older checkpoints restore).
    """
    wd = float(cfg.weight_decay)
    wd_fn = param_rules.wd_mult_fn(rules)
    binary = all(float(v) in (0.0, 1.0) for _, v in rules.wd_mults)
    decay = (
        optax.add_decayed_weights(wd, mask=lambda p: jax.tree.map(bool, wd_fn(p)))
        if binary
        else add_decayed_weights_by_rule(wd, wd_fn)
    )
    return optax.chain(
        optax.scale_by_adam(
            b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.98), eps=cfg.get("eps", 1e-8)
        ),
        decay,
        optax.scale_by_learning_rate(schedule),
    )


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ optional global-norm clipping) from `config.optim`; returns (tx, schedule).

    Per-parameter controls come from the rule lists in `config.optim` (see
    mmssl_jax/training/param_rules.py): `freeze` (frozen parameters get zero updates and no
    optimizer state: `optax.multi_transform` with `set_to_zero`), `lr_mults` and `layer_decay`
    (lr multipliers), `wd_mults` (weight decay; default SLIP's rule). Gradient clipping
    (`grad_clip_norm` > 0) takes the global norm over the trainable parameters only.
    """
    warmup_steps = int(round(cfg.get("warmup_epochs", 1.0) * steps_per_epoch))
    if cfg.get("warmup_steps", -1) >= 0:
        warmup_steps = int(cfg.warmup_steps)
    schedule = warmup_cosine(
        cfg.lr, total_steps, warmup_steps, cfg.get("start_lr", 1e-6), cfg.get("end_lr", 1e-5)
    )
    rules = param_rules.Rules.from_config(cfg)
    chain = []
    if cfg.get("grad_clip_norm", 0.0):
        chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    chain.append(_adamw_with_rules(cfg, schedule, rules))
    tx = optax.chain(*chain)
    if rules.any_frozen():
        tx = optax.multi_transform(
            {"train": tx, "frozen": optax.set_to_zero()}, param_rules.labels_fn(rules)
        )
    if rules.lr_mults or rules.layer_decay not in (0.0, 1.0):
        # Outside multi_transform: it sees the whole tree, so layer decay counts every block
        # of a tower, frozen ones included (a frozen update is 0 whatever its multiplier).
        tx = optax.chain(tx, scale_by_param_mults(param_rules.lr_mult_fn(rules)))
    return tx, schedule
