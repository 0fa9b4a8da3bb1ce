"""A run's model variables from its checkpoint, without the training data or the optimizer.

What export, `--mode=eval` and evaluation read: only `params` / `batch_stats` of the model the
config builds (an orbax partial restore), onto one device.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from mmssl_jax.config_utils import import_extensions
from mmssl_jax.models.saved import (
    check_variables,
    expected_shapes,
    flatten_variables,
    unflatten_variables,
)

CONFIG_FILE = "config.json"


def save_config(config: Any, workdir: str) -> str:
    """Writes the run's `workdir/config.json` (what `load_config` reads back); its path."""
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path, "w") as f:
        json.dump(config.to_dict(), f, indent=2, default=str)
    return path


def load_config(workdir: str, config: Any = None) -> Any:
    """`config` as given, or the run's `workdir/config.json` (written by mmssl_jax.main)."""
    import ml_collections

    if config is not None:
        return config
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: pass the training config (--config=configs/NAME.py)"
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_variables(config: Any, workdir: str, step: int | None = None) -> tuple[Any, dict, int]:
    """(resolved model config, {"params", ["batch_stats"]}, step) from a run's checkpoint.

    Restores only the variables `build_model(model config)` creates (an orbax partial
    restore of the TrainState's `params` / `batch_stats`): the optimizer state, EMA copies
    and training-only heads are not read, so the export does not depend on how the trainer
    lays out the rest of its state. Arrays land on one device, whatever mesh wrote them.
    """
    from mmssl_jax.models.registry import build_model
    from mmssl_jax.training.checkpoint import (
        Checkpointer,
        CheckpointMismatchError,
        checkpoints_dir,
    )
    from mmssl_jax.training.state import resolve_model_config

    import_extensions(config.get("extensions") or ())  # a user's heads build as in training
    ckpt_dir = checkpoints_dir(workdir)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints in {ckpt_dir}; train first")
    model_cfg = resolve_model_config(config)
    model = build_model(model_cfg)
    context = model_cfg.get("context_length", config.data.text_length)
    size = getattr(model.image_encoder, "image_size", None) or config.data.image_size
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    item: dict[str, Any] = {}
    for path, shape in expected_shapes(model, size, context).items():
        item[path] = jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)
    item = unflatten_variables(item)
    # A read-only reader: it never cleans up temporary directories, so exporting while the
    # run is still training cannot disturb a checkpoint being written.
    reader = Checkpointer(workdir, read_only=True)
    try:
        variables, step = reader.restore_partial(item, step)
    except (ValueError, KeyError) as e:
        if "no checkpoint for step" in str(e):
            raise
        raise CheckpointMismatchError(
            f"checkpoint {ckpt_dir}/{step} does not hold the variables of the config's "
            f"model ({model_cfg.get('image_encoder')}, {model_cfg.get('text_encoder')}): {e}"
        ) from e
    finally:
        reader.close()
    variables = jax.device_get(dict(variables))
    check_variables(
        flatten_variables(variables),
        expected_shapes(model, size, context),
        where=f"checkpoint {ckpt_dir}/{step}",
    )
    return model_cfg, variables, int(step)
