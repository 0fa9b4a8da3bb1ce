"""Glue between the trainer and the evaluators: encoders from a train state, then run_evals."""

from __future__ import annotations

import os
from typing import Any

import jax
from absl import logging

from mmssl_jax.evaluation.model_encoder import ModelEncoder


def encoders_for(trainer: Any, state: Any) -> tuple[ModelEncoder, Any]:
    """(trained encoder, factory of the same architecture at random init, for baselines)."""
    from input_pipeline.tokenizers.spm import Tokenizer

    cfg = trainer.config
    tokenizer = Tokenizer(cfg.data.tokenizer) if trainer.model.text_encoder else None
    length = trainer.model_cfg.get("context_length", cfg.data.text_length)
    variables = {"params": jax.device_get(state.params)}
    if state.batch_stats:
        variables["batch_stats"] = jax.device_get(state.batch_stats)

    def random_encoder() -> ModelEncoder:
        random_state = jax.device_get(trainer._init(cfg.seed + 1))
        random_vars = {"params": random_state.params}
        if random_state.batch_stats:
            random_vars["batch_stats"] = random_state.batch_stats
        return make(random_vars)

    blocks = any(e.get("layers") for e in cfg.evals.values()) if cfg.get("evals") else False
    make = lambda v: ModelEncoder(  # noqa: E731
        trainer.model, v, tokenizer, text_length=length, with_blocks=blocks, mesh=trainer.mesh
    )
    return make(variables), random_encoder


def evaluate_latest(trainer: Any) -> dict[str, float]:
    """Runs config.evals on the trainer's final state (or the workdir's latest checkpoint)."""
    from mmssl_jax.evaluation import plots
    from mmssl_jax.evaluation.runner import run_evals
    from mmssl_jax.training.checkpoint import Checkpointer
    from mmssl_jax.training.metrics_writer import read_metrics

    state = getattr(trainer, "state", None)
    if state is None:
        ckpt = Checkpointer(trainer.workdir)
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"no checkpoint in {trainer.workdir}/checkpoints to evaluate; train first"
            )
        state = ckpt.restore(trainer.abstract_state(), None)
        ckpt.close()
    step = int(jax.device_get(state.step))
    rows = read_metrics(trainer.workdir)
    if rows and jax.process_index() == 0:
        plots.plot_curves(rows, os.path.join(trainer.workdir, "loss_curve.png"))
    if not trainer.config.get("evals"):
        return {}
    encoder, random_encoder = encoders_for(trainer, state)
    logging.info("evaluating step %d", step)
    return run_evals(
        trainer.config.evals,
        encoder,
        workdir=trainer.workdir,
        step=step,
        random_encoder=random_encoder,
    )
