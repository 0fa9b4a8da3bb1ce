"""Start training from other weights (`config.init_from`).

`config.init_from.path` names any of:
- an export directory (tools/export.py or tools/convert_torch.py: `params.safetensors`, its
  manifest checked when present), or a bare `.safetensors` / flax `.msgpack` file;
- a training workdir (its latest checkpoint), its `checkpoints/` folder, or one step folder
  `checkpoints/<step>`.
Every model parameter must be in the file with the same shape, except those matching a regex
of `config.init_from.skip` (left at their fresh initialisation, e.g. a new head); the first
one that is not is a clear error naming it. Entries the model lacks (an SSL head, a text
tower the fine-tune does not use) are ignored and counted in the log.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from mmssl_jax import pytree
from mmssl_jax.training.checkpoint import checkpoints_dir
from mmssl_jax.training.param_rules import flat_params, path_of

PARAMS_FILE = "params.safetensors"


class InitFromError(ValueError):
    """Weights that do not fit the configured model; the message names the parameter."""


# ----------------------------------------------------------------------------- reading


def _strip_params_prefix(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Keys under "params/" without the prefix (other collections, e.g. batch_stats, are not
    parameters); a file of bare parameter paths is returned as it is."""
    if any(k.startswith("params/") for k in flat):
        return {k[len("params/") :]: v for k, v in flat.items() if k.startswith("params/")}
    return dict(flat)


def _flatten_nested(tree: Any) -> dict[str, Any]:
    return dict(flat_params(tree))


def _read_file(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return _strip_params_prefix(load_file(path))
    if path.endswith(".msgpack"):
        from flax import serialization

        with open(path, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
        return _strip_params_prefix(_flatten_nested(tree))
    raise InitFromError(f"init_from {path}: expected a .safetensors or .msgpack file")


def _checkpoint_step_dir(path: str) -> tuple[str, int] | None:
    """(checkpoints dir, step) for a workdir, a checkpoints dir or a step dir, else None."""
    path = os.path.abspath(path)
    base = os.path.basename(path)
    if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
        return os.path.dirname(path), int(base)
    for ckpt_dir in (checkpoints_dir(path), path):
        if not os.path.isdir(ckpt_dir):
            continue
        steps = [
            int(d)
            for d in os.listdir(ckpt_dir)
            if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d, "state"))
        ]
        if steps:
            return ckpt_dir, max(steps)
    return None


def _checkpoint_shapes(ckpt_dir: str, step: int) -> dict[str, tuple[int, ...]]:
    """Parameter path -> shape from an orbax checkpoint's metadata (no array is read)."""
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(os.path.join(ckpt_dir, str(step), "state"))
    tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
    flat = _strip_params_prefix(_flatten_nested(tree))
    return {k: tuple(getattr(v, "shape", ())) for k, v in flat.items()}


