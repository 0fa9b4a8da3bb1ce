"""TrainState, the pure train step, and the training loop.

The step is one jitted function over global arrays on a ("data",) mesh:

    uint8 views -> device augmentation -> encoders (GSPMD over the batch) -> objective terms
    (each under jax.shard_map with all-gathered embeddings) -> grads -> AdamW -> clamp scale

Model parameters and optimizer state are replicated (data parallel), or sharded by their
largest dimension with `train.fsdp` (sharding_rules.py); the batch is sharded on its leading
axis. A non-finite loss or gradient skips the update (params, optimizer and batch
statistics stay as they were), is counted, and N in a row halt the run with a clear message.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from input_pipeline import augment
from mmssl_jax import objectives
from mmssl_jax.config_utils import import_extensions
from mmssl_jax.models.model import MultimodalModel
from mmssl_jax.models.registry import build_model
from mmssl_jax.objectives import outputs as outputs_lib
from mmssl_jax.parallel import mesh as parallel
from mmssl_jax.training import momentum, optim

LOG_MAX_SCALE = math.log(100.0)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; one pytree, checkpointed whole."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    skipped_steps: jax.Array  # updates skipped for a non-finite loss/grad, in total
    bad_streak: jax.Array  # consecutive skipped updates up to now
    # MoCo v3's momentum encoder (mmssl_jax/training/momentum.py); None unless a term needs it.
    ema_params: Any = None


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


def augment_configs(config: ml_collections.ConfigDict) -> Any:
    """`config.augment` for both SSL views, or a pair when `config.augment_view_b` overrides
    some fields for the second view (MoCo v3: blur 1.0 / 0.1, solarize 0 / 0.2)."""
    cfg = augment.make_config(config.augment)
    overrides = config.get("augment_view_b")
    if not overrides:
        return cfg
    return cfg, augment.make_config({**config.augment.to_dict(), **dict(overrides)})


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


def clamp_logit_scale(params: Any) -> Any:
    """CLIP/SLIP clamp the log logit scale to [0, log 100] after every step."""
    if "logit_scale" not in params:
        return params
    params = dict(params)
    params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, LOG_MAX_SCALE)
    return params


def make_train_step(
    model: MultimodalModel,
    tx: optax.GradientTransformation,
    specs: Sequence[tuple[str, float, dict]],
    mesh: jax.sharding.Mesh | None,
    aug_cfg: Any,
    grad_accum: int = 1,
    schedule: optax.Schedule | None = None,
    momentum_schedule: optax.Schedule | None = None,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure `train_step(state, batch) -> (state, metrics)` (not yet jitted).

    `momentum_schedule` (step -> m) drives the EMA of `state.ema_params` when it is set."""

    needed = sorted(objectives.needed_inputs(list(specs)))

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

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

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


def init_state(
    model: MultimodalModel,
    tx: optax.GradientTransformation,
    image_size: int,
    context_length: int | None,
    seed: int,
    ema: bool = False,
) -> TrainState:
    """A fresh TrainState (call under jit with replicated out_shardings); `ema` adds MoCo
    v3's momentum copy of the image encoder and projector."""
    rng = jax.random.key(seed)
    init_rng, state_rng = jax.random.split(rng)
    images = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    tokens = None
    if model.text_encoder is not None:
        tokens = jnp.ones((2, context_length), jnp.int32)
    variables = model.init(init_rng, images, tokens, train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=jax.random.key_data(state_rng),
        skipped_steps=jnp.zeros((), jnp.int32),
        bad_streak=jnp.zeros((), jnp.int32),
        ema_params=momentum.init_ema(params) if ema else None,
    )


# ----------------------------------------------------------------------------- the loop


def num_records(data_cfg: ml_collections.ConfigDict) -> int:
    """Records over all training sources (an epoch is this many samples)."""
    from input_pipeline.tfrecord import TFRecordSource

    return sum(len(TFRecordSource(src.shards)) for src in data_cfg.sources.values())


