"""The baselines beside every result: raw pixels, the same architecture at random init, and
for the text evaluations a ridge map from pixels into the model's text space.

A number means little alone: 80% linear-probe accuracy on Fashion-MNIST is worse than
logistic regression on raw pixels (82.8%). So every evaluation is rerun, on the same split,
with (a) `RawPixelEncoder` (pixels, downsampled to `raw_pixel_size`, as the "feature"
layer; every requested layer falls back to it) and (b) a randomly initialised encoder of the
trained architecture, which the trainer supplies (an Encoder, or a zero-argument factory so
it is only built when needed).

(c) `ridge_map` (zero-shot and retrieval only, the evaluators with NEEDS_TEXT): ridge
regression from raw pixels (downsampled to the map's `raw_pixel_size`, as RawPixelEncoder
does) of an image-text training split to the mean of the L2-normalised text embeddings of each
image's captions, fit in closed form with the ridge strength chosen on a held-out part of that
split; the map is then the image encoder and the trained model's text tower the text encoder.
It shows what the image tower adds over a linear map into the same text space.

The target space is the model's text tower. It is a fixed reference only when that tower was
pretrained (a BERT-family tower, `model.text_pretrained`): then the ridge map answers "what
would a linear pixel model score against the same texts". A text tower trained from scratch
beside the image tower learned its space from that image tower, so a map into it is not a
baseline of the image tower; the hook (hook.py) therefore offers the ridge map only with a
pretrained text tower (locked, or tuned: then its parameters, hashed into `text_id`, are part
of the cache key, and a tuned tower's space has co-adapted with the image tower, which the
report cannot show). `RidgeMap` itself is generic: any text encoder and image-text split.

No baseline changes while a run trains (the ridge map not while the text tower is fixed), so
their metrics are cached: in memory for the process and in `<workdir>/eval/baselines.json`,
keyed by the evaluation's name, its config and the baseline kind (the ridge map's also by its
own settings and `text_id`). Delete that file after changing the model of an existing workdir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from mmssl_jax.evaluation.encoder import (
    Encoder,
    RawPixelEncoder,
    encode_texts,
    has_text,
    l2_normalize,
)

RAW_PIXELS, RANDOM_INIT, RIDGE_MAP = "raw_pixels", "random_init", "ridge_map"
KINDS = (RAW_PIXELS, RANDOM_INIT, RIDGE_MAP)

EncoderOrFactory = Encoder | Callable[[], Encoder]


# Keys that change how results are shown or computed in batches, not what they are.
PRESENTATION_KEYS = frozenset({"plots", "tsne", "tsne_points", "groups", "batch_size", "baselines"})


def fingerprint(cfg: Mapping) -> str:
    """A short stable hash of what an evaluation's numbers depend on (its cache key)."""
    skip = PRESENTATION_KEYS
    if not cfg.get("_raw_pixels", True):  # an evaluation that trains the tower: its batch
        skip = PRESENTATION_KEYS - {"batch_size"}  # size changes what it learns
    kept = {k: v for k, v in dict(cfg).items() if k not in skip}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def resolve(encoder: EncoderOrFactory | None) -> Encoder | None:
    """An Encoder from an Encoder or a zero-argument factory (None stays None)."""
    if encoder is None or hasattr(encoder, "image_features"):
        return encoder
    return encoder()


def applies(kind: str, evaluator: Any, encoder: Encoder | None) -> bool:
    """Whether baseline `kind` can run an evaluation of module `evaluator` with `encoder`
    (raw pixels only where `evaluator.RAW_PIXELS`, the ridge map only for text evaluations,
    text evaluations only with a text tower)."""
    if encoder is None or (kind == RAW_PIXELS and not evaluator.RAW_PIXELS):
        return False
    if kind == RIDGE_MAP and not evaluator.NEEDS_TEXT:
        return False
    return not evaluator.NEEDS_TEXT or has_text(encoder)


# ----------------------------------------------------------------------------------------
# The ridge map


