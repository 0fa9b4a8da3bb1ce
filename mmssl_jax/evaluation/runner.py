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
                      synonyms); needed by zero_shot, optional elsewhere (plot legends; by
                      default the PREFIX-classnames.json beside the shards, when there)
      groups          path to a JSON {"groups": [names], "group_of_label": [index per
                      class]}: t-SNE maps of more than 20 classes are coloured by group (by
                      default the PREFIX-groups.json beside the class names, when there)

    zero_shot      shards (glob of labelled shards), classnames, templates (a set in
                   input_pipeline/templates/ or a .json path; default "simple")
                   -> top1, top5, mean_per_class
    linear_probe   train_shards, test_shards, train_limit / test_limit (override limit),
                   layers (default ("emb", "feature"); "blocks" = every block_i the encoder
                   gives; "grid{g}" = the tower's spatial map average-pooled to g x g cells),
                   Cs (C grid), val_fraction (0.2), max_iter (1000), blas_threads (1)
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
`<workdir>/eval/`: the results table (see report.py) with the baselines beside each metric
(raw pixels, random init, and the ridge map for zero_shot/retrieval when given one),
`history.jsonl` (one line per call), `baselines.json` (their cache, see baselines.py), and
`plots/`: `<name>_confusion_step_<N>.png`, `<name>_tsne_step_<N>.png`, `eval_curves.png`
(every eval metric over steps, its baselines as reference lines) and `train_curves.png`
(from `<workdir>/metrics.jsonl`, without curves that are always 0 or copy another).

An evaluation that cannot run on the data it was given (a CannotEvaluateError of its
evaluator, or scikit-learn refusing the data: too few records for the classes, no labels) is
skipped with a warning naming it and the reason, and the report says "skipped: <reason>";
the other evaluations run. Any other error propagates.

The evaluations and their baselines run as tasks on `eval_workers()` threads (2 on a machine
of 2 or more cores; MMSSL_EVAL_WORKERS sets it; 1 with several JAX processes): each trained
evaluation, those that fit on a train split first (the long tasks), and each one's baselines,
one task per kind, as soon as that evaluation's result is in. The encoders'
device calls take the device one at a time (encoder.DEVICE_LOCK), so a task's scikit-learn
fit overlaps another's features and fits; the numbers, the report and its plot order are
those of one worker. An evaluator that does not declare `CONCURRENT = True` runs alone.

Eval arrays are decoded once per process and cached (they do not change during training);
features are computed once per call and encoder, and shared between evaluations that read the
same shards. Missing shards fail fast, before any evaluation runs, naming the eval, the key,
the pattern and the command that builds them.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from types import ModuleType
from typing import Any

from absl import logging

from mmssl_jax.evaluation import baselines as baselines_lib
from mmssl_jax.evaluation import plots as plots_lib
from mmssl_jax.evaluation import report as report_lib
from mmssl_jax.evaluation import tasks
from mmssl_jax.evaluation.context import (  # noqa: F401  (re-exported for callers)
    BUILD_HINT,
    COMMON,
    CannotEvaluateError,
    EvalCall,
    clear_cache,
    load_arrays,
    load_classnames,
    shard_paths,
)
from mmssl_jax.evaluation.encoder import DEVICE_LOCK, Encoder, has_text, host_threads, limit_threads
from mmssl_jax.evaluation.tasks import eval_workers  # noqa: F401  (re-exported for callers)

# Evaluator modules are found by type name: "zero_shot" is mmssl_jax/evaluation/zero_shot.py;
# any other name ("my_eval", "my_pkg.my_eval") is an importable module of the user's. Each
# defines DEFAULTS (its config keys), SPLITS (the shard keys it reads), NEEDS_TEXT,
# RAW_PIXELS, TSNE, PER_LAYER and run(call, name, cfg, encoder, rows, artifacts) -> metrics;
# optionally CONCURRENT = True when its device work goes only through call.features /
# call.texts, so its tasks may overlap others' (see tasks.eval_workers).
ENTRY = ("DEFAULTS", "SPLITS", "NEEDS_TEXT", "RAW_PIXELS", "TSNE", "PER_LAYER", "run")
BUILT_IN = ("zero_shot", "linear_probe", "knn", "retrieval", "svm_map", "finetune")


def evaluator(kind: str) -> ModuleType:
    """The evaluator module of type `kind` (see ENTRY): the built-in module of that name,
    else the importable module `kind` itself; a clear error when there is none."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"an evaluation needs a type; built in: {list(BUILT_IN)}")
    module_name = f"mmssl_jax.evaluation.{kind}" if kind in BUILT_IN else kind
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ValueError(
                f"no evaluator of type {kind!r} (no module {module_name}); built in: "
                f"{list(BUILT_IN)}, or the name of an importable module of your own"
            ) from None
        raise
    missing = [k for k in ENTRY if not hasattr(module, k)]
    if missing:
        raise ValueError(f"module {module_name} is not an evaluator: it lacks {missing}")
    return module


def normalize_config(name: str, cfg: Mapping | Any) -> dict:
    """The eval's config as a plain dict with defaults filled; unknown keys are errors."""
    raw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    kind = raw.get("type")
    try:
        module = evaluator(kind)
    except ValueError as e:
        raise ValueError(f"evals.{name}.type = {kind!r}: {e}") from None
    allowed = {**COMMON, **module.DEFAULTS}
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ValueError(
            f"evals.{name}: unknown key(s) {unknown} for type {kind!r}; valid: {sorted(allowed)}"
        )
    out = {**allowed, **raw}
    if out["tsne"] is None:
        out["tsne"] = bool(module.TSNE)
    for key in module.SPLITS:
        if not out[key]:
            raise ValueError(f"evals.{name}: type {kind!r} needs `{key}` (a shard glob)")
    if kind == "zero_shot" and not out["classnames"]:
        raise ValueError(f"evals.{name}: zero_shot needs `classnames` (a JSON list path)")
    return out


def check_data(name: str, cfg: Mapping) -> None:
    """Fails fast on missing shards or class names, before any evaluation runs."""
    for key in evaluator(cfg["type"]).SPLITS:
        shard_paths(name, key, cfg[key])
    if cfg.get("classnames") and not os.path.exists(cfg["classnames"]):
        raise FileNotFoundError(
            f"evals.{name}.classnames: no file {cfg['classnames']!r}. {BUILD_HINT}"
        )


def _is_chief() -> bool:
    try:
        import jax

        return jax.process_index() == 0
    except Exception:  # noqa: BLE001 - no JAX backend: a plain single process
        return True


def _lazy(encoder_or_factory):
    """A memoised factory, so a random-init encoder is built at most once per call (also
    when baseline tasks on two worker threads ask at once); built holding the device."""
    box: list = []
    lock = threading.Lock()

    def get():
        with lock:
            if not box:
                with DEVICE_LOCK:
                    box.append(baselines_lib.resolve(encoder_or_factory))
            return box[0]

    return get if encoder_or_factory is not None else None


def _plot_curves(
    call: EvalCall, history: str, metrics: Mapping[str, float], base: Mapping[str, Mapping]
) -> None:
    """Eval metrics over steps beside their baselines, and the training log's curves."""
    try:
        keys = [k for k in metrics if not k.endswith(("/C", "/num_classes", "/val_top1"))]
        out = os.path.join(call.plot_dir, "eval_curves.png")
        names = {
            baselines_lib.RANDOM_INIT: "random init",
            baselines_lib.RAW_PIXELS: "raw pixels",
            baselines_lib.RIDGE_MAP: "ridge map",
        }
        call.add_plot(
            plots_lib.plot_curves(
                history,
                out,
                panels=plots_lib.eval_panels(keys),
                baselines={names[kind]: base[kind] for kind in names if base.get(kind)},
                cols=3,
                title=f"evaluation (latest: step {call.step})",
            )
        )
        train_log = os.path.join(call.workdir, "metrics.jsonl")
        if os.path.exists(train_log):
            out = os.path.join(call.plot_dir, "train_curves.png")
            call.add_plot(plots_lib.plot_curves(train_log, out, prune=True, title="training"))
    except Exception as e:  # noqa: BLE001 - a plot must never lose the results
        logging.warning("curves not plotted: %s: %s", type(e).__name__, e)


class EvalResults(dict):
    """What run_evals returns: {"<name>/<metric>": value} for the trained model, and in
    `skipped` {name: reason} the evaluations that could not run on their data."""

    def __init__(self, metrics: Mapping[str, float] = (), skipped: Mapping[str, str] = ()):
        super().__init__(metrics)
        self.skipped = dict(skipped)


def _raised_in(e: BaseException, package: str) -> bool:
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__", "").split(".")[0] == package:
            return True
        tb = tb.tb_next
    return False


def cannot_run(name: str, e: BaseException) -> str | None:
    """Why evaluation `name` cannot run on the data it was given, when `e` says so, else None.

    Two kinds of error say so: CannotEvaluateError, which evaluators raise for data that
    cannot support them (too few records for the classes, no labels, no captions), and a
    ValueError raised inside scikit-learn, whose checks of its input are about the data (a
    single class, fewer samples than classes or folds). Anything else (a config error, a
    TypeError or AttributeError of a bug) is not a reason to skip and must propagate.
    """
    if isinstance(e, CannotEvaluateError):
        return str(e).removeprefix(f"evals.{name}: ")
    if isinstance(e, ValueError) and _raised_in(e, "sklearn"):
        return f"scikit-learn cannot fit this data: {e}"
    return None


def _skip(skipped: dict[str, str], name: str, kind: str, reason: str) -> None:
    logging.warning("evals.%s (%s) skipped: %s", name, kind, reason)
    skipped[name] = reason


def _write_outputs(
    call: EvalCall, metrics: dict, base: dict, skipped: dict, *, curves: bool = True
) -> None:
    eval_dir = os.path.join(call.workdir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    history = os.path.join(eval_dir, "history.jsonl")
    with open(history, "a") as f:
        safe = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
        f.write(json.dumps({"step": call.step, **safe}) + "\n")
    if curves:
        _plot_curves(call, history, metrics, base)
    paths = report_lib.write_report(
        call.workdir, call.step, metrics, base, plots=call.plots, skipped=skipped
    )
    logging.info("evaluation report: %s", paths["md"])


def _task(module: ModuleType, call: EvalCall, name: str, cfg: dict, encoder, rows, artifacts):
    """One evaluation of `encoder`, timed and logged."""
    start = time.time()
    result = tasks.serial_unless(module, module.run, call, name, cfg, encoder, rows, artifacts)
    logging.info("evals.%s (%s): %s in %.1fs", name, cfg["type"], result, time.time() - start)
    return result


def _plot_order(path: str, names: list[str]) -> tuple[int, str]:
    """Sort key that lists plots by evaluation, in config order (tasks finish in any order)."""
    base = os.path.basename(path)
    owners = [i for i, n in enumerate(names) if base.startswith(f"{n}_")]
    return (max(owners, key=lambda i: len(names[i])) if owners else len(names), base)


def run_evals(
    evals_cfg: Mapping | Any,
    encoder: Encoder,
    *,
    workdir: str,
    step: int,
    random_encoder: Encoder | Callable[[], Encoder] | None = None,
    ridge_map: baselines_lib.RidgeMap | None = None,
) -> EvalResults:
    """Runs every evaluation in `evals_cfg` (schema in the module docstring) on `encoder`,
    with baselines; writes the report and plots under `<workdir>/eval/` (process 0 only).

    `random_encoder` is the same architecture at random init (or a zero-argument factory for
    it); None skips that baseline. `ridge_map` adds the ridge-map baseline to the text
    evaluations, fit (once, and only when a result is not cached) into `encoder`'s text
    tower (see baselines.py); None skips it. Returns {"<name>/<metric>": value} for the
    trained model, with `.skipped` {name: reason} for the evaluations that could not run
    (see cannot_run).
    """
    configs = {name: normalize_config(name, cfg) for name, cfg in evals_cfg.items()}
    for name, cfg in configs.items():
        check_data(name, cfg)
    write = _is_chief()
    call = EvalCall(workdir, step, write)
    cache = baselines_lib.BaselineCache(workdir, write=write)
    random_factory = _lazy(random_encoder)
    ridge_factory = _lazy(lambda: ridge_map.build(encoder)) if ridge_map is not None else None
    ridge_id = ridge_map.identity() if ridge_map is not None else None
    metrics: dict[str, float] = {}
    base: dict[str, dict[str, float]] = {k: {} for k in baselines_lib.KINDS}
    skipped: dict[str, str] = {}  # name -> why it cannot run on its data
    modules = {name: evaluator(cfg["type"]) for name, cfg in configs.items()}
    text = has_text(encoder) if any(m.NEEDS_TEXT for m in modules.values()) else False
    workers = tasks.eval_workers()

    results: dict[str, dict] = {}  # name -> the trained encoder's metrics
    found: dict[tuple[str, str], dict] = {}  # (name, baseline kind) -> its metrics
    reasons: dict[str, str] = {}  # name -> why it cannot run on its data
    with limit_threads(max(1, host_threads() // workers)), tasks.pool(workers) as pool:
        # Every evaluation of the trained encoder first, those that fit on a train split
        # (probes, k-NN, SVMs, fine-tuning: the long tasks) before the others; each one's
        # baselines (raw pixels, random init, ridge map: a task each) as soon as its
        # result is in, since a per-layer baseline reads which rows it produced.
        fits_first = sorted(configs, key=lambda n: "train_shards" not in modules[n].SPLITS)
        trained = {}  # future -> name
        for name in fits_first:
            if modules[name].NEEDS_TEXT and not text:
                reasons[name] = "it needs a text tower, which this model has not"
                continue
            cfg, module = configs[name], modules[name]
            trained[pool.submit(_task, module, call, name, cfg, encoder, None, True)] = name
        pending = {}  # future -> (name, baseline kind)
        for future in futures.as_completed(trained):
            name = trained[future]
            cfg, module = configs[name], modules[name]
            try:
                results[name] = future.result()
            except ValueError as e:
                reasons[name] = cannot_run(name, e)
                if reasons[name] is None:
                    raise
                continue
            if not cfg["baselines"]:
                continue
            rows = (
                list(dict.fromkeys(k.rsplit("/", 1)[0] for k in results[name]))
                if module.PER_LAYER
                else None
            )
            for kind in baselines_lib.KINDS:
                task = functools.partial(
                    baselines_lib.run_baselines,
                    name,
                    cfg,
                    module,
                    lambda enc, cfg=cfg, name=name, rows=rows, fn=module.run: fn(
                        call, name, cfg, enc, rows, False
                    ),
                    random_factory,
                    cache,
                    raw_pixel_size=cfg["raw_pixel_size"],
                    ridge_map=ridge_factory,
                    ridge_id=ridge_id,
                    kinds=(kind,),
                )
                pending[pool.submit(tasks.serial_unless, module, task)] = (name, kind)
        for future, (name, kind) in pending.items():
            try:
                found[name, kind] = future.result()
            except ValueError as e:
                reason = cannot_run(name, e)
                if reason is None:
                    raise
                logging.warning("evals.%s: %s baseline not run: %s", name, kind, reason)

    # Assembled in config order, whatever order the tasks finished in.
    for name, cfg in configs.items():
        if name in reasons:
            _skip(skipped, name, cfg["type"], reasons[name])
        metrics.update({f"{name}/{k}": float(v) for k, v in results.get(name, {}).items()})
        for kind in baselines_lib.KINDS:
            for base_kind, values in found.get((name, kind), {}).items():
                base[base_kind].update({f"{name}/{k}": float(v) for k, v in values.items()})
    call.plots.sort(key=lambda path: _plot_order(path, list(configs)))
    if write:
        curves = any(cfg["plots"] for cfg in configs.values())
        _write_outputs(call, metrics, base, skipped, curves=curves)
    return EvalResults(metrics, skipped)
