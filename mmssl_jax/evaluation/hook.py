"""Evaluation of a run: encoders from model variables, then `run_evals`.

`main` hands the trainer `make_evaluate(...)` as its `evaluate(state, step)` callback (the
trainer never imports evaluation), and `--mode=eval` calls `evaluate_checkpoint`, which reads
only the checkpoint's model variables and the evaluation data, never the training shards.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from mmssl_jax.evaluation.baselines import RidgeMap
from mmssl_jax.evaluation.context import grid_sizes, wants_blocks
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


def params_hash(tree: Any) -> str:
    """A short hash of a parameter tree's paths, shapes, dtypes and values."""
    digest = hashlib.sha1()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        value = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{value.shape}:{value.dtype}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]


def ridge_map_for(config: Any, model_cfg: Mapping, variables: Mapping[str, Any]) -> RidgeMap | None:
    """The ridge-map baseline of `config.eval_baselines.ridge_map` into this model's text
    tower, or None: it needs a pretrained text tower (model.text_encoder "bert" with
    model.text_pretrained), whose target space the image tower did not shape (baselines.py)."""
    settings = (config.get("eval_baselines") or {}).get("ridge_map")
    if not settings or not settings.get("shards"):
        return None
    pretrained = model_cfg.get("text_encoder") == "bert" and model_cfg.get("text_pretrained")
    if not pretrained:
        logging.info("ridge-map baseline not run: the text tower is not a pretrained one")
        return None
    params = variables["params"].get("text_encoder")
    if params is None:
        return None
    text_id = f"{model_cfg.get('text_path', '')}@{params_hash(params)}"
    kwargs = dict(settings.to_dict() if hasattr(settings, "to_dict") else settings)
    if "alphas" in kwargs:
        kwargs["alphas"] = tuple(float(a) for a in kwargs["alphas"])
    return RidgeMap(text_id=text_id, **kwargs)


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
    raw pixels, the same architecture at random init and (text evaluations, a pretrained
    text tower) the ridge map into its text space; writes `workdir/eval/`."""
    if tokenizer is None and model.text_encoder is not None:
        tokenizer = open_tokenizer(config)
    length = model_cfg.get("context_length", config.data.text_length)
    size = getattr(model.image_encoder, "image_size", None) or config.data.image_size
    evals = config.evals.values() if config.get("evals") else ()
    layers = [layer for e in evals for layer in e.get("layers") or ()]
    blocks, grids = wants_blocks(layers), grid_sizes(layers)  # what some evaluation reads

    def encoder(variables: dict[str, Any]) -> ModelEncoder:
        return ModelEncoder(
            model,
            variables,
            tokenizer,
            text_length=length,
            with_blocks=blocks,
            mesh=mesh,
            grids=grids,
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
            ridge_map=ridge_map_for(config, model_cfg, variables),
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