def ridge_solve(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(W [P, D], b [D]) minimising ||x W + b - y||^2 + alpha ||W||^2 (bias unpenalised):
    W = (Xc^T Xc + alpha I)^-1 Xc^T Yc on centred data, b = mean(y) - mean(x) W."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    # The P x P normal equations: P (pixels at 8-16 px: 192-768) is below N here.
    gram = xc.T @ xc + alpha * np.eye(x.shape[1])
    w = np.linalg.solve(gram, xc.T @ yc)
    return w, my - mx @ w


def holdout_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, validation indices): a seeded permutation, the first ceil(f n) held out."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"ridge_map: val_fraction must lie in (0, 1); got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = math.ceil(val_fraction * n)
    if n_val >= n:
        raise ValueError(f"ridge_map: {n} training images are too few to hold some out")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def fit_ridge(
    x: np.ndarray,
    y: np.ndarray,
    alphas: Sequence[float],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, float, dict[float, float]]:
    """Ridge map x -> y: alpha with the lowest held-out mean squared error (ties: the larger,
    more regularised), then refit on all of x. Returns (W, b, alpha, {alpha: val MSE})."""
    scores: dict[float, float] = {}
    if len(alphas) > 1:
        fit, val = holdout_split(len(x), val_fraction, seed)
        for alpha in alphas:
            w, b = ridge_solve(x[fit], y[fit], float(alpha))
            scores[float(alpha)] = float(np.mean((x[val] @ w + b - y[val]) ** 2))
        best = min(sorted(scores, reverse=True), key=lambda a: scores[a])
    else:
        best = float(alphas[0])
    w, b = ridge_solve(x, y, best)
    return w, b, best, scores


