"""`load_pretrained(path)`: an export directory as a host-side encoder of images and texts."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from mmssl_jax.export.writer import RESAMPLING, image_embed_fn, text_embed_fn
from mmssl_jax.models.saved import (
    BPE_MERGES,
    MODEL,
    PARAMS,
    PREPROCESS,
    TOKENIZER,
    WORDPIECE,
    ExportError,
    bpe_tokenizer,
    check_bpe_model,
    check_variables,
    expected_shapes,
    read_json,
    unflatten_variables,
    verify_export,
)


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


_AS_PIL = "pass greyscale or RGBA pictures as PIL images, which are converted to RGB"


def _is_pil_image(x: Any) -> bool:
    """Whether `x` is a PIL image (without importing PIL when nothing has)."""
    module = sys.modules.get("PIL.Image")
    return module is not None and isinstance(x, module.Image)


def _pil_to_rgb(image: Any) -> np.ndarray:
    """A PIL image of any mode as uint8 [H, W, 3] RGB (alpha dropped, as CLIP's loaders do)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def _as_image(x: Any, what: str) -> np.ndarray:
    """One list element (a PIL image or an [H, W, 3] array) as a numpy array."""
    if _is_pil_image(x):
        return _pil_to_rgb(x)
    if not (isinstance(x, np.ndarray) or hasattr(x, "__array__")):
        raise TypeError(
            f"{what}: expected a PIL image or a uint8 [H, W, 3] array, got {type(x).__name__}"
        )
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(
            f"{what}: expected one uint8 image [H, W, 3], got shape {x.shape} ({_AS_PIL})"
        )
    return x


def _check_image(x: np.ndarray, what: str) -> None:
    """uint8 [B, H, W, 3] or a clear error (a float image or a greyscale array is a mistake
    the model would not notice)."""
    if x.dtype != np.uint8:
        raise TypeError(f"{what}: expected uint8 RGB in 0..255, got {x.dtype}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{what}: expected [H, W, 3] RGB, got shape {x.shape[1:]} ({_AS_PIL})")


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
        """Images as a user has them -> uint8 [B, S, S, 3], resized and centre-cropped per
        preprocess.json.

        Accepts a PIL image or a list of them (greyscale, RGBA, palette... converted to RGB),
        one uint8 [H, W, 3] array, a uint8 [B, H, W, 3] array, or a list of [H, W, 3] arrays
        of different sizes (PIL images and arrays may be mixed).
        """
        size = self.image_size
        single = True  # one picture: errors name "image", else "images[i]"
        if _is_pil_image(images):
            batch = [_pil_to_rgb(images)]
        elif isinstance(images, np.ndarray) or hasattr(images, "__array__"):
            array = np.asarray(images)
            if array.ndim == 4:
                _check_image(array, "images")
                if array.shape[1:3] == (size, size):
                    return array
                batch, single = list(array), False
            elif array.ndim == 3:
                batch = [array]
            else:
                raise ValueError(
                    "images: expected one uint8 image [H, W, 3] or a batch [B, H, W, 3], got "
                    f"shape {array.shape} ({_AS_PIL})"
                )
        elif isinstance(images, (str, bytes)) or not hasattr(images, "__iter__"):
            raise TypeError(
                "images: expected a PIL image, a uint8 [H, W, 3] or [B, H, W, 3] array, or a "
                f"list of those images, got {type(images).__name__} (open files first, e.g. "
                "with PIL.Image.open)"
            )
        else:
            batch = [_as_image(im, f"images[{i}]") for i, im in enumerate(images)]
            single = False
        out = np.empty((len(batch), size, size, 3), np.uint8)
        for i, im in enumerate(batch):
            _check_image(im[None], "image" if single else f"images[{i}]")
            if im.shape[:2] == (size, size):
                out[i] = im
            else:
                out[i] = _resize_center_crop(
                    im,
                    size,
                    max(size, self.preprocess["resize_size"]),
                    self.preprocess["resample"],
                )
        return out

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
        """Images (any form `preprocess_images` takes) -> float32 [B, D], L2-normalised."""
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
        from input_pipeline.templates import load_templates
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

    from input_pipeline.tokenizers.clip_bpe import TRUNCATE_MODES
    from input_pipeline.tokenizers.spm import Tokenizer
    from input_pipeline.tokenizers.wordpiece import WordPieceTokenizer
    from mmssl_jax.models.registry import build_model

    path = os.fspath(path)
    manifest = verify_export(path)
    config = read_json(path, MODEL)
    preprocess = read_json(path, PREPROCESS)
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
    truncation = config.get("tokenizer_truncation", "keep_eot")  # absent in older exports
    if truncation not in TRUNCATE_MODES:
        raise ExportError(
            f"{path}/{MODEL}: tokenizer_truncation must be one of {TRUNCATE_MODES}, got "
            f"{truncation!r}"
        )
    text_length = config.get("text_length")
    expected = expected_shapes(model, int(preprocess["image_size"]), text_length)
    check_variables(flat, expected, where=f"{path}/{PARAMS}")
    tokenizer = None
    found = [name for name in (TOKENIZER, WORDPIECE, *BPE_MERGES) if name in manifest["files"]]
    if len(found) > 1:
        raise ExportError(f"{path}: more than one tokenizer file ({', '.join(found)})")
    if model.text_encoder is not None and found == [TOKENIZER]:
        with open(os.path.join(path, TOKENIZER), "rb") as f:
            try:
                tokenizer = Tokenizer.from_bytes(f.read())
            except ValueError as e:
                raise ExportError(f"{path}/{TOKENIZER}: {e}") from e
    elif model.text_encoder is not None and found == [WORDPIECE]:
        with open(os.path.join(path, WORDPIECE), "rb") as f:
            try:
                tokenizer = WordPieceTokenizer.from_bytes(f.read())
            except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own type
                raise ExportError(f"{path}/{WORDPIECE}: not a tokenizer.json: {e}") from e
    elif model.text_encoder is not None and found:
        where = f"{path}/{found[0]}"
        with open(where, "rb") as f:
            tokenizer = bpe_tokenizer(f.read(), where, truncation)
        check_bpe_model(model, tokenizer, where)
    if truncation != "keep_eot" and found and found[0] not in BPE_MERGES:
        raise ExportError(
            f"{path}/{MODEL}: tokenizer_truncation={truncation!r} is a CLIP BPE mode, but the "
            f"tokenizer is {found[0]}"
        )
    return PretrainedModel(
        model, unflatten_variables(flat), config, preprocess, tokenizer, batch_size
    )
