"""Export a trained model to a self-describing directory, and load it back (`load_pretrained`).

An export directory holds only data (JSON, safetensors, a sentencepiece proto or CLIP's BPE
merges text, serialized StableHLO); loading never unpickles or executes anything from it:

    manifest.json        format, version, and the sha256 and size of every other file
    model.json           model config (`registry.build_model`), logit scale/bias, text length
    preprocess.json      image size, short-side resize + centre crop, resampling, mean/std
    params.safetensors   every variable, '/'-joined keys: "params/image_encoder/cls_token",
                         "batch_stats/ssl_head/norm0/mean", ...
    tokenizer.model      the sentencepiece model (absent without a text tower or tokenizer)
    bpe_merges.txt[.gz]  or, for converted CLIP / open_clip / SLIP weights, CLIP's BPE merges
                         file as given (`input_pipeline.clip_bpe`; the text tower pools at argmax)
    encode_images.jax    jax.export: (params, uint8 [b, S, S, 3]) -> float32 [b, D], L2-normed
    encode_texts.jax     jax.export: (params, int32 [b, L]) -> float32 [b, D], L2-normed

The StableHLO artifacts take the parameters as their first argument (the dict read from
params.safetensors) instead of baking them in as constants: the weights are stored once, and
the artifacts stay small and compile fast. The batch dimension is symbolic, and they are
lowered for CPU, CUDA and TPU. With jax alone (no mmssl_jax, no flax):

    params = safetensors.numpy.load_file("EXPORT/params.safetensors")
    encode = jax.export.deserialize(open("EXPORT/encode_images.jax", "rb").read())
    emb = encode.call(params, images_uint8)          # images at preprocess.json's size

The sha256 manifest catches corrupted or edited files (integrity, not authenticity: whoever
can edit the files can edit the manifest too); a parameter whose shape differs from what the
model config builds is an error naming it.
"""

from __future__ import annotations

import datetime
import hashlib
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
from flax import traverse_util

FORMAT = "mmssl_jax-export"
VERSION = 1

MANIFEST = "manifest.json"
MODEL = "model.json"
PREPROCESS = "preprocess.json"
PARAMS = "params.safetensors"
TOKENIZER = "tokenizer.model"
BPE_MERGES = ("bpe_merges.txt.gz", "bpe_merges.txt")  # CLIP's merges file, gzipped or not
IMAGE_ARTIFACT = "encode_images.jax"
TEXT_ARTIFACT = "encode_texts.jax"
REQUIRED = (MODEL, PREPROCESS, PARAMS)

# ImageNet statistics (this codebase's training and SLIP); OpenAI CLIP uses its own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESAMPLING = ("bilinear", "bicubic")
PLATFORMS = ("cpu", "cuda", "tpu")


class ExportError(ValueError):
    """An export directory that is missing, corrupted, edited or does not fit its config."""


# ----------------------------------------------------------------------------- variables


def flatten_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{"params": {...}, "batch_stats": {...}} -> {"params/a/b": float32 array, ...}."""
    flat = traverse_util.flatten_dict(jax.device_get(dict(variables)))
    out = {}
    for path, value in flat.items():
        if any("/" in str(p) for p in path):
            raise ValueError(f"variable path {path} has a '/' in a name")
        out["/".join(str(p) for p in path)] = np.array(value, order="C")
    return out


def unflatten_variables(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_variables`."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def expected_shapes(model: Any, image_size: int, text_length: int | None) -> dict[str, Any]:
    """{flat key: ShapeDtypeStruct} of every variable the model creates (no compute)."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    tokens = None
    if model.text_encoder is not None:
        tokens = jax.ShapeDtypeStruct((1, text_length), jnp.int32)
    shapes = jax.eval_shape(
        lambda i, t: model.init(jax.random.key(0), i, t, train=False), images, tokens
    )
    flat = traverse_util.flatten_dict(dict(shapes))
    return {"/".join(path): value for path, value in flat.items()}