def caption_targets(
    text_encoder: Encoder, captions: Sequence[Sequence[str]], batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(targets [N', D], kept image indices): per image with captions, the mean of its
    captions' L2-normalised text embeddings (not renormalised: the least-squares target)."""
    texts, owner = [], []
    for i, caps in enumerate(captions):
        caps = [caps] if isinstance(caps, str) else list(caps)
        texts += caps
        owner += [i] * len(caps)
    if not texts:
        raise ValueError("ridge_map: the training records carry no captions")
    emb = l2_normalize(encode_texts(text_encoder, texts, batch_size=batch_size, desc="ridge"))
    owner_arr = np.asarray(owner)
    kept = np.unique(owner_arr)
    sums = np.zeros((len(captions), emb.shape[1]), np.float64)
    np.add.at(sums, owner_arr, emb)
    counts = np.bincount(owner_arr, minlength=len(captions))
    return (sums[kept] / counts[kept, None]).astype(np.float32), kept


class RidgeMapEncoder:
    """Image "emb" = L2-normalised (pixels W + b); texts from `text_source` (the model's
    text tower), which the evaluators' text cache shares with that encoder."""

    has_text = True

    def __init__(self, text_source: Encoder, weights: np.ndarray, bias: np.ndarray, size: int):
        self.text_source = text_source
        self.weights, self.bias = weights.astype(np.float32), bias.astype(np.float32)
        self.pixels = RawPixelEncoder(size)

    def image_features(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = self.pixels.image_features(images)["feature"]
        return {"emb": l2_normalize(x @ self.weights + self.bias)}

    def text_embeddings(self, texts: list[str]) -> np.ndarray:
        return self.text_source.text_embeddings(texts)


_RIDGE_FITS: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # per process, by identity


@dataclasses.dataclass(frozen=True)
class RidgeMap:
    """The ridge-map baseline's settings: an image-text training split (`shards`; a seeded
    random `limit` of its records, at `image_size`), the pixel side, the alpha grid, the
    held-out fraction, and `text_id`, the identity of the text tower it maps into (path +
    parameter hash)."""

    shards: str
    text_id: str
    limit: int | None = 2000
    image_size: int = 32
    raw_pixel_size: int = 16
    alphas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0)
    val_fraction: float = 0.2
    seed: int = 0
    batch_size: int = 256

    def subset(self, n: int) -> np.ndarray:
        """The records it fits on: all n, or a seeded random `limit` of them in file order
        (shards are often ordered by class: the emoji's first 1000 hold 26 of 99 subgroups)."""
        if self.limit is None or self.limit >= n:
            return np.arange(n)
        return np.sort(np.random.default_rng(self.seed).choice(n, self.limit, replace=False))

    def identity(self) -> dict:
        """What its metrics depend on (part of their cache key)."""
        out = dataclasses.asdict(self)
        out.pop("batch_size")
        out["alphas"] = [float(a) for a in self.alphas]
        return out

    def build(self, text_encoder: Encoder) -> RidgeMapEncoder:
        """Fits the map (once per process and identity) and wraps it with `text_encoder`."""
        key = json.dumps(self.identity(), sort_keys=True)
        if key not in _RIDGE_FITS:
            from input_pipeline.pipeline import build_eval_arrays
            from mmssl_jax.evaluation.context import shard_paths

            arrays = build_eval_arrays(
                shard_paths("ridge_map", "shards", self.shards), image_size=self.image_size
            )
            rows = self.subset(len(arrays["image"]))
            captions = [arrays["texts"][i] for i in rows]
            targets, kept = caption_targets(text_encoder, captions, self.batch_size)
            pixels = RawPixelEncoder(self.raw_pixel_size)
            x = pixels.image_features(arrays["image"][rows[kept]])
            w, b, alpha, scores = fit_ridge(
                x["feature"], targets, self.alphas, val_fraction=self.val_fraction, seed=self.seed
            )
            logging.info(
                "ridge map: %d images (%d px) -> %d-d text space, alpha %g (held-out MSE %s)",
                len(kept),
                self.raw_pixel_size,
                targets.shape[1],
                alpha,
                {a: round(v, 6) for a, v in scores.items()},
            )
            _RIDGE_FITS[key] = (w, b)
        w, b = _RIDGE_FITS[key]
        return RidgeMapEncoder(text_encoder, w, b, self.raw_pixel_size)


class BaselineCache:
    """Baseline metrics in memory and in `<workdir>/eval/baselines.json`."""

    _memory: dict[tuple[str, str], dict[str, float]] = {}

    def __init__(self, workdir: str | None, *, write: bool = True):
        self.path = os.path.join(workdir, "eval", "baselines.json") if workdir else None
        self.write = write
        self._lock = threading.Lock()
        self._disk: dict[str, dict[str, float]] = {}
        if self.path and os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    self._disk = json.load(f)
            except (OSError, json.JSONDecodeError):
                self._disk = {}  # a torn file: recompute

    @staticmethod
    def key(name: str, cfg: Mapping, kind: str) -> str:
        return f"{name}/{kind}/{fingerprint(cfg)}"

    def get(self, name: str, cfg: Mapping, kind: str) -> dict[str, float] | None:
        key = self.key(name, cfg, kind)
        hit = self._memory.get((self.path or "", key))
        if hit is None and key in self._disk:
            hit = {k: float("nan") if v is None else v for k, v in self._disk[key].items()}
        return hit

    def put(self, name: str, cfg: Mapping, kind: str, metrics: Mapping[str, float]) -> None:
        key = self.key(name, cfg, kind)
        self._memory[(self.path or "", key)] = dict(metrics)
        if not (self.path and self.write):
            return
        with self._lock:  # baselines finish on evaluation worker threads (runner.py)
            self._disk[key] = {k: (None if v != v else v) for k, v in metrics.items()}
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(self._disk, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)


def run_baselines(
    name: str,
    cfg: Mapping,
    evaluator: Any,
    run_eval: Callable[[Encoder], dict[str, float]],
    random_encoder: EncoderOrFactory | None,
    cache: BaselineCache,
    *,
    raw_pixel_size: int | None = 32,
    ridge_map: Callable[[], Encoder | None] | None = None,
    ridge_id: Mapping | None = None,
    kinds: Sequence[str] = KINDS,
) -> dict[str, dict[str, float]]:
    """{kind: metrics} for the baselines among `kinds` that apply; `run_eval(encoder)` runs
    the evaluation (mapping missing layers to "feature") and returns its metrics without the
    eval prefix. `ridge_map` builds the ridge-map encoder (None: no such baseline);
    `ridge_id` (its RidgeMap.identity()) joins that kind's cache key."""
    out: dict[str, dict[str, float]] = {}
    cache_cfg = {**dict(cfg), "_raw_pixel_size": raw_pixel_size}
    if not evaluator.RAW_PIXELS:
        cache_cfg["_raw_pixels"] = False
    for kind in kinds:
        kind_cfg = cache_cfg
        if kind == RIDGE_MAP:
            if ridge_map is None or not evaluator.NEEDS_TEXT:
                continue
            kind_cfg = {**cache_cfg, "_ridge_map": dict(ridge_id or {})}
        hit = cache.get(name, kind_cfg, kind)
        if hit is not None:
            out[kind] = hit
            continue
        if kind == RAW_PIXELS:
            encoder: Encoder | None = RawPixelEncoder(raw_pixel_size)
        elif kind == RIDGE_MAP:
            encoder = ridge_map()
        else:
            encoder = resolve(random_encoder)
            random_encoder = encoder  # build a factory's encoder once
        if not applies(kind, evaluator, encoder):
            continue
        out[kind] = run_eval(encoder)
        cache.put(name, kind_cfg, kind, out[kind])
    return out
