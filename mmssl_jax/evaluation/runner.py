"""Runs every evaluation of `config.evals` on an encoder; writes the report and the plots.

The trainer calls `run_evals(config.evals, encoder, workdir=..., step=..., random_encoder=...)`
every `eval_every` steps and in `--mode=eval`. `config.evals` maps a name (the prefix of its
metrics) to a ConfigDict:

    common keys (every type)
      type            "zero_shot" | "linear_probe" | "knn" | "retrieval" | "svm_map" |
                      "finetune"
      image_size      int, eval resolution (resize short side, centre crop); default 224
      resize_size     int | None, short side before the crop (None: image_size)
      limit           int | None, use the first `limit` records of each shard set
      batch_size      int, images/texts per encoder call; default 256
      baselines       bool, also run it on raw pixels and on the random-init encoder; True
      raw_pixel_size  int, side the raw-pixel baseline downsamples to; default 32
      plots           bool, write this evaluation's plots; default True
      tsne            bool, t-SNE map of its test embeddings (default: True for zero_shot
                      and linear_probe); tsne_points: at most this many points (1000)
      seed            int, seeds the held-out split, the CV folds and t-SNE; default 0
      classnames      path to a JSON list of class names (an entry may be a list of
                      synonyms); needed by zero_shot, optional elsewhere (plot legends)

    zero_shot      shards (glob of labelled shards), classnames, templates (a set in
                   evaluation/templates/ or a .json path; default "simple")
                   -> top1, top5, mean_per_class
    linear_probe   train_shards, test_shards, train_limit / test_limit (override limit),
                   layers (default ("emb", "feature"); "blocks" = every block_i the encoder
                   gives), Cs (C grid), val_fraction (0.2), max_iter (1000)
                   -> <layer>/top1, <layer>/C, <layer>/val_top1
    knn            train_shards, test_shards, train_limit / test_limit, layers, k (20),
                   temperature (0.07)                        -> <layer>/top1
    retrieval      shards (records with captions; labels optional), ks ((1, 5, 10)),
                   class_relevance (True: also class-based R@K and mAP when labelled)
                   -> img2txt_R@K, txt2img_R@K, img2txt_class_R@K, txt2img_class_R@K,
                      img2txt_mAP, txt2img_mAP
    svm_map        train_shards, test_shards, train_limit / test_limit, layers, Cs
                   (SVM cost grid), folds (3), max_iter (2000) -> <layer>/mAP,
                   <layer>/num_classes
    finetune       train_shards, test_shards, train_limit / test_limit, epochs (5),
                   batch_size (the training batch too), lr (1e-3), weight_decay (0.05),
                   layer_decay (0: off), warmup_epochs (1), crop_scale ((0.08, 1); None: no
                   crop/flip): the image tower + a linear head trained end to end (see
                   finetune.py); no raw-pixel baseline                   -> top1

Returns the trained model's metrics flat, "<name>/<metric>". Written by process 0 under
`<workdir>/eval/`: the results table (see report.py) with both baselines beside each metric,
`history.jsonl` (one line per call), `baselines.json` (their cache, see baselines.py), and
`plots/`: `<name>_confusion_step_<N>.png`, `<name>_tsne_step_<N>.png`, `eval_curves.png`
(every eval metric over steps) and `train_curves.png` (from `<workdir>/metrics.jsonl`).

Eval arrays are decoded once per process and cached (they do not change during training);
features are computed once per call and encoder, and shared between evaluations that read the
same shards. Missing shards fail fast, before any evaluation runs, naming the eval, the key,
the pattern and the command that builds them.
"""

from __future__ import annotations

import glob as globlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from threadpoolctl import threadpool_limits

from mmssl_jax.evaluation import baselines as baselines_lib
from mmssl_jax.evaluation import finetune as finetune_lib
from mmssl_jax.evaluation import knn as knn_lib
from mmssl_jax.evaluation import linear_probe as probe_lib
from mmssl_jax.evaluation import plots as plots_lib
from mmssl_jax.evaluation import report as report_lib
from mmssl_jax.evaluation import retrieval as retrieval_lib
from mmssl_jax.evaluation import svm_map as svm_lib
from mmssl_jax.evaluation import zero_shot as zero_shot_lib
from mmssl_jax.evaluation.encoder import (
    Encoder,
    encode_images,
    encode_texts,
    has_text,
    host_threads,
)

