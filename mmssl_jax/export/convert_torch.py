"""Import PyTorch CLIP-family weights into this codebase's parameter tree.

Supported state dicts (the user brings the file; nothing is downloaded):

- `openai`: OpenAI CLIP ViT models (`visual.conv1`, `visual.class_embedding`,
  `visual.positional_embedding`, `visual.ln_pre`, `visual.transformer.resblocks.N.{ln_1,
  attn.in_proj_weight/bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `visual.ln_post`,
  `visual.proj`; text `token_embedding`, `positional_embedding`, `transformer.resblocks.N`,
  `ln_final`, `text_projection`; `logit_scale`). QuickGELU everywhere.
- `open_clip`: the same layout from open_clip's ViT CLIP models, with nn.GELU (open_clip's
  own models; its `-quickgelu` models and OpenAI weights are `openai`).
- `slip`: SLIP checkpoints: `module.visual.*` timm ViT (`patch_embed.proj`, `cls_token`,
  `pos_embed`, `blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`),
  `module.image_projection`, the CLIP text tower, `module.text_projection`, `logit_scale`,
  and `module.image_mlp.{layer1, bn1, layer2, bn2, layer3}` (the SimCLR head with BatchNorm).

PyTorch files are read with `torch.load(weights_only=True)` (only tensors and plain
containers are unpickled; SLIP's `args` Namespace is allowed as data); `.safetensors` files
need no torch at all. OpenAI's released `.pt` files are TorchScript archives, which are
refused: their state dict must be extracted first (see `load_state_dict`).

Mapping: a torch Linear `weight [out, in]` is a flax Dense `kernel [in, out]`; conv
`[out, in, kh, kw]` -> `[kh, kw, in, out]` (NHWC images); MultiheadAttention's fused
`in_proj` (q, k, v stacked) is the ViT's fused `qkv`; CLIP's `ln_post` is the ViT's `norm`
(applied to every token before pooling: LayerNorm is per token, so the same); `proj` /
`image_projection` / `text_projection` are `[in, out]` already (used as `x @ proj`).
CLIP pools the text at `argmax(tokens)` (EOT has the highest BPE id): the text tower is built
with `pool="argmax"`, and texts are tokenized with CLIP's BPE (`input_pipeline.clip_bpe`, from
the merges file the user passes as `bpe`). Head counts are not stored in a state dict:
width // 64 (CLIP, timm B/L), 12 for SLIP's ViT-S (384 wide); override them when a model
differs.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from mmssl_jax.models.model import LOGIT_BIAS_INIT, LOGIT_SCALE_INIT

ARCHS = ("openai", "open_clip", "slip")
# How each source codebase's tokenizer cuts a caption longer than the context (recorded in the
# export's model.json): OpenAI CLIP (truncate=True) and open_clip keep EOT at the last
# position; SLIP's truncates [SOT] + ids + [EOT] to the length, dropping the EOT.
TOKENIZER_TRUNCATION = {"openai": "keep_eot", "open_clip": "keep_eot", "slip": "cut"}

# OpenAI CLIP's image statistics (open_clip's OPENAI_DATASET_MEAN/STD); SLIP uses ImageNet's.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Buffers and bookkeeping that carry no weights.
IGNORED = re.compile(
    r"(^|\.)(attn_mask|num_batches_tracked)$|^(input_resolution|context_length|vocab_size)$"
)


class ConversionError(ValueError):
    """A state dict that does not have the layout of the architecture being converted."""


# ----------------------------------------------------------------------------- reading


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """The float32 numpy state dict of a .pt/.pth/.bin (torch) or .safetensors file.

    Unwraps `{"state_dict": ...}` / `{"model": ...}` and strips DDP's `module.` prefix.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        raw: Any = load_file(path)
    else:
        raw = _torch_load(path)
    for key in ("state_dict", "model", "module"):
        if isinstance(raw, Mapping) and isinstance(raw.get(key), Mapping):
            raw = raw[key]
            break
    if not isinstance(raw, Mapping):
        raise ConversionError(f"{path}: expected a state dict (a mapping), got {type(raw)}")
    out = {}
    for key, value in raw.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        out[key] = _to_numpy(value, f"{path}: {key}")
    return out


