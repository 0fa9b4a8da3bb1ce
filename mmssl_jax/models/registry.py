"""Encoders by name from one model table, and `build_model` from a config.

Every size lives in `IMAGE_ENCODERS` / `TEXT_ENCODERS`; configs name a size and may override
single fields (e.g. `image_size` or `depth` for a CPU run) instead of copying the table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmssl_jax.models.bert import BertEncoder
from mmssl_jax.models.extra_heads import head_specs
from mmssl_jax.models.heads import simclr_head
from mmssl_jax.models.model import INIT_TEMPERATURE, MultimodalModel
from mmssl_jax.models.resnet import ResNet
from mmssl_jax.models.text import TextTransformer
from mmssl_jax.models.vit import VisionTransformer

_VIT_224 = {"patch_size": 16, "image_size": 224}

# name -> (module class, constructor kwargs). Widths/depths/heads: timm; vit_s16 is MoCo v3's
# 12-head ViT-S that SLIP uses. The tiny sizes are for CPU tests and the tiny config.
IMAGE_ENCODERS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "vit_ti16": (VisionTransformer, {"width": 192, "depth": 12, "heads": 3, **_VIT_224}),
    "vit_s16": (VisionTransformer, {"width": 384, "depth": 12, "heads": 12, **_VIT_224}),
    "vit_b16": (VisionTransformer, {"width": 768, "depth": 12, "heads": 12, **_VIT_224}),
    "vit_l16": (VisionTransformer, {"width": 1024, "depth": 24, "heads": 16, **_VIT_224}),
    "vit_tiny": (
        VisionTransformer,
        {"width": 128, "depth": 4, "heads": 4, "patch_size": 4, "image_size": 32},
    ),
    "resnet50": (ResNet, {"stage_sizes": (3, 4, 6, 3), "width": 64}),
    "resnet_tiny": (ResNet, {"stage_sizes": (1, 1, 1, 1), "width": 8}),
    "resnet18": (ResNet, {"stage_sizes": (2, 2, 2, 2), "width": 64, "block": "basic"}),
    # A ResNet-10 of basic blocks with the 3x3 stem for 32 px images (stage 1 at 32 x 32,
    # the last at 4 x 4): the convolutional counterpart of vit_tiny for the CPU recipes.
    "resnet10_32": (
        ResNet,
        {"stage_sizes": (1, 1, 1, 1), "width": 32, "block": "basic", "stem": "cifar"},
    ),
}

TEXT_ENCODERS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "clip_text": (TextTransformer, {"context_length": 77, "width": 512, "layers": 12, "heads": 8}),
    "text_tiny": (TextTransformer, {"context_length": 32, "width": 128, "layers": 4, "heads": 4}),
    # A pretrained BERT-family encoder: its sizes come from the checkpoint's config.json
    # (`bert.read_bert_config`), put into `text_overrides` by the trainer's model config.
    "bert": (BertEncoder, {}),
}


def _dtype(value: Any) -> Any:
    """Accepts a dtype or its name ("float32", "bfloat16", ...)."""
    return jnp.dtype(value) if isinstance(value, str) else value


def _make(table: Mapping[str, tuple[type[nn.Module], dict]], kind: str, name: str, **kw: Any):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid names: {sorted(table)}")
    cls, sizes = table[name]
    fields = _fields(cls)
    unknown = sorted(set(kw) - fields)
    if unknown:
        raise ValueError(f"{name} has no fields {unknown}; valid fields: {sorted(fields)}")
    for key in ("dtype", "param_dtype"):
        if key in kw:
            kw[key] = _dtype(kw[key])
    return cls(**{**sizes, **kw})


def get_image_encoder(name: str, **overrides: Any) -> nn.Module:
    """The image encoder `name` (see `IMAGE_ENCODERS`), with fields replaced by `overrides`."""
    return _make(IMAGE_ENCODERS, "image encoder", name, **overrides)


def get_text_encoder(name: str, vocab_size: int, **overrides: Any) -> nn.Module:
    """The text encoder `name` (see `TEXT_ENCODERS`) for a tokenizer of `vocab_size` ids."""
    return _make(TEXT_ENCODERS, "text encoder", name, vocab_size=vocab_size, **overrides)


def _fields(cls: type[nn.Module]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def build_model(cfg: Any) -> MultimodalModel:
    """A `MultimodalModel` from a model config (an `ml_collections.ConfigDict` or a dict).

    Keys:
      image_encoder (str, required): a name in `IMAGE_ENCODERS`.
      text_encoder (str | None, default None): a name in `TEXT_ENCODERS`; None = image only.
        "bert" reads its sizes from `text_overrides` (filled from `text_path`'s config.json
        by `bert_model_config`).
      vocab_size (int): the tokenizer's vocabulary size; required (> 0) with a text encoder.
      embed_dim (int, default 512): joint embedding size.
      ssl_head (mapping | None, default None): `simclr_head` fields, e.g. hidden/out/norm.
      dtype (str, default "float32"): compute dtype everywhere; params stay float32.
      remat (bool, default False): rematerialise transformer blocks (ViT and text).
      attention_impl (str | None): `jax.nn.dot_product_attention`'s implementation for both
        towers; "cudnn" is the fused kernel on NVIDIA GPUs (bf16), None lets XLA choose.
      image_size, context_length (int, optional): shortcuts, passed to the encoders that have
        that field (ViT `image_size`, text `context_length`); absent or None keeps the table's.
      image_overrides / text_overrides (mapping, default {}): any encoder fields to replace,
        e.g. {"depth": 6, "patch_size": 4}; these win over the keys above.
      topic_head / rotation_head / predictor / any registered head (mapping, optional):
        the objectives' extra heads (see `extra_heads`), so that export and conversion
        rebuild exactly the trained model.
    """
    dtype = _dtype(cfg.get("dtype", "float32"))
    shared = {
        "remat": bool(cfg.get("remat", False)) or None,
        "image_size": cfg.get("image_size"),
        "context_length": cfg.get("context_length"),
        "attention_impl": cfg.get("attention_impl") or None,
    }

    def encoder_kwargs(cls: type[nn.Module], overrides_key: str) -> dict[str, Any]:
        kw: dict[str, Any] = {"dtype": dtype}
        kw.update({k: v for k, v in shared.items() if v is not None and k in _fields(cls)})
        kw.update(dict(cfg.get(overrides_key) or {}))
        return kw

    image_name = cfg["image_encoder"]
    if image_name not in IMAGE_ENCODERS:
        raise ValueError(f"unknown image encoder {image_name!r}; valid: {sorted(IMAGE_ENCODERS)}")
    image_cls = IMAGE_ENCODERS[image_name][0]
    image = get_image_encoder(image_name, **encoder_kwargs(image_cls, "image_overrides"))
    text = None
    text_name = cfg.get("text_encoder")
    if text_name:
        if text_name not in TEXT_ENCODERS:
            raise ValueError(f"unknown text encoder {text_name!r}; valid: {sorted(TEXT_ENCODERS)}")
        vocab_size = cfg.get("vocab_size")
        if vocab_size is None or vocab_size <= 0:
            raise ValueError(f"build_model: a text encoder needs vocab_size > 0, got {vocab_size}")
        text_cls = TEXT_ENCODERS[text_name][0]
        text = get_text_encoder(
            text_name, int(vocab_size), **encoder_kwargs(text_cls, "text_overrides")
        )
    head_cfg = cfg.get("ssl_head")
    head = simclr_head(**{"dtype": dtype, **dict(head_cfg)}) if head_cfg else None
    return MultimodalModel(
        image_encoder=image,
        text_encoder=text,
        embed_dim=int(cfg.get("embed_dim", 512)),
        ssl_head=head,
        init_temperature=float(cfg.get("init_temperature", INIT_TEMPERATURE)),
        dtype=dtype,
        heads=head_specs(cfg),
    )


def bert_model_config(cfg: Any) -> dict[str, Any]:
    """`cfg` (a model config with text_encoder "bert") with the encoder's fields read from the
    checkpoint directory `cfg["text_path"]` (a path, or a registered name such as
    "all-minilm-l6-v2") into `text_overrides`, and its vocab size; the config's own
    overrides win. The result builds without the directory (exports carry it)."""
    from mmssl_jax.models import bert

    out = dict(cfg)
    if not out.get("text_path"):
        raise ValueError('model.text_encoder="bert" needs model.text_path (a BERT directory)')
    fields = bert.read_bert_config(bert.find_bert_dir(out["text_path"]))
    vocab_size = int(fields.pop("vocab_size"))
    overrides = {**fields, **dict(out.get("text_overrides") or {})}
    if out.get("context_length"):
        overrides["context_length"] = min(int(out["context_length"]), fields["max_positions"])
    out["text_overrides"] = overrides
    out["vocab_size"] = vocab_size
    out["context_length"] = int(overrides["context_length"])
    return out
