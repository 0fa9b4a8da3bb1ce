"""The train state: what a step reads and writes, how it is initialised and laid out.

Model parameters and optimizer state are replicated (data parallel), or sharded by their
largest dimension with `train.fsdp` (parallel/sharding_rules.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from input_pipeline import tokenizers
from mmssl_jax.models import bert
from mmssl_jax.models.model import MultimodalModel
from mmssl_jax.models.registry import bert_model_config
from mmssl_jax.parallel import mesh as parallel
from mmssl_jax.training import momentum

LOG_MAX_SCALE = math.log(100.0)


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


def clamp_logit_scale(params: Any) -> Any:
    """CLIP/SLIP clamp the log logit scale to [0, log 100] after every step."""
    if "logit_scale" not in params:
        return params
    params = dict(params)
    params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, LOG_MAX_SCALE)
    return params


def init_variables(
    model: MultimodalModel, image_size: int, context_length: int | None, seed: int
) -> dict[str, Any]:
    """The model's variables at initialisation from `seed`: exactly the parameters a fresh
    `init_state(..., seed)` holds (evaluation's random-init baseline uses seed + 1)."""
    init_rng, _ = jax.random.split(jax.random.key(seed))
    images = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    tokens = None
    if model.text_encoder is not None:
        tokens = jnp.ones((2, context_length), jnp.int32)
    return model.init(init_rng, images, tokens, train=False)


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
    _, state_rng = jax.random.split(jax.random.key(seed))
    variables = init_variables(model, image_size, context_length, seed)
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


def resolve_model_config(
    config: ml_collections.ConfigDict, tokenizer: Any = None
) -> ml_collections.ConfigDict:
    """The model config with vocab_size read from the tokenizer when it is -1 (`tokenizer`,
    when the caller has it open, else `config.data.tokenizer`)."""
    model_cfg = ml_collections.ConfigDict(config.model.to_dict())
    if model_cfg.get("text_encoder") == "bert":  # sizes and vocab from the checkpoint
        return ml_collections.ConfigDict(bert_model_config(model_cfg.to_dict()))
    if model_cfg.get("text_encoder") and model_cfg.get("vocab_size", -1) <= 0:
        if tokenizer is None:
            tokenizer = open_tokenizer(config)
        model_cfg.vocab_size = tokenizer.vocab_size
    return model_cfg


def tokenizer_path(config: ml_collections.ConfigDict) -> str:
    """`config.data.tokenizer`, or a pretrained BERT tower's own tokenizer.json."""
    if config.data.get("tokenizer"):
        return config.data.tokenizer
    if config.model.get("text_encoder") == "bert":
        return str(bert.find_bert_dir(config.model.text_path) / "tokenizer.json")
    raise ValueError("config.data.tokenizer is not set (a text tower needs a tokenizer)")


def open_tokenizer(config: ml_collections.ConfigDict) -> Any:
    """The run's tokenizer (see `tokenizer_path`; the kind by its file name), or None
    without a text tower."""
    if not config.model.get("text_encoder"):
        return None
    return tokenizers.open_tokenizer(tokenizer_path(config))


def state_shardings(train_cfg: Mapping[str, Any], state_shape: Any, mesh: jax.sharding.Mesh) -> Any:
    """Shardings of the train state: replicated (data parallel), or FSDP with `train.fsdp`."""
    if not train_cfg.get("fsdp", False):
        replicated = parallel.replicated(mesh)
        return jax.tree.map(lambda _: replicated, state_shape)
    from mmssl_jax.parallel import sharding_rules

    min_bytes = int(float(train_cfg.get("fsdp_min_size_mb", 4.0)) * 2**20)
    return sharding_rules.state_shardings(state_shape, mesh, min_size_bytes=min_bytes)
