"""What the evaluators need from a model, and helpers to run one over large arrays.

The evaluators never see a train state: they see an `Encoder`, two host-side functions from
uint8 images and strings to numpy features. The trainer builds one from its state (jitted,
batched, sharded like training); `RawPixelEncoder` is the raw-pixel baseline. Keeping the
boundary at numpy makes every evaluator a pure function that tests can feed exact values.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image
from tqdm.auto import tqdm


@runtime_checkable
class Encoder(Protocol):
    """A frozen model seen from the host.

    `image_features(images uint8 [B, H, W, 3])` returns float arrays [B, *] keyed by layer:
    "emb" (L2-normalised projected embedding), "feature" (pre-projection feature) and
    "block_{i}" (class token after ViT block i, when the encoder was asked for them).
    `text_embeddings(texts)` returns L2-normalised [len(texts), D] in the space of "emb".
    An encoder without a text tower sets `has_text = False`.
    """

    def image_features(self, images: np.ndarray) -> dict[str, np.ndarray]: ...

    def text_embeddings(self, texts: list[str]) -> np.ndarray: ...


def has_text(encoder: Encoder) -> bool:
    """Whether `encoder` can embed text (zero-shot and retrieval need it).

    Reads `encoder.has_text` when it exists; otherwise tries one text and reports whether
    that worked (an image-only model raises ValueError or NotImplementedError).
    """
    flag = getattr(encoder, "has_text", None)
    if flag is not None:
        return bool(flag)
    try:
        encoder.text_embeddings(["a photo"])
    except (ValueError, NotImplementedError, TypeError, AttributeError):
        return False
    return True


# Held around each encoder call. Evaluation tasks run on worker threads (runner.py), and a
# jitted call over several devices must not interleave with another thread's on the same
# devices (each device runs its queue in order, so two such calls enqueued in opposite orders
# could wait on each other); the host-side fits, the bulk of the time, still overlap.
DEVICE_LOCK = threading.RLock()


def host_threads() -> int:
    """Threads for the host-side evaluators (BLAS, OpenMP): MMSSL_EVAL_THREADS, else half the
    cores (at most 8).

    scikit-learn's L-BFGS and t-SNE spin their BLAS/OpenMP threads; on a small or shared
    machine that oversubscription made them about ten times slower (2 busy cores), while at
    eval sizes one thread per two cores loses little.
    """
    env = os.environ.get("MMSSL_EVAL_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(8, (os.cpu_count() or 2) // 2))


_LIMITS_LOCK = threading.Lock()
_LIMITS: dict[str | None, list] = {}  # user_api -> [depth, threadpoolctl limiter]


@contextlib.contextmanager
def limit_threads(limits: int, user_api: str | None = None) -> Iterator[None]:
    """threadpoolctl's `threadpool_limits(limits, user_api)`, shared by overlapping scopes.

    The BLAS and OpenMP thread counts are process-wide, and evaluation tasks run on worker
    threads (runner.py): with plain nested limits, one task's exit would restore the count
    under another task still fitting. Here the first scope per `user_api` sets the limit,
    later overlapping ones share it, and the last to leave restores the original.
    """
    from threadpoolctl import threadpool_limits

    with _LIMITS_LOCK:
        entry = _LIMITS.setdefault(user_api, [0, None])
        if entry[0] == 0:
            entry[1] = threadpool_limits(limits=limits, user_api=user_api)
        entry[0] += 1
    try:
        yield
    finally:
        with _LIMITS_LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                entry[1].restore_original_limits()
                entry[1] = None


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """x / ||x||, float32; zero rows stay zero instead of becoming NaN."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


class RawPixelEncoder:
    """The raw-pixel baseline: "feature" = the image's pixels in [0, 1], flattened.

    `size` downsamples first (bilinear) so that a probe on 224 px images stays tractable;
    None keeps the input resolution. It has no text tower and no embedding.
    """

    has_text = False

    def __init__(self, size: int | None = None):
        self.size = size

    def image_features(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        if self.size is not None and images.shape[1:3] != (self.size, self.size):
            images = np.stack(
                [
                    np.asarray(Image.fromarray(im).resize((self.size, self.size), Image.BILINEAR))
                    for im in images
                ]
            )
        return {"feature": images.reshape(len(images), -1).astype(np.float32) / 255.0}

    def text_embeddings(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError("raw pixels have no text tower")


def _batches(n: int, batch_size: int) -> range:
    return range(0, n, batch_size)


def encode_images(
    encoder: Encoder,
    images: np.ndarray,
    *,
    batch_size: int = 256,
    layers: Sequence[str] | None = None,
    desc: str = "images",
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Runs `encoder.image_features` over `images` in batches and concatenates the outputs.

    The last batch is padded (repeating its last image) to `batch_size` and the padding is cut
    from the outputs, so a jitted encoder sees one shape and nothing is dropped. `layers`
    keeps only those keys (all when None).
    """
    n = len(images)
    if n == 0:
        raise ValueError("encode_images: no images")
    chunks: dict[str, list[np.ndarray]] = {}
    steps = math.ceil(n / batch_size)
    for start in tqdm(
        _batches(n, batch_size), total=steps, desc=desc, disable=not progress, leave=False
    ):
        batch = images[start : start + batch_size]
        valid = len(batch)
        if valid < batch_size and n > batch_size:
            pad = np.repeat(batch[-1:], batch_size - valid, axis=0)
            batch = np.concatenate([batch, pad])
        with DEVICE_LOCK:
            out = {
                key: np.asarray(value)
                for key, value in encoder.image_features(batch).items()
                if layers is None or key in layers
            }
        for key, value in out.items():
            chunks.setdefault(key, []).append(value[:valid])
    return {key: np.concatenate(parts) for key, parts in chunks.items()}


def encode_texts(
    encoder: Encoder,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    desc: str = "texts",
    progress: bool = True,
) -> np.ndarray:
    """Runs `encoder.text_embeddings` over `texts` in padded batches (see encode_images)."""
    texts = list(texts)
    n = len(texts)
    if n == 0:
        raise ValueError("encode_texts: no texts")
    parts = []
    steps = math.ceil(n / batch_size)
    for start in tqdm(
        _batches(n, batch_size), total=steps, desc=desc, disable=not progress, leave=False
    ):
        batch = texts[start : start + batch_size]
        valid = len(batch)
        if valid < batch_size and n > batch_size:
            batch = batch + [batch[-1]] * (batch_size - valid)
        with DEVICE_LOCK:
            parts.append(np.asarray(encoder.text_embeddings(batch))[:valid])
    return np.concatenate(parts)