BUILD_HINT = (
    "Build the embedded default's shards with `python tools/make_shards.py embedded "
    "--output_dir data` (MMSSL_DATA or the config's data= argument sets the root); other "
    "datasets with `python tools/make_shards.py folder|tfds ...` (see the README)."
)

COMMON = dict(
    type=None,
    image_size=224,
    resize_size=None,
    limit=None,
    batch_size=256,
    baselines=True,
    raw_pixel_size=32,
    plots=True,
    tsne=None,
    tsne_points=1000,
    seed=0,
    classnames=None,
)
TYPE_DEFAULTS = {
    "zero_shot": dict(shards=None, templates="simple"),
    "linear_probe": dict(
        train_shards=None,
        test_shards=None,
        train_limit=None,
        test_limit=None,
        layers=("emb", "feature"),
        Cs=probe_lib.DEFAULT_CS,
        val_fraction=0.2,
        max_iter=1000,
    ),
    "knn": dict(
        train_shards=None,
        test_shards=None,
        train_limit=None,
        test_limit=None,
        layers=("emb", "feature"),
        k=20,
        temperature=0.07,
    ),
    "retrieval": dict(shards=None, ks=(1, 5, 10), class_relevance=True),
    "svm_map": dict(
        train_shards=None,
        test_shards=None,
        train_limit=None,
        test_limit=None,
        layers=("emb", "feature"),
        Cs=svm_lib.DEFAULT_CS,
        folds=3,
        max_iter=2000,
    ),
    "finetune": dict(
        train_shards=None,
        test_shards=None,
        train_limit=None,
        test_limit=None,
        epochs=5.0,
        lr=1e-3,
        weight_decay=0.05,
        layer_decay=0.0,
        warmup_epochs=1.0,
        crop_scale=(0.08, 1.0),
    ),
}
TSNE_BY_DEFAULT = frozenset({"zero_shot", "linear_probe"})
SPLIT_KEYS = {  # the shard keys each type reads
    "zero_shot": ("shards",),
    "retrieval": ("shards",),
    "linear_probe": ("train_shards", "test_shards"),
    "knn": ("train_shards", "test_shards"),
    "svm_map": ("train_shards", "test_shards"),
    "finetune": ("train_shards", "test_shards"),
}

_ARRAYS: dict[tuple, dict] = {}  # eval arrays, per process: they do not change in training


# ----------------------------------------------------------------------------------------
# Config


def normalize_config(name: str, cfg: Mapping | Any) -> dict:
    """The eval's config as a plain dict with defaults filled; unknown keys are errors."""
    raw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    kind = raw.get("type")
    if kind not in TYPE_DEFAULTS:
        raise ValueError(f"evals.{name}.type = {kind!r}; valid: {sorted(TYPE_DEFAULTS)}")
    allowed = {**COMMON, **TYPE_DEFAULTS[kind]}
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ValueError(
            f"evals.{name}: unknown key(s) {unknown} for type {kind!r}; valid: {sorted(allowed)}"
        )
    out = {**allowed, **raw}
    if out["tsne"] is None:
        out["tsne"] = kind in TSNE_BY_DEFAULT
    for key in SPLIT_KEYS[kind]:
        if not out[key]:
            raise ValueError(f"evals.{name}: type {kind!r} needs `{key}` (a shard glob)")
    if kind == "zero_shot" and not out["classnames"]:
        raise ValueError(f"evals.{name}: zero_shot needs `classnames` (a JSON list path)")
    return out


def shard_paths(name: str, key: str, pattern: str | Sequence[str]) -> list[str]:
    """The shard files of evals.<name>.<key>; a clear FileNotFoundError when there are none."""
    patterns = pattern.split(",") if isinstance(pattern, str) else list(pattern)
    paths = sorted({p for pat in patterns for p in globlib.glob(pat) if not p.endswith(".idx")})
    if not paths:
        raise FileNotFoundError(
            f"evals.{name}.{key}: no shard matches {pattern!r} (cwd {os.getcwd()}). {BUILD_HINT}"
        )
    return paths