def total_steps_for(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    if config.train.total_steps > 0:
        return int(config.train.total_steps)
    return max(1, int(round(config.train.epochs * steps_per_epoch)))


def resolve_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The model config with vocab_size read from the tokenizer when it is -1."""
    model_cfg = ml_collections.ConfigDict(config.model.to_dict())
    if model_cfg.get("text_encoder") and model_cfg.get("vocab_size", -1) <= 0:
        from input_pipeline.tokenizers.spm import Tokenizer

        model_cfg.vocab_size = Tokenizer(config.data.tokenizer).vocab_size
    return model_cfg


def state_shardings(train_cfg: Mapping[str, Any], state_shape: Any, mesh: jax.sharding.Mesh) -> Any:
    """Shardings of the train state: replicated (data parallel), or FSDP with `train.fsdp`."""
    if not train_cfg.get("fsdp", False):
        replicated = parallel.replicated(mesh)
        return jax.tree.map(lambda _: replicated, state_shape)
    from mmssl_jax.parallel import sharding_rules

    min_bytes = int(float(train_cfg.get("fsdp_min_size_mb", 4.0)) * 2**20)
    return sharding_rules.state_shardings(state_shape, mesh, min_size_bytes=min_bytes)


class Trainer:
    """Builds everything a run needs from a config; `run()` trains, resumes and evaluates."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        from input_pipeline import pipeline

        self.config, self.workdir = config, workdir
        import_extensions(config.get("extensions") or ())
        num_devices = config.train.num_devices if config.train.num_devices > 0 else None
        self.mesh = parallel.make_mesh(num_devices)
        parallel.check_batch_divisible(config.train.batch_size, self.mesh)
        if config.train.batch_size % (config.train.grad_accum * self.mesh.size):
            raise ValueError(
                f"train.batch_size={config.train.batch_size} must divide into "
                f"train.grad_accum={config.train.grad_accum} microbatches over "
                f"{self.mesh.size} devices"
            )
        self.specs = term_specs(config)
        self.batch_keys = batch_keys_for(self.specs)
        self.model_cfg = resolve_model_config(config)
        self.model = build_model(self.model_cfg)
        self.steps_per_epoch = max(1, num_records(config.data) // config.train.batch_size)
        self.total_steps = total_steps_for(config, self.steps_per_epoch)
        self.tx, self.schedule = optim.make_optimizer(
            config.optim, self.total_steps, self.steps_per_epoch
        )
        self.data_iter = pipeline.make_train_iterator(
            config.data,
            global_batch_size=config.train.batch_size,
            needs=self.batch_keys,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        replicated = parallel.replicated(self.mesh)
        # MoCo v3: a momentum encoder in the state, moved by a cosine momentum schedule.
        needed = objectives.needed_inputs(self.specs)
        outputs_lib.check_model(self.model, needed, [name for name, _, _ in self.specs])
        self.use_ema = outputs_lib.needs_momentum(needed)
        mom_cfg = config.get("momentum") or {}
        self.momentum_schedule = momentum.momentum_schedule(
            mom_cfg.get("base", 0.99), self.total_steps, mom_cfg.get("final", 1.0)
        )
        init = functools.partial(
            init_state,
            self.model,
            self.tx,
            config.data.image_size,
            self.model_cfg.get("context_length", config.data.text_length),
            ema=self.use_ema,
        )
        self.state_shape = jax.eval_shape(init, config.seed)
        if jax.process_index() == 0:
            from mmssl_jax.training.param_rules import rules_table

            logging.info(
                "parameter rules:\n%s",
                rules_table(config.optim, self.state_shape.params, per_parameter=False),
            )
        self.state_sharding = state_shardings(config.train, self.state_shape, self.mesh)
        self._init = jax.jit(init, static_argnums=0, out_shardings=self.state_sharding)
        step = make_train_step(
            self.model,
            self.tx,
            self.specs,
            self.mesh,
            augment_configs(config),
            config.train.grad_accum,
            self.schedule,
            self.momentum_schedule if self.use_ema else None,
        )
        self.train_step = jax.jit(
            step,
            in_shardings=(self.state_sharding, parallel.batch_sharding(self.mesh)),
            out_shardings=(self.state_sharding, replicated),
            donate_argnums=0,
        )

    def abstract_state(self) -> TrainState:
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            self.state_shape,
            self.state_sharding,
        )

    def initial_state(self, checkpointer) -> TrainState:
        """Restores the latest checkpoint in the workdir, or initialises."""
        latest = checkpointer.latest_step()
        if latest is None:
            from mmssl_jax.training.init_from import maybe_init_from

            return maybe_init_from(self._init(self.config.seed), self.config, self.state_sharding)
        logging.info("resuming from %s/%d", checkpointer.directory, latest)
        return checkpointer.restore(self.abstract_state(), self.data_iter, latest)

    def batches(self) -> Iterator[dict[str, jax.Array]]:
        for batch in self.data_iter:
            yield parallel.to_global(batch, self.mesh)

    def run(self, preemption=None, stop_at: int | None = None) -> dict[str, float]:
        """Trains to total_steps (resuming if possible); returns the last logged metrics.

        `stop_at` ends this process early at that step with a checkpoint, exactly as a
        preemption would (the schedule still spans total_steps); resuming continues from it.
        """
        from mmssl_jax.training.checkpoint import Checkpointer, PreemptionHandler
        from mmssl_jax.training.metrics_writer import MetricWriter

        cfg = self.config.train
        is_main = jax.process_index() == 0
        ckpt = Checkpointer(self.workdir, keep=cfg.keep_ckpts)
        writer = MetricWriter(self.workdir) if is_main else None
        preemption = preemption or PreemptionHandler().install()
        state = self.initial_state(ckpt)
        start = int(jax.device_get(state.step))
        pending: list[tuple[int, dict]] = []
        last: dict[str, float] = {}
        bar = tqdm(
            total=self.total_steps,
            initial=start,
            disable=not (cfg.progress and is_main),
            unit="step",
            dynamic_ncols=True,
        )
        batches = self.batches()
        step_fn = self.train_step
        if jax.process_count() > 1 and start < self.total_steps:
            step_fn, batches = self._compile_together(state, batches)
        t0, n0 = time.perf_counter(), start
        try:
            for step in range(start, self.total_steps):
                state, metrics = step_fn(state, next(batches))
                pending.append((step + 1, metrics))
                bar.update(1)
                done = step + 1
                if done % cfg.log_every == 0 or done == self.total_steps:
                    # Steps are dispatched asynchronously: wait for this one before timing.
                    jax.block_until_ready(metrics)
                    rate = (done - n0) * cfg.batch_size / (time.perf_counter() - t0)
                    last = self._flush(pending, writer, rate)
                    t0, n0 = time.perf_counter(), done
                    bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{rate:.0f}")
                if done % cfg.ckpt_every == 0 and done != self.total_steps:
                    ckpt.save(done, state, self.data_iter)
                if preemption.requested.is_set() or done == stop_at:
                    self._flush(pending, writer, 0.0)
                    if ckpt.latest_step() != done:
                        ckpt.save(done, state, self.data_iter, force=True)
                    ckpt.wait()
                    logging.warning("preempted: checkpoint at step %d written; exiting", done)
                    self.stopped_early = True
                    return last
            if start < self.total_steps or ckpt.latest_step() != self.total_steps:
                ckpt.save(self.total_steps, state, self.data_iter, force=True)
        finally:
            bar.close()
            ckpt.close()
            if writer is not None:
                writer.close()
            preemption.uninstall()
        self.state = state
        return last

    def _compile_together(self, state: TrainState, batches: Iterator) -> tuple[Callable, Iterator]:
        """Compiles the step ahead of time, then waits for every process (see
        `distributed.barrier`); returns the compiled step and the batches, first one kept."""
        import itertools

        from mmssl_jax.parallel import distributed

        first = next(batches)
        compiled = self.train_step.lower(state, first).compile()
        distributed.barrier("mmssl_jax/train_step_compiled")
        return compiled, itertools.chain([first], batches)

    def _flush(self, pending: list, writer, rate: float) -> dict[str, float]:
        """Fetches pending metrics, halts on a non-finite streak, writes interval averages."""
        if not pending:
            return {}
        rows = jax.device_get(pending)
        pending.clear()
        for step, metrics in rows:
            if float(metrics["bad_streak"]) >= self.config.train.max_bad_steps:
                raise NonFiniteError(
                    f"step {step}: {int(metrics['bad_streak'])} consecutive steps with a "
                    "non-finite loss or gradient (updates skipped). The last checkpoint in "
                    f"{self.workdir}/checkpoints is intact. Lower optim.lr, set "
                    "optim.grad_clip_norm, or check the data (data.skip_bad_records)."
                )
        summary = summarize([m for _, m in rows])
        summary["img_per_s"] = rate
        if writer is not None:
            writer.write(rows[-1][0], summary)
        return summary


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """One log row per interval: means, except counters (last) and skipped records (sum)."""
    out = {}
    for key in rows[-1]:
        values = np.array([float(np.asarray(r[key])) for r in rows])
        if key in ("skipped_steps", "bad_streak"):
            out[key] = float(values[-1])
        elif key == "data/skipped_records":
            out[key] = float(values.sum())
        else:
            out[key] = float(values.mean())
    return out
