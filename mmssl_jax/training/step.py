"""The pure train step, one jitted function over global arrays on a ("data",) mesh:

    uint8 views -> device augmentation -> encoders (GSPMD over the batch) -> the outputs the
    objective terms declare (objectives/outputs.py) -> terms under jax.shard_map with
    all-gathered embeddings -> grads -> AdamW -> clamp scale

A non-finite loss or gradient skips the update (params, optimizer and batch statistics stay
as they were) and is counted; the loop halts after `train.max_bad_steps` in a row.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from input_pipeline import augment
from mmssl_jax import objectives
from mmssl_jax.models.model import MultimodalModel
from mmssl_jax.objectives import outputs as outputs_lib
from mmssl_jax.training import momentum
from mmssl_jax.training.state import TrainState, clamp_logit_scale


def term_specs(config: ml_collections.ConfigDict) -> list[tuple[str, float, dict]]:
    """[(name, weight, options)] from config.objectives and config.objective_options."""
    options = config.get("objective_options") or {}
    specs = []
    for name, weight in config.objectives:
        opts = options.get(name)
        specs.append((name, float(weight), dict(opts) if opts else {}))
    return specs


def batch_keys_for(specs: Sequence[tuple[str, float, dict]]) -> set[str]:
    """The batch arrays the pipeline must produce for these objective terms."""
    return objectives.batch_keys(list(specs))


def augment_configs(config: ml_collections.ConfigDict) -> outputs_lib.ViewAugments:
    """The device augmentation of each view: `config.augment` for both SSL views (view b
    with `config.augment_view_b`'s fields over it: MoCo v3's blur 1.0 / 0.1, solarize
    0 / 0.2), and `config.augment_image` for the CLIP image when any of its probabilities is
    above 0 (else None: the image goes in as cropped)."""
    view_a = augment.make_config(config.augment)
    overrides = config.get("augment_view_b")
    view_b = view_a
    if overrides:
        view_b = augment.make_config({**config.augment.to_dict(), **dict(overrides)})
    image = config.get("augment_image")
    image = augment.make_config(image) if image else None
    if image is not None and not augment.is_active(image):
        image = None
    return outputs_lib.ViewAugments(view_a, view_b, image)


def _microbatches(batch: Mapping[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """[B, ...] -> [k, B/k, ...] taking every k-th row, so each microbatch stays spread over
    all devices of the data axis."""
    return {
        name: jnp.moveaxis(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 1, 0)
        for name, x in batch.items()
    }


def _all_finite(tree: Any) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _select(ok: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


# (params, batch_stats, batch, key, ema) -> (loss, (metrics, new batch_stats))
LossFn = Callable[..., tuple[jax.Array, tuple[dict[str, jax.Array], Any]]]
# params -> the same tree of bools, True where the parameter is frozen
FrozenFn = Callable[[Any], Any]


def without_frozen_grads(loss_fn: LossFn, frozen: FrozenFn | None) -> LossFn:
    """`loss_fn` with `stop_gradient` on the frozen parameters, so autodiff drops every
    backward op that only feeds them: a locked tower (LiT) runs its forward alone. Their
    gradients come back as zeros, which the optimizer's frozen branch ignores anyway."""
    if frozen is None:
        return loss_fn

    def wrapped(params, *args, **kwargs):
        mask = frozen(params)
        params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, mask)
        return loss_fn(params, *args, **kwargs)

    return wrapped