def check_data(name: str, cfg: Mapping) -> None:
    """Fails fast on missing shards or class names, before any evaluation runs."""
    for key in SPLIT_KEYS[cfg["type"]]:
        shard_paths(name, key, cfg[key])
    if cfg.get("classnames") and not os.path.exists(cfg["classnames"]):
        raise FileNotFoundError(
            f"evals.{name}.classnames: no file {cfg['classnames']!r}. {BUILD_HINT}"
        )


def load_classnames(path: str | None) -> list | None:
    """A JSON list of class names (entries may be lists of synonyms), or None."""
    from input_pipeline.pipeline import load_classnames as _load

    return _load(path or None)


def _limit(cfg: Mapping, key: str) -> int | None:
    split = {"train_shards": "train_limit", "test_shards": "test_limit"}.get(key)
    value = cfg.get(split) if split else None
    return cfg["limit"] if value is None else value


def load_arrays(name: str, cfg: Mapping, key: str) -> dict:
    """The eval arrays of evals.<name>.<key>, decoded once per process."""
    paths = shard_paths(name, key, cfg[key])
    limit = _limit(cfg, key)
    classnames = cfg["classnames"] or None  # bounds the labels: a mismatch fails loudly
    cache_key = (tuple(paths), cfg["image_size"], cfg["resize_size"], limit, classnames)
    if cache_key not in _ARRAYS:
        from input_pipeline.pipeline import build_eval_arrays

        start = time.time()
        _ARRAYS[cache_key] = build_eval_arrays(
            paths,
            image_size=cfg["image_size"],
            resize_size=cfg["resize_size"],
            classnames=classnames,
            limit=limit,
        )
        logging.info(
            "evals.%s: loaded %d records of %s in %.1fs",
            name,
            len(_ARRAYS[cache_key]["label"]),
            cfg[key],
            time.time() - start,
        )
    return _ARRAYS[cache_key]


def clear_cache() -> None:
    """Drops the cached eval arrays (tests; a long-lived process that changed its data)."""
    _ARRAYS.clear()


# ----------------------------------------------------------------------------------------
# Layers


def block_keys(available: Sequence[str]) -> list[str]:
    """The "block_{i}" keys in block order."""
    blocks = [k for k in available if k.startswith("block_") and k[6:].isdigit()]
    return sorted(blocks, key=lambda k: int(k[6:]))


def resolve_layers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """The requested feature layers the encoder gives ("blocks" expands); others are logged."""
    out: list[str] = []
    for layer in requested:
        names = block_keys(available) if layer == "blocks" else [layer]
        for n in names:
            if n in available and n not in out:
                out.append(n)
            elif n not in available:
                logging.warning("layer %r not produced by the encoder (has %s)", n, available)
    return out


def layer_sources(rows: Sequence[str], available: Sequence[str]) -> dict[str, str]:
    """Row name -> the feature key that feeds it; missing layers fall back to "feature"
    (what a baseline without that layer offers: raw pixels have only "feature")."""
    out = {}
    for row in rows:
        if row in available:
            out[row] = row
        elif "feature" in available:
            out[row] = "feature"
    return out


# ----------------------------------------------------------------------------------------
# One call


class _Call:
    """State of one run_evals call: features per (encoder, data), plots made."""

    def __init__(self, workdir: str, step: int, write: bool):
        self.workdir, self.step, self.write = workdir, step, write
        self.plot_dir = os.path.join(workdir, "eval", "plots")
        self.plots: list[str] = []
        self._features: dict[tuple, dict[str, np.ndarray]] = {}
        self._texts: dict[tuple, np.ndarray] = {}
        self._alive: list = []  # keeps encoders alive so their id() keys stay unique

    def features(self, encoder: Encoder, arrays: dict, cfg: Mapping, desc: str) -> dict:
        key = (id(encoder), id(arrays))
        if key not in self._features:
            self._alive.append(encoder)
            self._features[key] = encode_images(
                encoder, arrays["image"], batch_size=cfg["batch_size"], desc=desc
            )
        return self._features[key]

    def texts(self, encoder: Encoder, texts: list[str], cfg: Mapping, key: Any) -> np.ndarray:
        key = (id(encoder), key)
        if key not in self._texts:
            self._alive.append(encoder)
            self._texts[key] = encode_texts(
                encoder, texts, batch_size=cfg["batch_size"], desc="texts"
            )
        return self._texts[key]

    def plot_path(self, name: str, what: str) -> str:
        return os.path.join(self.plot_dir, f"{name}_{what}_step_{self.step}.png")

    def add_plot(self, path: str | None) -> None:
        if path:
            self.plots.append(os.path.relpath(path, os.path.join(self.workdir, "eval")))