def _checkpoint_read(ckpt_dir: str, step: int, wanted: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The `wanted` parameters (path -> ShapeDtypeStruct) from an orbax checkpoint, onto
    one device, with a partial restore (the optimizer state is never read)."""
    import orbax.checkpoint as ocp

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    item = pytree.unflatten(
        {
            f"params/{k}": jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
            for k, v in wanted.items()
        }
    )
    args = ocp.args.PyTreeRestore(
        item=item,
        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True,
    )
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.join(ckpt_dir, str(step), "state"), args=args)
    restored = jax.device_get(restored)
    return {k: np.asarray(v) for k, v in _flatten_nested(restored["params"]).items()}


def _verify_export(directory: str) -> None:
    """Checks an export's manifest (sha256 of every file) when the export module has it."""
    if not os.path.exists(os.path.join(directory, "manifest.json")):
        return
    try:
        from mmssl_jax.models.saved import verify_export
    except ImportError:  # the export module is optional here
        return
    verify_export(directory)


class _Source:
    """Shapes first (to check before reading), then values, of one weights location."""

    def __init__(self, path: str):
        self.path = path
        self._values: dict[str, np.ndarray] | None = None
        self._ckpt: tuple[str, int] | None = None
        if os.path.isfile(path):
            self._values = _read_file(path)
        elif os.path.isfile(os.path.join(path, PARAMS_FILE)):
            _verify_export(path)
            self._values = _read_file(os.path.join(path, PARAMS_FILE))
        else:
            self._ckpt = _checkpoint_step_dir(path) if os.path.isdir(path) else None
            if self._ckpt is None:
                raise InitFromError(
                    f"init_from {path}: not an export (no {PARAMS_FILE}), a .safetensors / "
                    ".msgpack file, or a workdir with checkpoints"
                )
        self.where = f"{self._ckpt[0]}/{self._ckpt[1]}" if self._ckpt else os.path.abspath(path)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self._values is not None:
            return {k: tuple(np.shape(v)) for k, v in self._values.items()}
        return _checkpoint_shapes(*self._ckpt)

    def read(self, wanted: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if self._values is not None:
            return {k: self._values[k] for k in wanted}
        return _checkpoint_read(*self._ckpt, wanted)


# ----------------------------------------------------------------------------- loading


def load_init_params(path: str, params: Any, skip: Sequence[str] = ()) -> Any:
    """`params` (a pytree of arrays or ShapeDtypeStructs) with every parameter replaced by
    the one stored at `path`, cast to the model's dtype; parameters matching a `skip` regex
    (fullmatch on the '/'-joined path) keep their value from `params`.

    Raises InitFromError naming the first model parameter (in tree order) that the file
    lacks or stores with another shape.
    """
    source = _Source(path)
    stored = source.shapes()
    model = flat_params(params)
    skipped = [p for p, _ in model if any(re.fullmatch(s, p) for s in skip)]
    wanted: dict[str, Any] = {}
    for p, leaf in model:
        if p in skipped:
            continue
        if p not in stored:
            near = [k for k in stored if k.rsplit("/", 1)[-1] == p.rsplit("/", 1)[-1]][:3]
            raise InitFromError(
                f"init_from {source.where}: parameter {p!r} {tuple(np.shape(leaf))} is not in "
                f"it ({len(stored)} stored parameters; similar: {near or 'none'}). Add a regex "
                "to init_from.skip to keep it at its initialisation."
            )
        if tuple(stored[p]) != tuple(np.shape(leaf)):
            raise InitFromError(
                f"init_from {source.where}: parameter {p!r} has shape {tuple(stored[p])} "
                f"there but {tuple(np.shape(leaf))} in the model (another model size?)"
            )
        wanted[p] = jax.ShapeDtypeStruct(tuple(np.shape(leaf)), np.dtype(leaf.dtype))
    values = source.read(wanted)
    unused = sorted(set(stored) - {p for p, _ in model})
    logging.info(
        "init_from %s: loaded %d parameters, kept %d at initialisation (skip), ignored %d "
        "the model lacks%s",
        source.where,
        len(wanted),
        len(skipped),
        len(unused),
        f" (e.g. {unused[:3]})" if unused else "",
    )

    def pick(keypath: Any, leaf: Any) -> Any:
        p = path_of(keypath)
        if p in wanted:
            return np.asarray(values[p], dtype=wanted[p].dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(pick, params)


def maybe_init_from(state: Any, config: Any, state_sharding: Any) -> Any:
    """The Trainer's fresh `state` with parameters from `config.init_from.path` (when set),
    placed on `state_sharding`; the EMA copy (MoCo v3) restarts from them too. The optimizer
    state is untouched: Adam's moments start at zero whatever the parameters are."""
    cfg = config.get("init_from") if hasattr(config, "get") else None
    if not cfg or not cfg.get("path"):
        return state
    host = jax.device_get(state.params)
    params = load_init_params(cfg["path"], host, tuple(cfg.get("skip", ()) or ()))
    updates = {"params": jax.device_put(params, state_sharding.params)}
    if getattr(state, "ema_params", None) is not None:
        from mmssl_jax.training import momentum

        updates["ema_params"] = jax.device_put(momentum.init_ema(params), state_sharding.ema_params)
    return state.replace(**updates)


def maybe_load_text_tower(state: Any, config: Any, state_sharding: Any) -> Any:
    """A fresh `state` whose BERT text tower (`model.text_encoder="bert"`) holds the
    pretrained weights of `model.text_path` (LiT: lock it with a freeze rule, or tune it);
    `model.text_pretrained=False` keeps the random init (the from-scratch ablation)."""
    model_cfg = config.model
    if model_cfg.get("text_encoder") != "bert" or not model_cfg.get("text_pretrained", True):
        return state
    from mmssl_jax.models import bert

    directory = bert.find_bert_dir(model_cfg.text_path)
    loaded = bert.load_bert_params(directory)
    host = jax.device_get(state.params)
    fresh, stored = dict(flat_params(host["text_encoder"])), dict(flat_params(loaded))
    for name, leaf in fresh.items():
        if name not in stored or tuple(stored[name].shape) != tuple(np.shape(leaf)):
            have = None if name not in stored else tuple(stored[name].shape)
            raise InitFromError(
                f"{directory}: text_encoder/{name} is {have} there but the model needs "
                f"{tuple(np.shape(leaf))} (model.text_overrides differ from its config.json?)"
            )
    cast = jax.tree.map(
        lambda a, b: np.asarray(a, np.asarray(b).dtype), loaded, host["text_encoder"]
    )
    params = {**host, "text_encoder": cast}
    logging.info("text tower: pretrained BERT weights from %s (%d tensors)", directory, len(fresh))
    return state.replace(params=jax.device_put(params, state_sharding.params))
