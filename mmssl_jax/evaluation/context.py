"""What every evaluator shares: the per-call state (features, texts, plots), eval arrays,
shard lookup, label checks, per-layer runs and t-SNE maps.

An evaluator is one module (see runner.py) whose `run(call, name, cfg, encoder, rows,
artifacts)` uses these helpers.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from mmssl_jax.evaluation.encoder import Encoder, encode_images, encode_texts

BUILD_HINT = (
    "Build the embedded default's shards with `python tools/make_shards.py embedded "
    "--output_dir data` (MMSSL_DATA or the config's data= argument sets the root); other "
    "datasets with `python tools/make_shards.py folder|tfds ...` (see the README)."
)

# The keys of every evaluator that fits on a train split and scores a test split
# (train_limit / test_limit override `limit` per split).
TRAIN_TEST = dict(train_shards=None, test_shards=None, train_limit=None, test_limit=None)
TRAIN_TEST_SPLITS = ("train_shards", "test_shards")

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
    groups=None,
)


class OncePerKey:
    """Values computed once per key, also across threads: a thread asking for a key that
    another is computing waits for that value instead of computing it again (evaluation
    tasks run on worker threads, see runner.py, and several read the same arrays)."""

    def __init__(self):
        self._values: dict = {}
        self._locks: dict = {}
        self._guard = threading.Lock()

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._values:
                self._values[key] = compute()
            return self._values[key]

    def clear(self) -> None:
        with self._guard:
            self._values.clear()
            self._locks.clear()


_ARRAYS = OncePerKey()  # eval arrays, per process: they do not change in training


class CannotEvaluateError(ValueError):
    """The data an evaluation was given cannot support it (too few records or classes, no
    labels, no captions): the runner skips that evaluation and says why in the report,
    where a ValueError of any other kind (a config error, a bug) stops the run."""


def shard_paths(name: str, key: str, pattern: str | Sequence[str]) -> list[str]:
    """The shard files of evals.<name>.<key>; a clear FileNotFoundError when there are none."""
    patterns = pattern.split(",") if isinstance(pattern, str) else list(pattern)
    paths = sorted({p for pat in patterns for p in globlib.glob(pat) if not p.endswith(".idx")})
    if not paths:
        raise FileNotFoundError(
            f"evals.{name}.{key}: no shard matches {pattern!r} (cwd {os.getcwd()}). {BUILD_HINT}"
        )
    return paths


def load_classnames(path: str | None) -> list | None:
    """A JSON list of class names (entries may be lists of synonyms), or None."""
    from input_pipeline.pipeline import load_classnames as _load

    return _load(path or None)


def beside_shards(pattern: str | Sequence[str] | None, suffix: str) -> str | None:
    """The `PREFIX-<suffix>` file that `tools/make_shards.py` writes beside the shards
    `PREFIX[-SPLIT]-00000-of-0000N.tfrecord` of `pattern` (e.g. "classnames.json"), if any."""
    if not pattern:
        return None
    patterns = pattern.split(",") if isinstance(pattern, str) else list(pattern)
    paths = sorted(p for pat in patterns for p in globlib.glob(pat) if not p.endswith(".idx"))
    if not paths:
        return None
    folder, base = os.path.split(re.sub(r"-\d{5}-of-\d{5}\.tfrecord$", "", paths[0]))
    for prefix in dict.fromkeys((base, base.rsplit("-", 1)[0])):  # PREFIX-SPLIT, then PREFIX
        path = os.path.join(folder, f"{prefix}-{suffix}")
        if os.path.exists(path):
            return path
    return None


def load_groups(path: str | None) -> tuple[list[str], list[int]] | None:
    """(group names, group index of each class) from a JSON {"groups": [...],
    "group_of_label": [...]} (the emoji shards' PREFIX-groups.json), or None."""
    if not path:
        return None
    with open(path) as f:
        data = json.load(f)
    names, of = (
        data.get(k) if isinstance(data, dict) else None for k in ("groups", "group_of_label")
    )
    ok = isinstance(names, list) and isinstance(of, list)
    if not ok or not all(isinstance(i, int) and 0 <= i < len(names) for i in of):
        raise ValueError(f'{path}: expected {{"groups": [names], "group_of_label": [index]}}')
    return [str(n) for n in names], of


def plot_labels(cfg: Mapping) -> tuple[list | None, tuple[list[str], list[int]] | None]:
    """Class names and groups for an evaluation's plots: the configured files, else those
    that `tools/make_shards.py` wrote beside its shards (Fashion-MNIST's class names, the
    emoji groups beside the emoji class names)."""
    shards = cfg.get("test_shards") or cfg.get("shards")
    names_path = cfg.get("classnames") or beside_shards(shards, "classnames.json")
    groups_path = cfg.get("groups")
    if not groups_path and names_path and names_path.endswith("-classnames.json"):
        candidate = names_path[: -len("classnames.json")] + "groups.json"
        groups_path = candidate if os.path.exists(candidate) else None
    return load_classnames(names_path), load_groups(groups_path)


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

    def build() -> dict:
        from input_pipeline.pipeline import build_eval_arrays

        start = time.time()
        arrays = build_eval_arrays(
            paths,
            image_size=cfg["image_size"],
            resize_size=cfg["resize_size"],
            classnames=classnames,
            limit=limit,
        )
        logging.info(
            "evals.%s: loaded %d records of %s in %.1fs",
            name,
            len(arrays["label"]),
            cfg[key],
            time.time() - start,
        )
        return arrays

    return _ARRAYS.get(cache_key, build)


def clear_cache() -> None:
    """Drops the cached eval arrays (tests; a long-lived process that changed its data)."""
    _ARRAYS.clear()


# ----------------------------------------------------------------------------------------
# Layers


def block_keys(available: Sequence[str]) -> list[str]:
    """The "block_{i}" keys in block order."""
    blocks = [k for k in available if k.startswith("block_") and k[6:].isdigit()]
    return sorted(blocks, key=lambda k: int(k[6:]))


def wants_blocks(layers: Sequence[str]) -> bool:
    """Whether `layers` name block features ("blocks" or any "block_{i}")."""
    return "blocks" in layers or bool(block_keys(layers))


_GRID = re.compile(r"grid(\d+)")


def grid_sizes(layers: Sequence[str]) -> tuple[int, ...]:
    """The cell counts g of the "grid{g}" layers among `layers`, sorted, each once."""
    return tuple(sorted({int(m.group(1)) for m in map(_GRID.fullmatch, layers) if m}))


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


class EvalCall:
    """State of one run_evals call: features per (encoder, data), plots made."""

    def __init__(self, workdir: str, step: int, write: bool):
        self.workdir, self.step, self.write = workdir, step, write
        self.plot_dir = os.path.join(workdir, "eval", "plots")
        self.plots: list[str] = []
        self._features = OncePerKey()  # (encoder, arrays) -> {layer: features}
        self._texts = OncePerKey()  # (encoder, key) -> text embeddings
        self._alive: list = []  # keeps encoders alive so their id() keys stay unique

    def features(self, encoder: Encoder, arrays: dict, cfg: Mapping, desc: str) -> dict:
        def compute() -> dict:
            self._alive.append(encoder)
            return encode_images(encoder, arrays["image"], batch_size=cfg["batch_size"], desc=desc)

        return self._features.get((id(encoder), id(arrays)), compute)

    def texts(self, encoder: Encoder, texts: list[str], cfg: Mapping, key: Any) -> np.ndarray:
        # An encoder that borrows another's text tower (the ridge map) shares its texts.
        encoder = getattr(encoder, "text_source", encoder)

        def compute() -> np.ndarray:
            self._alive.append(encoder)
            return encode_texts(encoder, texts, batch_size=cfg["batch_size"], desc="texts")

        return self._texts.get((id(encoder), key), compute)

    def plot_path(self, name: str, what: str) -> str:
        return os.path.join(self.plot_dir, f"{name}_{what}_step_{self.step}.png")

    def add_plot(self, path: str | None) -> None:
        if path:
            self.plots.append(os.path.relpath(path, os.path.join(self.workdir, "eval")))


def labelled(arrays: dict) -> np.ndarray:
    return np.flatnonzero(np.asarray(arrays["label"]) >= 0)


def need_labels(name: str, key: str, arrays: dict) -> np.ndarray:
    keep = labelled(arrays)
    if not len(keep):
        raise CannotEvaluateError(f"evals.{name}.{key}: no labelled record (all labels are -1)")
    return keep


# One plot at a time: plots come from evaluation tasks on worker threads (runner.py), and
# matplotlib's font and text caches are not meant for concurrent use.
PLOT_LOCK = threading.Lock()


def draw(call: EvalCall, name: str, what: str, plot: Callable[[], str | None]) -> None:
    """Runs `plot()` (a plot function returning its path) and records the plot; a plot that
    fails is a warning, never a lost result."""
    try:
        with PLOT_LOCK:
            call.add_plot(plot())
    except Exception as e:  # noqa: BLE001 - a plot must never lose the results
        logging.warning("evals.%s: %s not plotted: %s: %s", name, what, type(e).__name__, e)


def tsne(
    call: EvalCall,
    name: str,
    cfg: Mapping,
    emb: np.ndarray,
    labels: np.ndarray,
    names: Sequence | None = None,
) -> None:
    """A t-SNE map of `emb` coloured by `labels`, when the eval's config asks for plots
    (legend: `names`, else the eval's class names and groups, see plot_labels)."""
    if call.write and cfg["plots"] and cfg["tsne"]:
        from mmssl_jax.evaluation import plots as plots_lib

        def plot() -> str:
            classnames, groups = (names, None) if names is not None else plot_labels(cfg)
            return plots_lib.plot_embedding_map(
                emb,
                labels,
                classnames,
                call.plot_path(name, "tsne"),
                groups=groups,
                max_points=cfg["tsne_points"],
                seed=cfg["seed"],
                title=f"{name}: t-SNE of image features (step {call.step})",
            )

        draw(call, name, "t-SNE map", plot)


def train_test(call, name, cfg, encoder, desc):
    train = load_arrays(name, cfg, "train_shards")
    test = load_arrays(name, cfg, "test_shards")
    tr_keep = need_labels(name, "train_shards", train)
    te_keep = need_labels(name, "test_shards", test)
    f_tr = call.features(encoder, train, cfg, f"{name} train")
    f_te = call.features(encoder, test, cfg, f"{name} test")
    y_tr = np.asarray(train["label"])[tr_keep]
    y_te = np.asarray(test["label"])[te_keep]
    return f_tr, f_te, tr_keep, te_keep, y_tr, y_te


def per_layer(call, name, cfg, encoder, rows, artifacts, fn: Callable) -> dict[str, float]:
    """Runs fn(train_x, train_y, test_x, test_y) -> metrics once per distinct feature key."""
    f_tr, f_te, tr_keep, te_keep, y_tr, y_te = train_test(call, name, cfg, encoder, name)
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
        tsne(call, name, cfg, f_te[first][te_keep], y_te)
    return {f"{row}/{m}": v for row, src in sources.items() for m, v in results[src].items()}
