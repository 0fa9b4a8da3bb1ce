"""The on-disk format of a trained model (an export directory), read and checked.

An export directory holds only data (JSON, safetensors, a sentencepiece proto or CLIP's BPE
merges text, serialized StableHLO); loading never unpickles or executes anything from it:

    manifest.json        format, version, and the sha256 and size of every other file
    model.json           model config (`registry.build_model`), logit scale/bias, text length,
                         for CLIP's BPE how long captions are cut (`tokenizer_truncation`:
                         "keep_eot", also when absent, or "cut" for converted SLIP weights)
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

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmssl_jax import pytree
from mmssl_jax.checksums import file_sha256

FORMAT = "mmssl_jax-export"
VERSION = 1
MANIFEST = "manifest.json"
MODEL = "model.json"
PREPROCESS = "preprocess.json"
PARAMS = "params.safetensors"
TOKENIZER = "tokenizer.model"
WORDPIECE = "tokenizer.json"  # a BERT tower's Hugging Face tokenizer (WordPiece)
BPE_MERGES = ("bpe_merges.txt.gz", "bpe_merges.txt")  # CLIP's merges file, gzipped or not
IMAGE_ARTIFACT = "encode_images.jax"
TEXT_ARTIFACT = "encode_texts.jax"
REQUIRED = (MODEL, PREPROCESS, PARAMS)


class ExportError(ValueError):
    """An export directory that is missing, corrupted, edited or does not fit its config."""


def flatten_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{"params": {...}, "batch_stats": {...}} -> {"params/a/b": float32 array, ...}."""
    flat = pytree.flatten(jax.device_get(dict(variables)))
    return {k: np.array(v, order="C") for k, v in flat.items()}


def unflatten_variables(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_variables`."""
    return pytree.unflatten(flat)


def expected_shapes(model: Any, image_size: int, text_length: int | None) -> dict[str, Any]:
    """{flat key: ShapeDtypeStruct} of every variable the model creates (no compute)."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    tokens = None
    if model.text_encoder is not None:
        tokens = jax.ShapeDtypeStruct((1, text_length), jnp.int32)
    shapes = jax.eval_shape(
        lambda i, t: model.init(jax.random.key(0), i, t, train=False), images, tokens
    )
    return pytree.flatten(dict(shapes))


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


def write_manifest(directory: str) -> dict[str, Any]:
    """(Re)writes manifest.json with the sha256 and size of every other file."""
    files = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name == MANIFEST or not os.path.isfile(path):
            continue
        files[name] = {"sha256": file_sha256(path), "bytes": os.path.getsize(path)}
    manifest = {"format": FORMAT, "version": VERSION, "files": files}
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return manifest


def read_json(directory: str, name: str) -> Any:
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
    manifest = read_json(directory, MANIFEST)
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
        digest = file_sha256(path)
        if digest != entry.get("sha256"):
            raise ExportError(
                f"{path}: sha256 {digest} differs from the manifest's {entry.get('sha256')}; "
                "the file was modified or corrupted"
            )
    return manifest


def bpe_tokenizer(data: bytes, where: str, truncate: str = "keep_eot") -> Any:
    """CLIP's BPE tokenizer from a merges file's bytes; ExportError naming `where` if bad."""
    from input_pipeline.tokenizers.clip_bpe import ClipBpeTokenizer

    try:
        return ClipBpeTokenizer.from_bytes(data, truncate=truncate)
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
