"""The objectives' extra heads by name: what each reads and how a model config sizes it.

An objective whose term needs a head names it here once (`register_head`); `head_specs(cfg)`
turns the model config's entries into `MultimodalModel.heads`:

    topic_head:    {"out": K, "hidden": (), "norm": "none"}    image feature -> K topic logits
    rotation_head: {"hidden": (), "norm": "none"}              image feature -> 4 logits
    predictor:     {"hidden": (4096,), "out": <ssl_head.out>, "norm": <ssl_head.norm>}

MoCo v3's projector is the model's `ssl_head` (SLIP's SimCLR MLP); its predictor reads the
projector output and maps it back to the same width, so `out` defaults to `ssl_head.out`.
A config entry that is absent or None builds no head (the parameter tree is unchanged).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

NUM_ROTATIONS = 4

HeadSpec = tuple[str, str, tuple[tuple[str, Any], ...]]


@dataclasses.dataclass(frozen=True)
class Head:
    """An extra head: its input ("feature" or "ssl") and its MLPHead fields from the model
    config (`defaults(model_cfg)` are overridden by the config entry's own fields)."""

    name: str
    input: str
    defaults: Callable[[Mapping[str, Any]], dict[str, Any]]
    check: Callable[[Mapping[str, Any], dict[str, Any]], None] | None = None


_HEADS: dict[str, Head] = {}


def register_head(
    name: str,
    input: str = "feature",
    defaults: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
    check: Callable[[Mapping[str, Any], dict[str, Any]], None] | None = None,
) -> Head:
    """Registers head `name`, built when the model config has an entry `name`."""
    if input not in ("feature", "ssl"):
        raise ValueError(f"head {name!r}: input must be 'feature' or 'ssl', got {input!r}")
    if name in _HEADS:
        raise ValueError(f"head {name!r} is already registered")
    _HEADS[name] = Head(name, input, defaults or (lambda cfg: {}), check)
    return _HEADS[name]


def head_names() -> list[str]:
    return sorted(_HEADS)


def _topic_check(cfg: Mapping[str, Any], fields: dict[str, Any]) -> None:
    if int(fields.get("out", 0)) <= 0:
        raise ValueError(f"model.topic_head needs out = the topic dimension K, got {fields}")


def _predictor_defaults(cfg: Mapping[str, Any]) -> dict[str, Any]:
    ssl = cfg.get("ssl_head")
    if not ssl:
        raise ValueError("model.predictor (MoCo v3) needs model.ssl_head (the projector)")
    return {"out": int(ssl.get("out", 256)), "norm": ssl.get("norm", "batch")}


register_head("topic_head", "feature", check=_topic_check)
register_head("rotation_head", "feature", lambda cfg: {"out": NUM_ROTATIONS})
register_head("predictor", "ssl", _predictor_defaults)


def head_specs(cfg: Mapping[str, Any]) -> tuple[HeadSpec, ...]:
    """`MultimodalModel.heads` for every registered head the model config `cfg` sets, in
    registration order (so the parameter tree does not depend on config key order)."""
    specs = []
    for name, head in _HEADS.items():
        entry = cfg.get(name)
        if entry is None or entry is False:
            continue
        fields = {**head.defaults(cfg), **dict(entry or {})}
        fields["hidden"] = tuple(int(h) for h in fields.get("hidden", ()))
        if head.check is not None:
            head.check(cfg, fields)
        specs.append((name, head.input, tuple(sorted(fields.items()))))
    return tuple(specs)


def attach_heads(model: Any, cfg: Mapping[str, Any]) -> Any:
    """`model` with the extra heads of `cfg`; unchanged if none."""
    specs = head_specs(cfg)
    return model.clone(heads=specs) if specs else model
