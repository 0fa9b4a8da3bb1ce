"""The training loop: `Trainer(config, workdir).run()` trains, checkpoints and resumes.

It builds the mesh, model, optimizer, data iterator and jitted step from a config, restores
the latest checkpoint (or initialises, optionally from other weights), logs metrics and calls
an `evaluate(state, step)` callback every `train.eval_every` steps when `main` hands it one
(the trainer never imports evaluation).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from input_pipeline import tokenizers
from mmssl_jax import objectives
from mmssl_jax.config_utils import import_extensions
from mmssl_jax.models.registry import build_model
from mmssl_jax.objectives import outputs as outputs_lib
from mmssl_jax.parallel import mesh as parallel
from mmssl_jax.training import momentum, optim, text_cache
from mmssl_jax.training.param_rules import frozen_params
from mmssl_jax.training.state import (
    TrainState,
    init_state,
    open_tokenizer,
    resolve_model_config,
    state_shardings,
)
from mmssl_jax.training.step import augment_configs, batch_keys_for, make_train_step, term_specs

PENDING_METRICS = "metrics_pending.json"  # the unlogged steps at the last checkpoint
PARAM_TABLE = "param_rules.txt"  # one line per parameter: shape, frozen, lr and wd multipliers


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def epoch_records(data_cfg: ml_collections.ConfigDict) -> int:
    """Samples in one epoch of the training data. One source: its records. A mixture:
    grain's length of the same finite mix (`MapDataset.mix`), which ends when the source with
    the fewest records per unit of weight has been read once, so `train.epochs` counts passes
    over that source (UniCL's 2,889 emoji pairs at weight 0.5 beside Fashion-MNIST's 60,000
    images: 5,778 samples, not 62,889). Sources of weight 0 are not read and do not count."""
    import grain

    from input_pipeline.tfrecord import TFRecordSource

    read = [src for src in data_cfg.sources.values() if float(src.get("weight", 1.0)) > 0]
    sizes = [grain.MapDataset.range(len(TFRecordSource(src.shards))) for src in read]
    if len(sizes) < 2:
        return len(sizes[0]) if sizes else 0
    return len(grain.MapDataset.mix(sizes, [float(src.get("weight", 1.0)) for src in read]))


def total_steps_for(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    if config.train.total_steps > 0:
        return int(config.train.total_steps)
    return max(1, int(round(config.train.epochs * steps_per_epoch)))


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
        # Opened once: the model's vocab size, the pipeline and evaluation share it.
        self.tokenizer = open_tokenizer(config)
        self.model_cfg = resolve_model_config(config, self.tokenizer)
        self.model = build_model(self.model_cfg)
        self.steps_per_epoch = max(1, epoch_records(config.data) // config.train.batch_size)
        self.total_steps = total_steps_for(config, self.steps_per_epoch)
        self.tx, self.schedule = optim.make_optimizer(
            config.optim, self.total_steps, self.steps_per_epoch
        )
        self.data_iter = pipeline.make_train_iterator(
            config.data,
            global_batch_size=config.train.batch_size,
            needs=self.batch_keys,
            tokenizer=self.tokenizer,
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

            table = os.path.join(workdir, PARAM_TABLE)
            os.makedirs(workdir, exist_ok=True)
            with open(table, "w") as f:  # every parameter: shape, train/frozen, lr/wd mult
                f.write(rules_table(config.optim, self.state_shape.params) + "\n")
            logging.info(
                "parameter rules (every parameter's lr and weight-decay multipliers: %s):\n%s",
                table,
                rules_table(config.optim, self.state_shape.params, per_parameter=False),
            )
        self.text_cache = None  # built by run() from the initial state, if cache_text
        self.cache_text, self.cache_drops_tokens = self._plan_text_cache(needed)
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
            frozen_params(config.optim),
        )
        self.train_step = jax.jit(
            step,
            in_shardings=(self.state_sharding, parallel.batch_sharding(self.mesh)),
            out_shardings=(self.state_sharding, replicated),
            donate_argnums=0,
        )

    def _plan_text_cache(self, needed: Sequence[str]) -> tuple[bool, bool]:
        """(cache the locked text tower's features?, drop the tokens from the step's batch?)
        from `train.cache_locked_text`; raises when the tower it would cache is trainable."""
        if not self.config.train.get("cache_locked_text", False):
            return False, False
        readers = [
            n for n in outputs_lib.closure(needed) if "tokens" in outputs_lib.output(n).batch_keys
        ]
        if "text_emb" not in readers:
            logging.info("train.cache_locked_text: no objective term reads text; nothing cached")
            return False, False
        trainable = text_cache.trainable_text_params(
            frozen_params(self.config.optim), self.state_shape.params
        )
        if trainable:
            raise ValueError(
                "train.cache_locked_text=True needs the whole text tower frozen, but "
                f"optim.freeze leaves {len(trainable)} of its parameters trainable (first: "
                f"{trainable[0]}). Lock it (configs/common.py: text_lock=true) or set "
                "--config.train.cache_locked_text=False."
            )
        if jax.process_count() > 1:
            logging.warning(
                "train.cache_locked_text is single-process only; %d processes train, so the "
                "locked text tower runs in the step",
                jax.process_count(),
            )
            return False, False
        return True, readers == ["text_emb"]

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
            from mmssl_jax.training.init_from import maybe_init_from, maybe_load_text_tower

            state = self._init(self.config.seed)
            state = maybe_load_text_tower(state, self.config, self.state_sharding)
            return maybe_init_from(state, self.config, self.state_sharding)
        logging.info("resuming from %s/%d", checkpointer.directory, latest)
        return checkpointer.restore(self.abstract_state(), self.data_iter, latest)

    def batches(self) -> Iterator[dict[str, jax.Array]]:
        for batch in self.data_iter:
            if self.text_cache is not None:
                batch = self.text_cache.add_features(batch, self.cache_drops_tokens)
            yield parallel.to_global(batch, self.mesh)

    def run(
        self,
        preemption=None,
        stop_at: int | None = None,
        evaluate: Callable[[TrainState, int], Any] | None = None,
    ) -> dict[str, float]:
        """Trains to total_steps (resuming if possible); returns the last logged metrics.

        `stop_at` ends this process early at that step with a checkpoint, exactly as a
        preemption would (the schedule still spans total_steps); resuming continues from it.
        `evaluate(state, step)` runs every `train.eval_every` steps before the last (> 0;
        the caller evaluates the final state); `main` passes evaluation's callback.
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
        if self.cache_text:
            self.text_cache = text_cache.LockedTextCache(
                self.model.text_encoder,
                state.params["text_encoder"],
                max_entries=cfg.get("text_cache_entries", 500_000),
                mesh=self.mesh,
            )
        # The steps since the last log row, kept through a checkpoint, so a resumed run logs
        # exactly the rows of an uninterrupted one.
        pending: list[tuple[int, dict]] = self._load_pending(start)
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
        data_time = 0.0  # seconds waited for input since the last log row
        in_flight = None  # the previous step's metrics: ready once that step has run
        every = int(cfg.get("eval_every", -1))
        try:
            for step in range(start, self.total_steps):
                t_wait = time.perf_counter()
                batch = next(batches)
                data_time += time.perf_counter() - t_wait
                state, metrics = step_fn(state, batch)
                done = step + 1
                pending.append((done, metrics))
                # The bar counts completed steps, not dispatched ones: one step stays in
                # flight (its input is being prepared) while the previous one is awaited.
                if in_flight is not None:
                    jax.block_until_ready(in_flight)
                    bar.update(1)
                in_flight = metrics
                if done % cfg.log_every == 0 or done == self.total_steps:
                    jax.block_until_ready(metrics)
                    bar.update(1)
                    in_flight = None
                    elapsed = time.perf_counter() - t0
                    timing = {
                        "img_per_s": (done - n0) * cfg.batch_size / elapsed,
                        "step_time": elapsed / (done - n0),
                        "data_time": data_time / (done - n0),
                    }
                    if self.text_cache is not None:  # since the start of this process
                        stats = self.text_cache.stats()
                        timing["text_cache/hit_rate"] = stats["hit_rate"]
                        timing["text_cache/entries"] = stats["entries"]
                    last = self._flush(pending, writer, timing)
                    t0, n0, data_time = time.perf_counter(), done, 0.0
                    bar.set_postfix(
                        loss=f"{last['loss']:.4f}",
                        img_s=f"{timing['img_per_s']:.0f}",
                        data=f"{timing['data_time'] / timing['step_time']:.0%}",
                    )
                stopping = preemption.requested.is_set() or done == stop_at
                if stopping or (done % cfg.ckpt_every == 0 and done != self.total_steps):
                    self._save_pending(pending, done)
                    if ckpt.latest_step() != done:
                        ckpt.save(done, state, self.data_iter, force=stopping)
                if every > 0 and evaluate and done % every == 0 and done != self.total_steps:
                    evaluate(state, done)
                if stopping:
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

    def _pending_path(self) -> str:
        return os.path.join(self.workdir, PENDING_METRICS)

    def _save_pending(self, pending: list, step: int) -> None:
        """Writes the metrics of the steps since the last log row beside the checkpoint of
        `step` (process 0), atomically."""
        if jax.process_index() != 0:
            return
        rows = [
            (s, {k: float(np.asarray(v)) for k, v in m.items()}) for s, m in jax.device_get(pending)
        ]
        tmp = self._pending_path() + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"step": step, "rows": rows}, f)
        os.replace(tmp, self._pending_path())

    def _load_pending(self, start: int) -> list[tuple[int, dict]]:
        """The steps since the last log row of the checkpoint resumed at `start`, if saved."""
        try:
            with open(self._pending_path()) as f:
                saved = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return []
        if saved.get("step") != start:
            return []
        return [(int(s), dict(m)) for s, m in saved["rows"]]

    def _flush(self, pending: list, writer, timing: Mapping[str, float]) -> dict[str, float]:
        """Fetches pending metrics, halts on a non-finite streak, writes interval averages
        (with the interval's img/s, seconds per step and seconds waited for input)."""
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
        summary.update(timing)
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


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError on what a typo breaks (objective terms and their options, encoder
    names), before anything is built or written."""
    from mmssl_jax.models.registry import IMAGE_ENCODERS, TEXT_ENCODERS

    import_extensions(config.get("extensions") or ())
    for name, _, options in term_specs(config):
        objectives.get_term(name, **options)
    image = config.model.get("image_encoder")
    if image not in IMAGE_ENCODERS:
        raise ValueError(
            f"model.image_encoder={image!r} is not an image encoder; "
            f"valid: {sorted(IMAGE_ENCODERS)}"
        )
    text = config.model.get("text_encoder")
    if text and text not in TEXT_ENCODERS:
        raise ValueError(
            f"model.text_encoder={text!r} is not a text encoder; valid: {sorted(TEXT_ENCODERS)}"
        )


PATH_KEYS = ("shards", "train_shards", "test_shards", "classnames", "label_map", "groups")


def _absolute(value: str) -> str:
    """Each comma-separated path or glob made absolute (relative to the current folder)."""
    return ",".join(os.path.abspath(p) if p else p for p in str(value).split(","))


def pin_paths(config: ml_collections.ConfigDict, workdir: str, copy_tokenizer: bool = True) -> None:
    """Makes the run independent of the folder it started in: data, evaluation and
    init-from paths absolute, and the tokenizer copied into the workdir (config.data.tokenizer
    then names the copy), so export and `--mode=eval` work from anywhere."""
    for source in (config.data.get("sources") or {}).values():
        for key in PATH_KEYS:
            if source.get(key):
                source[key] = _absolute(source[key])
    for evaluation in (config.get("evals") or {}).values():
        for key in PATH_KEYS:
            if evaluation.get(key):
                evaluation[key] = _absolute(evaluation[key])
        templates = evaluation.get("templates")
        if templates and str(templates).endswith(".json"):
            evaluation["templates"] = _absolute(templates)
    ridge = (config.get("eval_baselines") or {}).get("ridge_map")
    if ridge and ridge.get("shards"):
        ridge.shards = _absolute(ridge.shards)
    init = config.get("init_from")
    if init and init.get("path") and os.path.exists(init.path):
        init.path = os.path.abspath(init.path)
    tokenizer = config.data.get("tokenizer")
    if not tokenizer or tokenizer in tokenizers.PACKAGED:  # packaged ones go by name
        return
    source = os.path.abspath(tokenizer)
    name = os.path.basename(source)
    suffix = ".txt.gz" if name.endswith(".txt.gz") else os.path.splitext(name)[1]
    copy = os.path.join(os.path.abspath(workdir), f"tokenizer{suffix}")
    if os.path.isfile(source) and source != copy:
        if copy_tokenizer:
            shutil.copyfile(source, copy)
        config.data.tokenizer = copy
    elif os.path.isfile(copy):  # the data moved since training: the workdir keeps its copy
        config.data.tokenizer = copy
    else:
        config.data.tokenizer = source
