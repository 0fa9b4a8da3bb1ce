"""Evaluation of a run: encoders from model variables, then `run_evals`.

`main` hands the trainer `make_evaluate(...)` as its `evaluate(state, step)` callback (the
trainer never imports evaluation), and `--mode=eval` calls `evaluate_checkpoint`, which reads
only the checkpoint's model variables and the evaluation data, never the training shards.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from absl import logging

from mmssl_jax.evaluation.model_encoder import ModelEncoder
from mmssl_jax.evaluation.runner import run_evals
from mmssl_jax.models.registry import build_model
from mmssl_jax.training.restore import restore_variables
from mmssl_jax.training.state import init_variables, open_tokenizer


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    variables = {"params": jax.device_get(params)}
    if batch_stats:
        variables["batch_stats"] = jax.device_get(batch_stats)
    return variables


def make_evaluate(
    config: Any,
    workdir: str,
    model: Any,
    model_cfg: Any,
    *,
    tokenizer: Any = None,
    mesh: Any = None,
) -> Callable[[Any, int], dict[str, float]]:
    """`evaluate(state_or_variables, step) -> metrics`: `config.evals` on the model, beside
    raw pixels and the same architecture at random init; writes `workdir/eval/`."""
    if tokenizer is None and model.text_encoder is not None:
        tokenizer = open_tokenizer(config)
    length = model_cfg.get("context_length", config.data.text_length)
    size = getattr(model.image_encoder, "image_size", None) or config.data.image_size
    blocks = any(e.get("layers") for e in config.evals.values()) if config.get("evals") else False

    def encoder(variables: dict[str, Any]) -> ModelEncoder:
        return ModelEncoder(
            model, variables, tokenizer, text_length=length, with_blocks=blocks, mesh=mesh
        )

    def random_encoder() -> ModelEncoder:
        # The trainer's init with seed + 1, jitted as the trainer's is: eager init differs
        # from it in the last bit of some kernels.
        init = jax.jit(functools.partial(init_variables, model, size, length))
        return encoder(jax.device_get(init(config.seed + 1)))

    def evaluate(state: Any, step: int) -> dict[str, float]:
        if not config.get("evals"):
            return {}
        if isinstance(state, dict):
            variables = state
        else:
            variables = _variables(state.params, state.batch_stats)
        logging.info("evaluating step %d", step)
        return run_evals(
            config.evals,
            encoder(variables),
            workdir=workdir,
            step=int(step),
            random_encoder=random_encoder,
        )

    return evaluate


def evaluate_checkpoint(config: Any, workdir: str, step: int | None = None) -> dict[str, float]:
    """`--mode=eval`: the latest (or `step`) checkpoint's model variables, evaluated."""
    model_cfg, variables, step = restore_variables(config, workdir, step)
    model = build_model(model_cfg)
    return make_evaluate(config, workdir, model, model_cfg)(variables, step)


def evaluate_latest(trainer: Any) -> dict[str, float]:
    """config.evals on a Trainer's final state, or on its workdir's latest checkpoint."""
    state = getattr(trainer, "state", None)
    if state is None:
        return evaluate_checkpoint(trainer.config, trainer.workdir)
    evaluate = make_evaluate(
        trainer.config,
        trainer.workdir,
        trainer.model,
        trainer.model_cfg,
        tokenizer=getattr(trainer, "tokenizer", None),
        mesh=trainer.mesh,
    )
    return evaluate(state, int(jax.device_get(state.step)))