def _labelled(arrays: dict) -> np.ndarray:
    return np.flatnonzero(np.asarray(arrays["label"]) >= 0)


def _need_labels(name: str, key: str, arrays: dict) -> np.ndarray:
    keep = _labelled(arrays)
    if not len(keep):
        raise ValueError(f"evals.{name}.{key}: no labelled record (all labels are -1)")
    return keep


def _tsne(call: _Call, name: str, cfg: Mapping, emb: np.ndarray, labels: np.ndarray) -> None:
    if call.write and cfg["plots"] and cfg["tsne"]:
        classnames = load_classnames(cfg["classnames"])
        path = plots_lib.plot_embedding_map(
            emb,
            labels,
            classnames,
            call.plot_path(name, "tsne"),
            max_points=cfg["tsne_points"],
            seed=cfg["seed"],
            title=f"{name}: t-SNE of image features (step {call.step})",
        )
        call.add_plot(path)


def _eval_zero_shot(call, name, cfg, encoder, rows, artifacts) -> dict[str, float]:
    from input_pipeline.templates import load_templates, prompts_for

    arrays = load_arrays(name, cfg, "shards")
    keep = _need_labels(name, "shards", arrays)
    feats = call.features(encoder, arrays, cfg, f"{name} images")
    if "emb" not in feats:
        raise ValueError(f"evals.{name}: zero-shot needs the encoder's 'emb' output")
    classnames = load_classnames(cfg["classnames"])
    templates = load_templates(cfg["templates"])
    class_emb = zero_shot_lib.class_embeddings(
        lambda texts: call.texts(encoder, texts, cfg, ("classes", cfg["classnames"], tuple(texts))),
        classnames,
        templates,
        prompts_for,
    )
    labels = np.asarray(arrays["label"])[keep]
    result = zero_shot_lib.evaluate(feats["emb"][keep], class_emb, labels)
    if artifacts and call.write and cfg["plots"]:
        cm = zero_shot_lib.confusion_matrix(labels, result.predictions, len(classnames))
        call.add_plot(
            plots_lib.plot_confusion_matrix(
                cm,
                classnames,
                call.plot_path(name, "confusion"),
                title=f"{name}: zero-shot confusion (step {call.step})",
            )
        )
        _tsne(call, name, cfg, feats["emb"][keep], labels)
    return result.metrics


def _train_test(call, name, cfg, encoder, desc):
    train = load_arrays(name, cfg, "train_shards")
    test = load_arrays(name, cfg, "test_shards")
    tr_keep = _need_labels(name, "train_shards", train)
    te_keep = _need_labels(name, "test_shards", test)
    f_tr = call.features(encoder, train, cfg, f"{name} train")
    f_te = call.features(encoder, test, cfg, f"{name} test")
    y_tr = np.asarray(train["label"])[tr_keep]
    y_te = np.asarray(test["label"])[te_keep]
    return f_tr, f_te, tr_keep, te_keep, y_tr, y_te


def _per_layer(call, name, cfg, encoder, rows, artifacts, fn: Callable) -> dict[str, float]:
    """Runs fn(train_x, train_y, test_x, test_y) -> metrics once per distinct feature key."""
    f_tr, f_te, tr_keep, te_keep, y_tr, y_te = _train_test(call, name, cfg, encoder, name)
    if rows is None:
        rows = resolve_layers(cfg["layers"], list(f_tr))
        if not rows:
            raise ValueError(f"evals.{name}: none of layers {cfg['layers']} in {list(f_tr)}")
    sources = layer_sources(rows, list(f_tr))
    results: dict[str, dict[str, float]] = {}
    for src in dict.fromkeys(sources.values()):
        start = time.time()
        results[src] = fn(f_tr[src][tr_keep], y_tr, f_te[src][te_keep], y_te)
        logging.info("evals.%s[%s]: %s (%.1fs)", name, src, results[src], time.time() - start)
    if artifacts and rows:
        first = sources[rows[0]]
        _tsne(call, name, cfg, f_te[first][te_keep], y_te)
    return {f"{row}/{m}": v for row, src in sources.items() for m, v in results[src].items()}


