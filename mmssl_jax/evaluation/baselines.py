"""The two baselines beside every result: raw pixels and the same architecture at random init.

A number means little alone: 80% linear-probe accuracy on Fashion-MNIST is worse than
logistic regression on raw pixels (82.8%). So every evaluation is rerun, on the same split,
with (a) `RawPixelEncoder` (pixels, downsampled to `raw_pixel_size`, as the "feature"
layer; every requested layer falls back to it) and (b) a randomly initialised encoder of the
trained architecture, which the trainer supplies (an Encoder, or a zero-argument factory so
it is only built when needed).

Neither baseline changes while a run trains, so their metrics are cached: in memory for the
process and in `<workdir>/eval/baselines.json`, keyed by the evaluation's name, its config
and the baseline kind. Delete that file after changing the model of an existing workdir.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from mmssl_jax.evaluation.encoder import Encoder, RawPixelEncoder, has_text

RAW_PIXELS, RANDOM_INIT = "raw_pixels", "random_init"
KINDS = (RAW_PIXELS, RANDOM_INIT)

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
    (raw pixels only where `evaluator.RAW_PIXELS`, text evals only with a text tower)."""
    if encoder is None or (kind == RAW_PIXELS and not evaluator.RAW_PIXELS):
        return False
    return not evaluator.NEEDS_TEXT or has_text(encoder)


class BaselineCache:
    """Baseline metrics in memory and in `<workdir>/eval/baselines.json`."""

    _memory: dict[tuple[str, str], dict[str, float]] = {}

    def __init__(self, workdir: str | None, *, write: bool = True):
        self.path = os.path.join(workdir, "eval", "baselines.json") if workdir else None
        self.write = write
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
) -> dict[str, dict[str, float]]:
    """{kind: metrics} for the baselines that apply; `run_eval(encoder)` runs the evaluation
    (mapping missing layers to "feature") and returns its metrics without the eval prefix."""
    out: dict[str, dict[str, float]] = {}
    cache_cfg = {**dict(cfg), "_raw_pixel_size": raw_pixel_size}
    if not evaluator.RAW_PIXELS:
        cache_cfg["_raw_pixels"] = False
    for kind in KINDS:
        hit = cache.get(name, cache_cfg, kind)
        if hit is not None:
            out[kind] = hit
            continue
        if kind == RAW_PIXELS:
            encoder: Encoder | None = RawPixelEncoder(raw_pixel_size)
        else:
            encoder = resolve(random_encoder)
            random_encoder = encoder  # build a factory's encoder once
        if not applies(kind, evaluator, encoder):
            continue
        out[kind] = run_eval(encoder)
        cache.put(name, cache_cfg, kind, out[kind])
    return out