def make_train_step(
    model: MultimodalModel,
    tx: optax.GradientTransformation,
    specs: Sequence[tuple[str, float, dict]],
    mesh: jax.sharding.Mesh | None,
    aug_cfg: Any,
    grad_accum: int = 1,
    schedule: optax.Schedule | None = None,
    momentum_schedule: optax.Schedule | None = None,
    frozen: FrozenFn | None = None,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure `train_step(state, batch) -> (state, metrics)` of the objective terms `specs`
    (not yet jitted): `make_step` over `objective_loss`.

    `momentum_schedule` (step -> m) drives the EMA of `state.ema_params` when it is set;
    `frozen` (params -> tree of bools) names the parameters whose gradient is not needed."""
    loss_fn = objective_loss(model, specs, mesh, aug_cfg)
    return make_step(tx, loss_fn, grad_accum, schedule, momentum_schedule, frozen)


def objective_loss(
    model: MultimodalModel,
    specs: Sequence[tuple[str, float, dict]],
    mesh: jax.sharding.Mesh | None,
    aug_cfg: Any,
) -> LossFn:
    """The weighted objective terms on the outputs they declare (device augmentation and
    the encoders inside), as a `LossFn`; MoCo v3's keys come from the `ema` parameters."""
    # "index" (always in the batch) too: per-sample keys and fault injection read it.
    needed = sorted(objectives.needed_inputs(list(specs)) | {"index"})

    def loss_fn(params, batch_stats, batch, key, ema=None):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        forward = functools.partial(outputs_lib.compute, names=needed)
        outputs, mutated = model.apply(
            variables, batch, key, aug_cfg, True, method=forward, mutable=["batch_stats"]
        )
        if ema is not None:  # MoCo v3 keys from the momentum encoder; its BN updates dropped
            keys, _ = model.apply(
                {**variables, "params": momentum.merged(params, ema)},
                batch,
                key,
                aug_cfg,
                True,
                method=functools.partial(forward, momentum=True),
                mutable=["batch_stats"],
            )
            outputs = {**outputs, **jax.lax.stop_gradient(keys)}
        loss, metrics = objectives.total_loss(specs, outputs, mesh)
        return loss, (metrics, mutated.get("batch_stats", batch_stats))

    return loss_fn


def make_step(
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    grad_accum: int = 1,
    schedule: optax.Schedule | None = None,
    momentum_schedule: optax.Schedule | None = None,
    frozen: FrozenFn | None = None,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure step of any `loss_fn` over a TrainState: gradients (accumulated over
    `grad_accum` microbatches; none through `frozen` parameters), the optimizer, the
    logit-scale clamp, the skip of a non-finite update, the counters and the metrics.
    Pretraining and fine-tuning share it."""
    grad_fn = jax.value_and_grad(without_frozen_grads(loss_fn, frozen), has_aux=True)

    def accumulate(params, batch_stats, batch, key, ema):
        if grad_accum == 1:
            (loss, (metrics, stats)), grads = grad_fn(params, batch_stats, batch, key, ema)
            return loss, metrics, stats, grads

        def body(carry, micro):
            stats, grad_sum, i = carry
            (loss, (metrics, stats)), grads = grad_fn(
                params, stats, micro, jax.random.fold_in(key, i), ema
            )
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            return (stats, grad_sum, i + 1), (loss, metrics)

        zeros = jax.tree.map(jnp.zeros_like, params)
        (stats, grad_sum, _), (losses, metrics) = jax.lax.scan(
            body, (batch_stats, zeros, 0), _microbatches(batch, grad_accum)
        )
        grads = jax.tree.map(lambda g: g / grad_accum, grad_sum)
        return losses.mean(), jax.tree.map(jnp.mean, metrics), stats, grads

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        loss, metrics, new_stats, grads = accumulate(
            state.params, state.batch_stats, batch, key, state.ema_params
        )
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = clamp_logit_scale(optax.apply_updates(state.params, updates))
        ok = jnp.isfinite(loss) & _all_finite(grads)
        bad = jnp.logical_not(ok).astype(jnp.int32)
        new_ema, m = state.ema_params, None
        if state.ema_params is not None:  # MoCo v3: the momentum m of the coming step
            m = momentum_schedule(state.step + 1)
            new_ema = _select(ok, momentum.ema_update(state.ema_params, new_params, m), new_ema)
        new_state = state.replace(
            ema_params=new_ema,
            step=state.step + 1,
            params=_select(ok, new_params, state.params),
            batch_stats=_select(ok, new_stats, state.batch_stats),
            opt_state=_select(ok, new_opt, state.opt_state),
            skipped_steps=state.skipped_steps + bad,
            bad_streak=(state.bad_streak + 1) * bad,
        )
        metrics = dict(metrics)
        metrics.update(
            loss=loss,
            grad_norm=optax.tree.norm(grads),
            param_norm=optax.tree.norm(state.params),
            skipped_steps=new_state.skipped_steps,
            bad_streak=new_state.bad_streak,
        )
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        if m is not None:
            metrics["momentum"] = m
        if "skipped" in batch:
            metrics["data/skipped_records"] = jnp.sum(batch["skipped"])
        return new_state, metrics

    return train_step