def _eval_linear_probe(call, name, cfg, encoder, rows, artifacts):
    fn = lambda a, b, c, d: probe_lib.linear_probe(  # noqa: E731
        a,
        b,
        c,
        d,
        Cs=cfg["Cs"],
        val_fraction=cfg["val_fraction"],
        seed=cfg["seed"],
        max_iter=cfg["max_iter"],
    )
    return _per_layer(call, name, cfg, encoder, rows, artifacts, fn)


def _eval_knn(call, name, cfg, encoder, rows, artifacts):
    fn = lambda a, b, c, d: knn_lib.knn_accuracy(  # noqa: E731
        a, b, c, d, k=cfg["k"], temperature=cfg["temperature"]
    )
    return _per_layer(call, name, cfg, encoder, rows, artifacts, fn)


def _eval_svm_map(call, name, cfg, encoder, rows, artifacts):
    fn = lambda a, b, c, d: (
        svm_lib.svm_map(  # noqa: E731
            a, b, c, d, Cs=cfg["Cs"], folds=cfg["folds"], seed=cfg["seed"], max_iter=cfg["max_iter"]
        ).metrics
    )
    return _per_layer(call, name, cfg, encoder, rows, artifacts, fn)


def _eval_retrieval(call, name, cfg, encoder, rows, artifacts):
    arrays = load_arrays(name, cfg, "shards")
    texts, text_to_image = retrieval_lib.flatten_captions(arrays["texts"])
    if not texts:
        raise ValueError(f"evals.{name}: the records of {cfg['shards']!r} carry no captions")
    feats = call.features(encoder, arrays, cfg, f"{name} images")
    if "emb" not in feats:
        raise ValueError(f"evals.{name}: retrieval needs the encoder's 'emb' output")
    text_emb = call.texts(encoder, texts, cfg, ("captions", id(arrays)))
    labels = np.asarray(arrays["label"])
    use_classes = cfg["class_relevance"] and bool((labels >= 0).any())
    return retrieval_lib.retrieval_metrics(
        feats["emb"],
        text_emb,
        text_to_image,
        image_labels=labels if use_classes else None,
        ks=tuple(cfg["ks"]),
    )


def _eval_finetune(call, name, cfg, encoder, rows, artifacts):
    train = load_arrays(name, cfg, "train_shards")
    test = load_arrays(name, cfg, "test_shards")
    tr_keep = _need_labels(name, "train_shards", train)
    te_keep = _need_labels(name, "test_shards", test)
    classnames = load_classnames(cfg["classnames"])
    result = finetune_lib.finetune(
        encoder,
        train["image"][tr_keep],
        np.asarray(train["label"])[tr_keep],
        test["image"][te_keep],
        np.asarray(test["label"])[te_keep],
        num_classes=len(classnames) if classnames else None,
        **{k: cfg[k] for k in finetune_lib.HYPER_KEYS},
        desc=name,
    )
    return result.metrics


EVALUATORS = {
    "zero_shot": _eval_zero_shot,
    "linear_probe": _eval_linear_probe,
    "knn": _eval_knn,
    "retrieval": _eval_retrieval,
    "svm_map": _eval_svm_map,
    "finetune": _eval_finetune,
}


def _rows_of(metrics: Mapping[str, float], eval_type: str) -> list[str] | None:
    """The layer rows of a per-layer evaluation's metrics (baselines reuse them)."""
    if eval_type not in ("linear_probe", "knn", "svm_map"):
        return None
    return list(dict.fromkeys(k.rsplit("/", 1)[0] for k in metrics))