def check_variables(
    flat: Mapping[str, Any], expected: Mapping[str, Any], where: str = PARAMS
) -> None:
    """Raises ExportError naming the first missing, extra, wrong-shape or wrong-dtype entry."""
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise ExportError(
            f"{where}: parameter {missing[0]} is missing ({len(missing)} missing in all); "
            "the file does not match the model config"
        )
    extra = sorted(set(flat) - set(expected))
    if extra:
        raise ExportError(
            f"{where}: parameter {extra[0]} is not in the model ({len(extra)} unexpected)"
        )
    for key, want in expected.items():
        have = flat[key]
        if tuple(have.shape) != tuple(want.shape):
            raise ExportError(
                f"{where}: parameter {key} has shape {tuple(have.shape)} but the model config "
                f"needs {tuple(want.shape)}"
            )
        if np.dtype(have.dtype) != np.dtype(want.dtype):
            raise ExportError(
                f"{where}: parameter {key} has dtype {np.dtype(have.dtype)}, expected "
                f"{np.dtype(want.dtype)}"
            )


def _bpe_tokenizer(data: bytes, where: str) -> Any:
    from input_pipeline.clip_bpe import ClipBpeTokenizer

    try:
        return ClipBpeTokenizer.from_bytes(data)
    except ValueError as e:
        raise ExportError(f"{where}: {e}") from e


def check_bpe_model(model: Any, tokenizer: Any, where: str) -> None:
    """CLIP's BPE ids need a text tower that pools at argmax (id 0 is "!", not only padding)
    and whose embedding table holds every id; raises ExportError otherwise."""
    text = model.text_encoder
    if text is None:
        raise ExportError(f"{where}: the model has no text tower to tokenize for")
    if getattr(text, "pool", None) != "argmax":
        raise ExportError(
            f"{where}: CLIP's BPE ids need a text tower with pool='argmax', this one pools "
            f"with {getattr(text, 'pool', None)!r}"
        )
    if tokenizer.vocab_size > text.vocab_size:
        raise ExportError(
            f"{where}: the BPE vocabulary ({tokenizer.vocab_size} ids) exceeds the text "
            f"tower's embedding ({text.vocab_size} rows)"
        )


# ----------------------------------------------------------------------------- encoders


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


def _l2(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


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
        return _l2(out["emb"])

    return fn


def text_embed_fn(model: Any) -> Callable:
    """`fn(variables, int32 [B, L]) -> float32 [B, D]` L2-normalised embeddings."""
    from mmssl_jax.models.model import MultimodalModel

    def fn(variables, tokens):
        out = model.apply(variables, tokens, False, method=MultimodalModel.encode_text)
        return _l2(out["emb"])

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


# ----------------------------------------------------------------------------- writing


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str) -> dict[str, Any]:
    """(Re)writes manifest.json with the sha256 and size of every other file."""
    files = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name == MANIFEST or not os.path.isfile(path):
            continue
        files[name] = {"sha256": _sha256(path), "bytes": os.path.getsize(path)}
    manifest = {"format": FORMAT, "version": VERSION, "files": files}
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return manifest


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
    source: Mapping[str, Any] | None = None,
    stablehlo: bool = True,
    platforms: Sequence[str] = PLATFORMS,
    overwrite: bool = False,
) -> str:
    """Writes an export directory (see the module docstring); returns its path.

    `variables` is `{"params": ..., "batch_stats": ...}` of `build_model(model_cfg)`; it is
    checked against the shapes the config builds before anything is written. The tokenizer is
    a sentencepiece proto (`tokenizer_proto`) or CLIP's BPE merges file (`bpe_merges`, stored
    as given), at most one. The directory is
    assembled next to `output` and renamed into place, so a failed export leaves no half-
    written directory; an existing export is replaced only with `overwrite=True`.
    """
    from safetensors.numpy import save_file

    from mmssl_jax.models.registry import build_model

    model_cfg = _plain(model_cfg)
    model = build_model(model_cfg)
    if model.text_encoder is not None and not text_length:
        raise ValueError("a model with a text encoder needs text_length")
    text_length = int(text_length) if model.text_encoder is not None else None
    if tokenizer_proto is not None and bpe_merges is not None:
        raise ValueError("give a sentencepiece tokenizer_proto or bpe_merges, not both")
    bpe_name = None
    if bpe_merges is not None:
        check_bpe_model(model, _bpe_tokenizer(bpe_merges, "bpe_merges"), "bpe_merges")
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
        "has_tokenizer": tokenizer_proto is not None or bpe_merges is not None,
        "tokenizer": (
            "sentencepiece" if tokenizer_proto is not None else "clip_bpe" if bpe_name else None
        ),
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