def _torch_load(path: str) -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs PyTorch (pip install -e '.[torch]'); "
            ".safetensors files convert without it"
        ) from e
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise ConversionError(
                f"{path} is a TorchScript archive (OpenAI's released CLIP .pt files are). "
                "Loading it would run its code; extract the weights once in an environment "
                "you trust: `torch.save(torch.jit.load(path, map_location='cpu').state_dict(), "
                "'clip_state_dict.pt')`, then convert that file."
            )
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConversionError(
                f"{path}: torch.load(weights_only=True) refused it ({e}); only state dicts "
                "of tensors are accepted"
            ) from e


def _to_numpy(value: Any, where: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value.astype(np.float32) if value.dtype != np.float32 else value
    if hasattr(value, "detach"):  # a torch tensor (fp16/bf16 go through float32)
        return value.detach().to("cpu").float().numpy()
    if isinstance(value, (int, float)):
        return np.asarray(value, np.float32)
    raise ConversionError(f"{where}: expected a tensor, got {type(value).__name__}")


def detect_arch(state: Mapping[str, np.ndarray]) -> str:
    """ "slip" for a timm visual tower, "openai" for CLIP's (open_clip needs asking for)."""
    if "visual.patch_embed.proj.weight" in state:
        return "slip"
    if "visual.conv1.weight" in state:
        return "openai"
    if any(k.startswith("text.") for k in state):
        raise ConversionError("open_clip CustomTextCLIP models (a `text.` tower) are unsupported")
    first = ", ".join(list(state)[:6])
    raise ConversionError(f"not a CLIP / open_clip / SLIP ViT state dict (keys: {first}, ...)")


class _Reader:
    """Hands out state-dict entries by name and remembers which were used."""

    def __init__(self, state: Mapping[str, np.ndarray]):
        self.state, self.used = state, set()

    def __call__(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if key not in self.state:
            raise ConversionError(f"state dict has no {key}")
        value = self.state[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ConversionError(f"{key} has shape {tuple(value.shape)}, expected {shape}")
        self.used.add(key)
        return value

    def has(self, key: str) -> bool:
        return key in self.state

    def count(self, pattern: str) -> int:
        """Number of distinct N in keys matching `pattern` with one `(\\d+)` group."""
        rx = re.compile(pattern)
        return len({m.group(1) for k in self.state if (m := rx.match(k))})

    def check_all_used(self) -> None:
        left = sorted(k for k in self.state if k not in self.used and not IGNORED.search(k))
        if left:
            raise ConversionError(
                f"{len(left)} state-dict entries have no place in the converted model, e.g. "
                f"{left[:5]} (an architecture variant this converter does not know)"
            )


# ----------------------------------------------------------------------------- pieces


def _dense(r: _Reader, prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
    out = {"kernel": r(f"{prefix}.weight").T.copy()}
    if bias:
        out["bias"] = r(f"{prefix}.bias")
    return out


def _ln(r: _Reader, prefix: str) -> dict[str, np.ndarray]:
    return {"scale": r(f"{prefix}.weight"), "bias": r(f"{prefix}.bias")}


def _clip_block(r: _Reader, p: str) -> dict[str, Any]:
    """OpenAI/open_clip ResidualAttentionBlock -> models.vit.Block."""
    return {
        "norm1": _ln(r, f"{p}.ln_1"),
        "attn": {
            "qkv": {
                "kernel": r(f"{p}.attn.in_proj_weight").T.copy(),
                "bias": r(f"{p}.attn.in_proj_bias"),
            },
            "proj": _dense(r, f"{p}.attn.out_proj"),
        },
        "norm2": _ln(r, f"{p}.ln_2"),
        "mlp": {"fc1": _dense(r, f"{p}.mlp.c_fc"), "fc2": _dense(r, f"{p}.mlp.c_proj")},
    }


def _timm_block(r: _Reader, p: str) -> dict[str, Any]:
    """timm ViT Block -> models.vit.Block (the same layout, torch names)."""
    return {
        "norm1": _ln(r, f"{p}.norm1"),
        "attn": {"qkv": _dense(r, f"{p}.attn.qkv"), "proj": _dense(r, f"{p}.attn.proj")},
        "norm2": _ln(r, f"{p}.norm2"),
        "mlp": {"fc1": _dense(r, f"{p}.mlp.fc1"), "fc2": _dense(r, f"{p}.mlp.fc2")},
    }


def _grid_size(num_tokens: int, key: str) -> int:
    grid = math.isqrt(num_tokens - 1)
    if grid * grid != num_tokens - 1:
        raise ConversionError(f"{key}: {num_tokens} tokens is not a class token + a square grid")
    return grid


def _heads(width: int, override: int | None, what: str) -> int:
    heads = override or max(1, width // 64)
    if width % heads:
        raise ConversionError(f"{what}: width {width} is not divisible by {heads} heads")
    return heads


def _clip_text(r: _Reader, act: str, heads: int | None) -> tuple[dict, dict, dict]:
    """(text_encoder params, text_projection params, model-config entries)."""
    vocab, width = r("token_embedding.weight").shape
    context = r("positional_embedding").shape[0]
    layers = r.count(r"^transformer\.resblocks\.(\d+)\.")
    if not layers:
        raise ConversionError("state dict has no transformer.resblocks.N (text tower)")
    hidden = r("transformer.resblocks.0.mlp.c_fc.weight").shape[0]
    if hidden != 4 * width:
        raise ConversionError(f"text MLP width {hidden} is not 4 x {width}; unsupported")
    params = {
        "token_embedding": {"embedding": r("token_embedding.weight")},
        "positional_embedding": r("positional_embedding"),
        "ln_final": _ln(r, "ln_final"),
    }
    for i in range(layers):
        params[f"resblocks_{i}"] = _clip_block(r, f"transformer.resblocks.{i}")
    projection = {"proj": {"kernel": r("text_projection")}}
    cfg = {
        "text_encoder": "clip_text",
        "vocab_size": int(vocab),
        "context_length": int(context),
        "text_overrides": {
            "width": int(width),
            "layers": layers,
            "heads": _heads(width, heads, "text"),
            "pool": "argmax",
            "act": act,
        },
    }
    return params, projection, cfg


def _scalars(r: _Reader) -> dict[str, np.ndarray]:
    scale = r("logit_scale") if r.has("logit_scale") else np.float32(LOGIT_SCALE_INIT)
    bias = r("logit_bias") if r.has("logit_bias") else np.float32(LOGIT_BIAS_INIT)
    return {
        "logit_scale": np.asarray(scale, np.float32).reshape(()),
        "logit_bias": np.asarray(bias, np.float32).reshape(()),
    }


# ----------------------------------------------------------------------------- models


def convert_clip(
    state: Mapping[str, np.ndarray],
    act: str = "quick_gelu",
    vision_heads: int | None = None,
    text_heads: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """OpenAI CLIP / open_clip ViT state dict -> (model config, variables)."""
    r = _Reader(state)
    width, _, patch, _ = r("visual.conv1.weight").shape
    tokens = r("visual.positional_embedding").shape[0]
    grid = _grid_size(tokens, "visual.positional_embedding")
    depth = r.count(r"^visual\.transformer\.resblocks\.(\d+)\.")
    hidden = r("visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0]
    image = {
        "patch_embed": {"kernel": r("visual.conv1.weight").transpose(2, 3, 1, 0).copy()},
        "cls_token": r("visual.class_embedding", (width,)).reshape(1, 1, width),
        "pos_embed": r("visual.positional_embedding")[None],
        "ln_pre": _ln(r, "visual.ln_pre"),
        "norm": _ln(r, "visual.ln_post"),
    }
    for i in range(depth):
        image[f"blocks_{i}"] = _clip_block(r, f"visual.transformer.resblocks.{i}")
    params: dict[str, Any] = {
        "image_encoder": image,
        "image_projection": {"proj": {"kernel": r("visual.proj")}},
        **_scalars(r),
    }
    text, text_proj, text_cfg = _clip_text(r, act, text_heads)
    params["text_encoder"], params["text_projection"] = text, text_proj
    r.check_all_used()
    cfg = {
        "image_encoder": "vit_b16",
        "image_overrides": {
            "width": int(width),
            "depth": depth,
            "heads": _heads(width, vision_heads, "vision"),
            "patch_size": int(patch),
            "image_size": int(grid * patch),
            "mlp_ratio": hidden / width,
            "ln_pre": True,
            "patch_bias": False,
            "ln_eps": 1e-5,
            "act": act,
        },
        "embed_dim": int(params["image_projection"]["proj"]["kernel"].shape[1]),
        "ssl_head": None,
        "dtype": "float32",
        **text_cfg,
    }
    return cfg, {"params": params}


def convert_slip(
    state: Mapping[str, np.ndarray],
    vision_heads: int | None = None,
    text_heads: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """SLIP / CLIP / SIMCLR checkpoint of the SLIP repo -> (model config, variables)."""
    r = _Reader(state)
    width, _, patch, _ = r("visual.patch_embed.proj.weight").shape
    tokens = r("visual.pos_embed").shape[1]
    grid = _grid_size(tokens, "visual.pos_embed")
    depth = r.count(r"^visual\.blocks\.(\d+)\.")
    hidden = r("visual.blocks.0.mlp.fc1.weight").shape[0]
    image = {
        "patch_embed": {
            "kernel": r("visual.patch_embed.proj.weight").transpose(2, 3, 1, 0).copy(),
            "bias": r("visual.patch_embed.proj.bias"),
        },
        "cls_token": r("visual.cls_token", (1, 1, width)),
        "pos_embed": r("visual.pos_embed"),
        "norm": _ln(r, "visual.norm"),
    }
    for i in range(depth):
        image[f"blocks_{i}"] = _timm_block(r, f"visual.blocks.{i}")
    # SLIP's ViT-S is MoCo v3's 12-head variant; timm's B/L have 64-wide heads.
    heads = vision_heads or (12 if width == 384 else None)
    cfg: dict[str, Any] = {
        "image_encoder": "vit_b16",
        "image_overrides": {
            "width": int(width),
            "depth": depth,
            "heads": _heads(width, heads, "vision"),
            "patch_size": int(patch),
            "image_size": int(grid * patch),
            "mlp_ratio": hidden / width,
        },
        "text_encoder": None,
        "ssl_head": None,
        "dtype": "float32",
    }
    params: dict[str, Any] = {"image_encoder": image, **_scalars(r)}
    variables: dict[str, Any] = {"params": params}
    if r.has("image_projection"):
        params["image_projection"] = {"proj": {"kernel": r("image_projection")}}
        cfg["embed_dim"] = int(params["image_projection"]["proj"]["kernel"].shape[1])
    else:  # SLIP's SIMCLR model: no joint space; the embedding is the raw feature.
        params["image_projection"] = {"proj": {"kernel": np.eye(width, dtype=np.float32)}}
        cfg["embed_dim"] = int(width)
    if r.has("token_embedding.weight"):
        text, text_proj, text_cfg = _clip_text(r, "quick_gelu", text_heads)
        params["text_encoder"], params["text_projection"] = text, text_proj
        cfg.update(text_cfg)
    if r.has("image_mlp.layer1.weight"):
        head, stats = {}, {}
        for i, (layer, bn) in enumerate((("layer1", "bn1"), ("layer2", "bn2"))):
            head[f"fc{i}"] = _dense(r, f"image_mlp.{layer}")
            head[f"norm{i}"] = _ln(r, f"image_mlp.{bn}")
            stats[f"norm{i}"] = {
                "mean": r(f"image_mlp.{bn}.running_mean"),
                "var": r(f"image_mlp.{bn}.running_var"),
            }
        head["fc2"] = _dense(r, "image_mlp.layer3")
        params["ssl_head"] = head
        variables["batch_stats"] = {"ssl_head": stats}
        cfg["ssl_head"] = {
            "hidden": int(head["fc0"]["kernel"].shape[1]),
            "out": int(head["fc2"]["kernel"].shape[1]),
            "norm": "batch",
        }
    r.check_all_used()
    return cfg, variables


def convert_state_dict(
    state: Mapping[str, np.ndarray],
    arch: str = "auto",
    vision_heads: int | None = None,
    text_heads: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(model config, variables, preprocess spec) for a numpy state dict.

    The variables are checked against the shapes `build_model(config)` creates.
    """
    from mmssl_jax.export.writer import preprocess_spec
    from mmssl_jax.models.registry import build_model
    from mmssl_jax.models.saved import check_variables, expected_shapes, flatten_variables

    if arch == "auto":
        arch = detect_arch(state)
    if arch not in ARCHS:
        raise ValueError(f"arch must be 'auto' or one of {ARCHS}, got {arch!r}")
    if arch == "slip":
        if "visual.patch_embed.proj.weight" not in state:
            raise ConversionError("--arch=slip needs a timm visual tower (visual.patch_embed.*)")
        cfg, variables = convert_slip(state, vision_heads, text_heads)
    else:
        if "visual.conv1.weight" not in state:
            raise ConversionError(f"--arch={arch} needs a CLIP visual tower (visual.conv1.*)")
        act = "quick_gelu" if arch == "openai" else "gelu"
        cfg, variables = convert_clip(state, act, vision_heads, text_heads)
    size = cfg["image_overrides"]["image_size"]
    model = build_model(cfg)
    check_variables(
        flatten_variables(variables),
        expected_shapes(model, size, cfg.get("context_length")),
        where="converted state dict",
    )
    if arch == "slip":  # SLIP evaluates with torchvision's default (bilinear) Resize.
        spec = preprocess_spec(size)
    else:
        spec = preprocess_spec(size, resample="bicubic", mean=OPENAI_MEAN, std=OPENAI_STD)
    return cfg, variables, spec


def convert_to_export(
    path: str,
    output: str,
    *,
    arch: str = "auto",
    vision_heads: int | None = None,
    text_heads: int | None = None,
    bpe: str | None = None,
    stablehlo: bool = True,
    overwrite: bool = False,
) -> str:
    """Converts a PyTorch checkpoint into an export directory `load_pretrained` reads.

    The text tower expects CLIP's BPE ids: with `bpe` (CLIP's `bpe_simple_vocab_16e6.txt.gz`,
    which ships with CLIP, open_clip and SLIP) the merges file is copied into the export and
    `encode_texts` / `zero_shot_classifier` tokenize with it; without it texts go in as ids
    through `encode_tokens`. model.json records how the source codebase cut over-long
    captions (`tokenizer_truncation`, `TOKENIZER_TRUNCATION`), and `encode_texts` cuts them
    the same way. Images need nothing (the export's preprocess.json has CLIP's or
    SLIP's resize and statistics). The params in the export are this codebase's tree, ready
    to fine-tune from.
    """
    from input_pipeline.tokenizers.clip_bpe import ClipBpeTokenizer
    from mmssl_jax.export.writer import write_export

    merges = ClipBpeTokenizer(bpe).merges_data if bpe else None  # fails before converting
    state = load_state_dict(path)
    resolved = detect_arch(state) if arch == "auto" else arch
    cfg, variables, spec = convert_state_dict(state, resolved, vision_heads, text_heads)
    source = {"torch_checkpoint": os.path.abspath(path), "arch": resolved}
    if bpe:
        source["bpe_merges"] = os.path.abspath(bpe)
    return write_export(
        output,
        model_cfg=cfg,
        variables=variables,
        preprocess=spec,
        text_length=cfg.get("context_length"),
        bpe_merges=merges,
        tokenizer_truncation=TOKENIZER_TRUNCATION[resolved],
        source=source,
        stablehlo=stablehlo,
        overwrite=overwrite,
    )