def _is_chief() -> bool:
    try:
        import jax

        return jax.process_index() == 0
    except Exception:  # noqa: BLE001 - no JAX backend: a plain single process
        return True


def _lazy(encoder_or_factory):
    """A memoised factory, so a random-init encoder is built at most once per call."""
    box: list = []

    def get():
        if not box:
            box.append(baselines_lib.resolve(encoder_or_factory))
        return box[0]

    return get if encoder_or_factory is not None else None


def _plot_curves(call: _Call, history: str, metrics: Mapping[str, float]) -> None:
    """Eval metrics over steps, and the training log's curves when there is one."""
    try:
        keys = [k for k in metrics if not k.endswith(("/C", "/num_classes", "/val_top1"))]
        out = os.path.join(call.plot_dir, "eval_curves.png")
        call.add_plot(
            plots_lib.plot_curves(history, out, keys=keys, group=True, title="evaluation")
        )
        train_log = os.path.join(call.workdir, "metrics.jsonl")
        if os.path.exists(train_log):
            out = os.path.join(call.plot_dir, "train_curves.png")
            call.add_plot(plots_lib.plot_curves(train_log, out, title="training"))
    except Exception as e:  # noqa: BLE001 - a plot must never lose the results
        logging.warning("curves not plotted: %s", e)


def _write_outputs(call: _Call, metrics: dict, base: dict, *, curves: bool = True) -> None:
    eval_dir = os.path.join(call.workdir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    history = os.path.join(eval_dir, "history.jsonl")
    with open(history, "a") as f:
        safe = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
        f.write(json.dumps({"step": call.step, **safe}) + "\n")
    if curves:
        _plot_curves(call, history, metrics)
    paths = report_lib.write_report(call.workdir, call.step, metrics, base, plots=call.plots)
    logging.info("evaluation report: %s", paths["md"])


def run_evals(
    evals_cfg: Mapping | Any,
    encoder: Encoder,
    *,
    workdir: str,
    step: int,
    random_encoder: Encoder | Callable[[], Encoder] | None = None,
) -> dict[str, float]:
    """Runs every evaluation in `evals_cfg` (schema in the module docstring) on `encoder`,
    with baselines; writes the report and plots under `<workdir>/eval/` (process 0 only).

    `random_encoder` is the same architecture at random init (or a zero-argument factory for
    it); None skips that baseline. Returns {"<name>/<metric>": value} for the trained model.
    """
    configs = {name: normalize_config(name, cfg) for name, cfg in evals_cfg.items()}
    for name, cfg in configs.items():
        check_data(name, cfg)
    write = _is_chief()
    call = _Call(workdir, step, write)
    cache = baselines_lib.BaselineCache(workdir, write=write)
    random_factory = _lazy(random_encoder)
    metrics: dict[str, float] = {}
    base: dict[str, dict[str, float]] = {k: {} for k in baselines_lib.KINDS}

    for name, cfg in configs.items():
        kind = cfg["type"]
        evaluate = EVALUATORS[kind]
        if kind in baselines_lib.TEXT_TYPES and not has_text(encoder):
            logging.warning("evals.%s skipped: %s needs a text tower", name, kind)
            continue
        start = time.time()
        with threadpool_limits(host_threads()):
            result = evaluate(call, name, cfg, encoder, None, True)
        logging.info("evals.%s (%s): %s in %.1fs", name, kind, result, time.time() - start)
        metrics.update({f"{name}/{k}": float(v) for k, v in result.items()})
        if not cfg["baselines"]:
            continue
        rows = _rows_of(result, kind)
        with threadpool_limits(host_threads()):
            found = baselines_lib.run_baselines(
                name,
                cfg,
                kind,
                lambda enc, cfg=cfg, name=name, rows=rows, fn=evaluate: fn(
                    call, name, cfg, enc, rows, False
                ),
                random_factory,
                cache,
                raw_pixel_size=cfg["raw_pixel_size"],
            )
        for base_kind, values in found.items():
            base[base_kind].update({f"{name}/{k}": float(v) for k, v in values.items()})

    if write:
        curves = any(cfg["plots"] for cfg in configs.values())
        _write_outputs(call, metrics, base, curves=curves)
    return metrics