# ----------------------------------------------------------------------------- from a workdir


def load_config(workdir: str, config: Any = None) -> Any:
    """`config` as given, or the run's `workdir/config.json` (written by mmssl_jax.main)."""
    import ml_collections

    if config is not None:
        return config
    path = os.path.join(workdir, "config.json")
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
    import orbax.checkpoint as ocp

    from mmssl_jax.checkpoint import CheckpointMismatchError
    from mmssl_jax.models.registry import build_model
    from mmssl_jax.train import resolve_model_config

    ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
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
    # A read-only manager: unlike the trainer's, it never cleans up temporary directories,
    # so exporting while the run is still training cannot disturb a checkpoint being written.
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    manager = ocp.CheckpointManager(ckpt_dir, options=options)
    try:
        steps = list(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {ckpt_dir}; train first")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise ValueError(f"no checkpoint for step {step} in {ckpt_dir}; have {sorted(steps)}")
        restore = ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        )
        try:
            variables = manager.restore(step, args=ocp.args.Composite(state=restore)).state
        except (ValueError, KeyError) as e:
            raise CheckpointMismatchError(
                f"checkpoint {ckpt_dir}/{step} does not hold the variables of the config's "
                f"model ({model_cfg.get('image_encoder')}, {model_cfg.get('text_encoder')}): {e}"
            ) from e
    finally:
        manager.close()
    variables = jax.device_get(dict(variables))
    check_variables(
        flatten_variables(variables),
        expected_shapes(model, size, context),
        where=f"checkpoint {ckpt_dir}/{step}",
    )
    return model_cfg, variables, int(step)


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
    from input_pipeline.tokenizer import Tokenizer
    from mmssl_jax.models.registry import build_model

    config = load_config(workdir, config)
    if tokenizer:
        config.data.tokenizer = tokenizer
    model_cfg, variables, step = restore_variables(config, workdir, step)
    model = build_model(model_cfg)
    proto = None
    if model.text_encoder is not None:
        proto = Tokenizer(config.data.tokenizer).model_proto
    size = getattr(model.image_encoder, "image_size", None) or config.data.image_size
    return write_export(
        output,
        model_cfg=model_cfg,
        variables=variables,
        preprocess=preprocess_spec(size),
        text_length=model_cfg.get("context_length", config.data.text_length),
        tokenizer_proto=proto,
        source={"workdir": os.path.abspath(workdir), "step": step},
        stablehlo=stablehlo,
        overwrite=overwrite,
    )


# ----------------------------------------------------------------------------- loading


def _read_json(directory: str, name: str) -> Any:
    path = os.path.join(directory, name)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ExportError(f"{path} is missing; not an export made by tools/export.py") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from e


