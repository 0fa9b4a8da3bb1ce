"""The optional heads of the topic, rotation and MoCo v3 objectives, from a model config.

`registry.build_model` makes the CLIP/SLIP model; `attach_heads(model, cfg)` returns it
with the heads that `cfg` asks for (absent or None keys: no head, the model unchanged):

    topic_head:    {"out": K, "hidden": (), "norm": "none"}    image feature -> K topic logits
    rotation_head: {"hidden": (), "norm": "none"}              image feature -> 4 logits
    predictor:     {"hidden": (4096,), "out": <ssl_head.out>, "norm": "batch"}   MoCo v3

MoCo v3's projector is the model's `ssl_head` (SLIP's SimCLR MLP); its predictor maps the
projector output back to the same width, so `out` defaults to `ssl_head.out`.
"""

from __future__ import annotations

from typing import Any

from mmssl_jax.models.heads import MLPHead
from mmssl_jax.models.model import MultimodalModel
from mmssl_jax.objectives.rotation import NUM_ROTATIONS

HEAD_KEYS = ("topic_head", "rotation_head", "predictor")


def _mlp(spec: Any, dtype: Any, **defaults: Any) -> MLPHead:
    kw = {**defaults, **dict(spec)}
    kw["hidden"] = tuple(int(h) for h in kw.get("hidden", ()))
    return MLPHead(dtype=dtype, **kw)


def heads_from_config(cfg: Any, dtype: Any) -> dict[str, MLPHead]:
    """{field: MLPHead} for each optional head `cfg` (a model config mapping) defines."""
    heads: dict[str, MLPHead] = {}
    if cfg.get("topic_head"):
        spec = dict(cfg["topic_head"])
        if int(spec.get("out", 0)) <= 0:
            raise ValueError(f"model.topic_head needs out = the topic dimension K, got {spec}")
        heads["topic_head"] = _mlp(spec, dtype)
    if cfg.get("rotation_head") is not None and cfg.get("rotation_head") is not False:
        heads["rotation_head"] = _mlp(cfg["rotation_head"] or {}, dtype, out=NUM_ROTATIONS)
    if cfg.get("predictor"):
        ssl = cfg.get("ssl_head")
        if not ssl:
            raise ValueError("model.predictor (MoCo v3) needs model.ssl_head (the projector)")
        heads["predictor"] = _mlp(
            cfg["predictor"], dtype, out=int(ssl.get("out", 256)), norm=ssl.get("norm", "batch")
        )
    return heads


def attach_heads(model: MultimodalModel, cfg: Any) -> MultimodalModel:
    """`model` with the optional heads of `cfg` (see module docstring); unchanged if none."""
    heads = heads_from_config(cfg, model.dtype)
    return model.clone(**heads) if heads else model
