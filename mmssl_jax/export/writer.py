"""Writes export directories: from variables (`write_export`) or from a training run's
checkpoint (`export_checkpoint`, what tools/export.py runs), with StableHLO artifacts.

The format itself (file names, manifest, checks) is `mmssl_jax.models.saved`.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from input_pipeline import tokenizers
from input_pipeline.tokenizers import clip_bpe
from mmssl_jax.models.model import l2_normalize
from mmssl_jax.models.saved import (
    BPE_MERGES,
    FORMAT,
    IMAGE_ARTIFACT,
    MANIFEST,
    MODEL,
    PARAMS,
    PREPROCESS,
    TEXT_ARTIFACT,
    TOKENIZER,
    VERSION,
    WORDPIECE,
    bpe_tokenizer,
    check_bpe_model,
    check_variables,
    expected_shapes,
    flatten_variables,
    unflatten_variables,
    write_manifest,
)
from mmssl_jax.training.restore import load_config, restore_variables
from mmssl_jax.training.state import open_tokenizer

# ImageNet statistics (this codebase's training and SLIP); OpenAI CLIP uses its own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESAMPLING = ("bilinear", "bicubic")
PLATFORMS = ("cpu", "cuda", "tpu")


def preprocess_spec(
    image_size: int,
    resize_size: int | None = None,
    *,
    resample: str = "bilinear",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> dict[str, Any]:
    """The evaluation transform: resize the short side to `resize_size` (default
    `image_size`) with `resample`, centre-crop `image_size`, x / 255, (x - mean) / std."""
    if resample not in RESAMPLING:
        raise ValueError(f"resample must be one of {RESAMPLING}, got {resample!r}")
    return {
        "image_size": int(image_size),
        "resize_size": int(resize_size or image_size),
        "resize": "short_side",
        "crop": "center",
        "resample": resample,
        "scale": 1.0 / 255.0,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "layout": "NHWC",
        "channels": "RGB",
        "dtype": "uint8",
    }


def image_embed_fn(model: Any, spec: Mapping[str, Any]) -> Callable:
    """`fn(variables, uint8 [B, S, S, 3]) -> float32 [B, D]` L2-normalised embeddings."""
    from mmssl_jax.models.model import MultimodalModel

    mean = np.asarray(spec["mean"], np.float32)
    std = np.asarray(spec["std"], np.float32)

    def fn(variables, images):
        # The same ops as input_pipeline.augment.to_float + normalize (training/evaluation).
        x = images.astype(jnp.float32) * jnp.float32(1.0 / 255.0)
        x = (x - mean) / std
        out = model.apply(variables, x, False, method=MultimodalModel.encode_image)
        return l2_normalize(out["emb"])

    return fn


def text_embed_fn(model: Any) -> Callable:
    """`fn(variables, int32 [B, L]) -> float32 [B, D]` L2-normalised embeddings."""
    from mmssl_jax.models.model import MultimodalModel

    def fn(variables, tokens):
        out = model.apply(variables, tokens, False, method=MultimodalModel.encode_text)
        return l2_normalize(out["emb"])

    return fn


def _on_flat(fn: Callable) -> Callable:
    """Wraps `fn(variables, x)` as `fn(flat_params_dict, x)` for the jax.export artifacts."""
    return lambda flat, x: fn(unflatten_variables(flat), x)


def export_stablehlo(
    fn: Callable,
    flat: Mapping[str, np.ndarray],
    input_shape: tuple[int, ...],
    input_dtype: Any,
    platforms: Sequence[str] = PLATFORMS,
) -> tuple[bytes, dict[str, Any]]:
    """Serialized `jax.export` of `fn(flat_params, x)` with a symbolic batch dimension.

    Falls back to the current platform only, then to a fixed batch of 1, if a richer export
    fails; the returned info says what was done (stored in model.json).
    """
    params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
    (batch,) = jax.export.symbolic_shape("b")
    errors = []
    for plats in (tuple(platforms), (jax.default_backend(),)):
        for b in (batch, 1):
            try:
                exported = jax.export.export(jax.jit(_on_flat(fn)), platforms=plats)(
                    params, jax.ShapeDtypeStruct((b, *input_shape), input_dtype)
                )
            except Exception as e:  # noqa: BLE001 - record and try the simpler export
                errors.append(f"{plats}, batch {b}: {type(e).__name__}: {e}")
                continue
            info = {
                "platforms": list(exported.platforms),
                "batch": "symbolic" if b is batch else 1,
                "input": {"shape": ["b" if b is batch else 1, *input_shape]},
                "output_shape": [str(d) for d in exported.out_avals[0].shape],
                "calling_convention_version": exported.calling_convention_version,
            }
            info["input"]["dtype"] = np.dtype(input_dtype).name
            if errors:
                info["fallback_reasons"] = errors
            return bytes(exported.serialize()), info
    raise RuntimeError("jax.export failed:\n" + "\n".join(errors))


def _chmod_like_umask(directory: str) -> None:
    """mkdtemp makes a private (0700) directory; give it the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def _plain(value: Any) -> Any:
    """ConfigDicts, tuples and numpy scalars -> JSON types."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, allow_nan=False)


def write_export(
    output: str,
    *,
    model_cfg: Mapping[str, Any],
    variables: Mapping[str, Any],
    preprocess: Mapping[str, Any],
    text_length: int | None = None,
    tokenizer_proto: bytes | None = None,
    bpe_merges: bytes | None = None,
    wordpiece_json: bytes | None = None,
    tokenizer_truncation: str | None = None,
    source: Mapping[str, Any] | None = None,
    stablehlo: bool = True,
    platforms: Sequence[str] = PLATFORMS,
    overwrite: bool = False,
) -> str:
    """Writes an export directory (see the module docstring); returns its path.

    `variables` is `{"params": ..., "batch_stats": ...}` of `build_model(model_cfg)`; it is
    checked against the shapes the config builds before anything is written. The tokenizer is
    a sentencepiece proto (`tokenizer_proto`), CLIP's BPE merges file (`bpe_merges`, stored
    as given) or a BERT tower's Hugging Face `tokenizer.json` (`wordpiece_json`), at most one.
    `tokenizer_truncation` ("keep_eot" or "cut", `clip_bpe.TRUNCATE_MODES`) records how the
    weights' own codebase cut over-long CLIP BPE captions; `load_pretrained` tokenizes so
    (absent means "keep_eot"). "cut" needs the BPE merges or no tokenizer at all.
    The directory is assembled next to `output` and renamed into place, so a failed export
    leaves no half-written directory; an existing export is replaced only with `overwrite=True`.
    """
    from safetensors.numpy import save_file

    from mmssl_jax.models.registry import build_model

    model_cfg = _plain(model_cfg)
    model = build_model(model_cfg)
    if model.text_encoder is not None and not text_length:
        raise ValueError("a model with a text encoder needs text_length")
    text_length = int(text_length) if model.text_encoder is not None else None
    given = [x is not None for x in (tokenizer_proto, bpe_merges, wordpiece_json)]
    if sum(given) > 1:
        raise ValueError("give one of tokenizer_proto, bpe_merges or wordpiece_json")
    if tokenizer_truncation is not None:
        clip_bpe.check_truncate(tokenizer_truncation)
        if tokenizer_truncation != "keep_eot" and (given[0] or given[2]):
            raise ValueError(
                f"tokenizer_truncation={tokenizer_truncation!r} is a CLIP BPE mode; a "
                "sentencepiece or WordPiece tokenizer always keeps its end token"
            )
    bpe_name = None
    if bpe_merges is not None:
        check_bpe_model(model, bpe_tokenizer(bpe_merges, "bpe_merges"), "bpe_merges")
        bpe_name = BPE_MERGES[0] if bpe_merges[:2] == b"\x1f\x8b" else BPE_MERGES[1]
    size = int(preprocess["image_size"])
    flat = flatten_variables(variables)
    check_variables(flat, expected_shapes(model, size, text_length), where="variables")

    scale = flat.get("params/logit_scale")
    log_scale = float(scale) if scale is not None else math.log(1 / 0.07)
    bias = flat.get("params/logit_bias")
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_cfg,
        "embed_dim": int(model.embed_dim),
        "text_length": text_length,
        "log_logit_scale": log_scale,
        "logit_scale": math.exp(min(log_scale, math.log(model.max_logit_scale))),
        "logit_bias": float(bias) if bias is not None else None,
        "has_text": model.text_encoder is not None,
        "has_tokenizer": any(given),
        "tokenizer": (
            "sentencepiece"
            if tokenizer_proto is not None
            else "clip_bpe"
            if bpe_name
            else "wordpiece"
            if wordpiece_json is not None
            else None
        ),
        **({"tokenizer_truncation": tokenizer_truncation} if tokenizer_truncation else {}),
        "source": _plain(dict(source or {})),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "artifacts": {},
    }

    output = os.path.abspath(output)
    if os.path.exists(output):
        if not overwrite:
            raise FileExistsError(f"{output} exists; pass overwrite=True to replace it")
        if os.listdir(output) and not os.path.exists(os.path.join(output, MANIFEST)):
            raise FileExistsError(f"{output} is not an export directory; refusing to replace it")
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        save_file(flat, os.path.join(tmp, PARAMS), metadata={"format": FORMAT})
        _write_json(os.path.join(tmp, PREPROCESS), _plain(dict(preprocess)))
        if tokenizer_proto is not None:
            with open(os.path.join(tmp, TOKENIZER), "wb") as f:
                f.write(tokenizer_proto)
        if bpe_name is not None:
            with open(os.path.join(tmp, bpe_name), "wb") as f:
                f.write(bpe_merges)
        if wordpiece_json is not None:
            with open(os.path.join(tmp, WORDPIECE), "wb") as f:
                f.write(wordpiece_json)
        if stablehlo:
            image_fn = image_embed_fn(model, preprocess)
            blob, info = export_stablehlo(image_fn, flat, (size, size, 3), np.uint8, platforms)
            with open(os.path.join(tmp, IMAGE_ARTIFACT), "wb") as f:
                f.write(blob)
            meta["artifacts"][IMAGE_ARTIFACT] = info
            if model.text_encoder is not None:
                text_fn = text_embed_fn(model)
                blob, info = export_stablehlo(text_fn, flat, (text_length,), np.int32, platforms)
                with open(os.path.join(tmp, TEXT_ARTIFACT), "wb") as f:
                    f.write(blob)
                meta["artifacts"][TEXT_ARTIFACT] = info
        _write_json(os.path.join(tmp, MODEL), meta)
        write_manifest(tmp)
        _chmod_like_umask(tmp)
        if os.path.exists(output):
            shutil.rmtree(output)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def export_checkpoint(
    workdir: str,
    output: str,
    *,
    step: int | None = None,
    config: Any = None,
    tokenizer: str | None = None,
    stablehlo: bool = True,
    overwrite: bool = False,
) -> str:
    """Exports a training run's checkpoint (latest, or `step`); what tools/export.py runs.

    `config` defaults to `workdir/config.json`; `tokenizer` overrides `config.data.tokenizer`
    (e.g. when the data moved since training).
    """
    from mmssl_jax.models.registry import build_model

    config = load_config(workdir, config)
    if tokenizer:
        config.data.tokenizer = tokenizer
    model_cfg, variables, step = restore_variables(config, workdir, step)
    model = build_model(model_cfg)
    stored: dict[str, bytes] = {}
    if model.text_encoder is not None:
        tok = open_tokenizer(config)
        arg = {"sentencepiece": "tokenizer_proto", "clip_bpe": "bpe_merges"}
        stored[arg.get(tokenizers.kind_of(tok), "wordpiece_json")] = tokenizers.to_bytes(tok)
    size = getattr(model.image_encoder, "image_size", None) or config.data.image_size
    return write_export(
        output,
        model_cfg=model_cfg,
        variables=variables,
        preprocess=preprocess_spec(size),
        text_length=model_cfg.get("context_length", config.data.text_length),
        source={"workdir": os.path.abspath(workdir), "step": step},
        stablehlo=stablehlo,
        overwrite=overwrite,
        **stored,
    )