def verify_export(directory: str) -> dict[str, Any]:
    """Checks the manifest (format, version) and every listed file's size and sha256."""
    if not os.path.isdir(directory):
        raise ExportError(f"{directory} is not a directory")
    manifest = _read_json(directory, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{directory}/{MANIFEST}: not a {FORMAT} manifest")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        raise ExportError(
            f"{directory}/{MANIFEST}: export version {manifest.get('version')} is newer than "
            f"this code reads ({VERSION}); upgrade mmssl_jax"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ExportError(f"{directory}/{MANIFEST}: no 'files' table")
    for name in REQUIRED:
        if name not in files:
            raise ExportError(f"{directory}/{MANIFEST} does not list {name}")
    for name, entry in files.items():
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ExportError(f"{directory}/{MANIFEST}: bad file name {name!r}")
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ExportError(f"{path} is listed in the manifest but missing")
        size = os.path.getsize(path)
        if size != entry.get("bytes"):
            raise ExportError(
                f"{path}: size {size} bytes differs from the manifest's {entry.get('bytes')}; "
                "the file was modified or truncated"
            )
        digest = _sha256(path)
        if digest != entry.get("sha256"):
            raise ExportError(
                f"{path}: sha256 {digest} differs from the manifest's {entry.get('sha256')}; "
                "the file was modified or corrupted"
            )
    return manifest


def _bucket(n: int, batch_size: int) -> int:
    """Padded batch for a chunk of n: the next power of two (at least 8), at most batch_size,
    so a few compiled shapes serve every input size."""
    return min(batch_size, max(8, 1 << max(0, math.ceil(math.log2(max(n, 1))))))


def _resize_center_crop(image: np.ndarray, size: int, resize_size: int, resample: str):
    """Short side to `resize_size`, centre crop `size` (torchvision's Resize + CenterCrop)."""
    from input_pipeline import transforms

    if resample == "bilinear":  # exactly the evaluation pipeline's transform
        return transforms.resize_center_crop(image, size, resize_size)
    from PIL import Image

    im = Image.fromarray(image)
    width, height = im.size
    if width <= height:
        new_w, new_h = resize_size, int(resize_size * height / width)
    else:
        new_w, new_h = int(resize_size * width / height), resize_size
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return np.asarray(im.resize((size, size), Image.Resampling.BICUBIC, box=box))


class PretrainedModel:
    """A loaded export: batched, jitted encoders with the export's own preprocessing.

    Attributes: `model` (MultimodalModel), `variables`, `config` (model.json), `preprocess`
    (preprocess.json), `tokenizer` (or None), `text_length`, `batch_size`.
    """

    def __init__(
        self,
        model: Any,
        variables: dict[str, Any],
        config: dict[str, Any],
        preprocess: dict[str, Any],
        tokenizer: Any = None,
        batch_size: int = 256,
    ):
        self.model, self.config, self.preprocess = model, config, preprocess
        self.variables = jax.device_put(variables)
        self.tokenizer, self.batch_size = tokenizer, int(batch_size)
        self.text_length = config.get("text_length")
        self.image_size = int(preprocess["image_size"])
        self._images = jax.jit(image_embed_fn(model, preprocess))
        self._tokens = jax.jit(text_embed_fn(model)) if model.text_encoder else None

    @property
    def logit_scale(self) -> float:
        """The InfoNCE multiplier exp(logit_scale), clamped as in training."""
        return float(self.config["logit_scale"])

    @property
    def logit_bias(self) -> float | None:
        return self.config.get("logit_bias")

    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])

    def preprocess_images(self, images: Any) -> np.ndarray:
        """uint8 [B, H, W, 3] (or a list of [H, W, 3] of any sizes) -> uint8 [B, S, S, 3]."""
        size = self.image_size
        if isinstance(images, np.ndarray):
            if images.ndim != 4:
                raise ValueError(f"expected uint8 images [B, H, W, 3], got shape {images.shape}")
            self._check_image(images, "images")
            if images.shape[1:3] == (size, size):
                return images
            batch = list(images)
        else:
            batch = [np.asarray(im) for im in images]
        out = np.empty((len(batch), self.image_size, self.image_size, 3), np.uint8)
        for i, im in enumerate(batch):
            self._check_image(im[None], f"images[{i}]")
            if im.shape[:2] == (self.image_size, self.image_size):
                out[i] = im
            else:
                out[i] = _resize_center_crop(
                    im,
                    self.image_size,
                    max(self.image_size, self.preprocess["resize_size"]),
                    self.preprocess["resample"],
                )
        return out

    @staticmethod
    def _check_image(x: np.ndarray, what: str) -> None:
        if x.dtype != np.uint8:
            raise TypeError(f"{what}: expected uint8 RGB in 0..255, got {x.dtype}")
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"{what}: expected [..., H, W, 3] RGB, got shape {x.shape[1:]}")

    def _batched(self, fn: Callable, x: np.ndarray, batch_size: int | None) -> np.ndarray:
        bs = int(batch_size or self.batch_size)
        chunks = []
        for i in range(0, len(x), bs):
            chunk = x[i : i + bs]
            padded = _bucket(len(chunk), bs)
            if padded != len(chunk):
                pad = np.zeros((padded - len(chunk), *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            chunks.append(np.asarray(fn(self.variables, chunk))[: min(bs, len(x) - i)])
        if not chunks:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.concatenate(chunks)

    def encode_images(self, images: Any, batch_size: int | None = None) -> np.ndarray:
        """uint8 [B, H, W, 3] of any size -> float32 [B, D], L2-normalised."""
        return self._batched(self._images, self.preprocess_images(images), batch_size)

    def encode_tokens(self, tokens: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """int32 [B, L] token ids -> float32 [B, D], L2-normalised."""
        if self._tokens is None:
            raise ValueError("this export has no text encoder")
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"expected int tokens [B, L], got {tokens.dtype} {tokens.shape}")
        return self._batched(self._tokens, tokens.astype(np.int32), batch_size)

    def encode_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Captions -> float32 [B, D], L2-normalised (tokenised with the export's tokenizer)."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of strings, not one string")
        if self._tokens is None:
            raise ValueError("this export has no text encoder")
        if self.tokenizer is None:
            raise ValueError(
                "this export has no tokenizer.model (nor CLIP BPE merges: convert with "
                "--bpe=FILE); tokenize yourself and call encode_tokens"
            )
        return self.encode_tokens(self.tokenizer.encode(list(texts), self.text_length), batch_size)

    def zero_shot_classifier(
        self, classnames: Sequence[str | Sequence[str]], templates: str | Sequence[str]
    ) -> np.ndarray:
        """[C, D] class embeddings: per class, the mean of its L2-normalised prompt
        embeddings (every template x synonym), renormalised (CLIP's prompt ensembling).
        `templates` is a list of "{}" format strings or a bundled set name ("imagenet80")."""
        from mmssl_jax.evaluation.templates import load_templates
        from mmssl_jax.evaluation.zero_shot import class_embeddings

        if isinstance(templates, str):
            templates = load_templates(templates)
        return class_embeddings(self.encode_texts, list(classnames), list(templates))


def load_pretrained(path: str, *, batch_size: int = 256) -> PretrainedModel:
    """Loads an export made by tools/export.py or tools/convert_torch.py.

    Verifies the manifest (sha256 of every file), builds the model from model.json, and checks
    every parameter in params.safetensors against the shapes that config builds. Raises
    ExportError naming the file or parameter at fault.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from input_pipeline.tokenizer import Tokenizer
    from mmssl_jax.models.registry import build_model

    path = os.fspath(path)
    manifest = verify_export(path)
    config = _read_json(path, MODEL)
    preprocess = _read_json(path, PREPROCESS)
    for key in ("model", "embed_dim", "logit_scale"):
        if key not in config:
            raise ExportError(f"{path}/{MODEL}: missing key {key!r}")
    for key in ("image_size", "resize_size", "resample", "mean", "std"):
        if key not in preprocess:
            raise ExportError(f"{path}/{PREPROCESS}: missing key {key!r}")
    if preprocess["resample"] not in RESAMPLING:
        raise ExportError(f"{path}/{PREPROCESS}: unknown resample {preprocess['resample']!r}")
    try:
        model = build_model(config["model"])
    except (ValueError, TypeError, KeyError) as e:
        raise ExportError(f"{path}/{MODEL}: cannot build the model: {e}") from e
    try:
        flat = load_file(os.path.join(path, PARAMS))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{path}/{PARAMS}: not a readable safetensors file: {e}") from e
    text_length = config.get("text_length")
    expected = expected_shapes(model, int(preprocess["image_size"]), text_length)
    check_variables(flat, expected, where=f"{path}/{PARAMS}")
    tokenizer = None
    found = [name for name in (TOKENIZER, *BPE_MERGES) if name in manifest["files"]]
    if len(found) > 1:
        raise ExportError(f"{path}: more than one tokenizer file ({', '.join(found)})")
    if model.text_encoder is not None and found == [TOKENIZER]:
        with open(os.path.join(path, TOKENIZER), "rb") as f:
            try:
                tokenizer = Tokenizer.from_bytes(f.read())
            except ValueError as e:
                raise ExportError(f"{path}/{TOKENIZER}: {e}") from e
    elif model.text_encoder is not None and found:
        where = f"{path}/{found[0]}"
        with open(where, "rb") as f:
            tokenizer = _bpe_tokenizer(f.read(), where)
        check_bpe_model(model, tokenizer, where)
    return PretrainedModel(
        model, unflatten_variables(flat), config, preprocess, tokenizer, batch_size
    )
