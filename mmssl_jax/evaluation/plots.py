"""Evaluation plots as PNG: confusion matrix, t-SNE map of embeddings, training curves.

Figures are drawn with matplotlib's object API on the Agg canvas (`matplotlib.figure.Figure`),
never through pyplot, so plotting from the training loop touches no global backend state and
needs no display.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from mmssl_jax.evaluation.encoder import host_threads


def _short(name, width: int = 18) -> str:
    name = name if isinstance(name, str) else str(list(name)[0])
    return name if len(name) <= width else name[: width - 1] + "…"


def _save(fig: Figure, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def plot_confusion_matrix(
    cm: np.ndarray, classnames: Sequence, path: str, *, title: str = ""
) -> str:
    """Row-normalised confusion matrix (row = true class); counts written when C <= 20."""
    cm = np.asarray(cm)
    num = len(cm)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.35 * num, 30)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if num <= 60:
        labels = [_short(c) for c in classnames]
        ax.set_xticks(range(num), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(num), labels, fontsize=8)
    if num <= 20:
        for i in range(num):
            for j in range(num):
                if cm[i, j]:
                    colour = "white" if rates[i, j] > 0.5 else "black"
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, c=colour)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    return _save(fig, path)


def subsample(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most `max_points` of n items (all when n <= max_points)."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def tsne_2d(x: np.ndarray, *, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """[n, 2] t-SNE map (scikit-learn, PCA init, cosine metric)."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    perplexity = min(perplexity, max((len(x) - 1) / 3.0, 1.0))
    tsne = TSNE(2, perplexity=perplexity, init="pca", metric="cosine", random_state=seed)
    with threadpool_limits(host_threads()):
        return tsne.fit_transform(np.asarray(x, np.float32))


def plot_embedding_map(
    emb: np.ndarray,
    labels: np.ndarray,
    classnames: Sequence | None,
    path: str,
    *,
    max_points: int = 1000,
    seed: int = 0,
    title: str = "",
) -> str:
    """t-SNE of (a random subset of) image embeddings, one colour per class."""
    idx = subsample(len(emb), max_points, seed)
    xy = tsne_2d(np.asarray(emb)[idx], seed=seed)
    y = np.asarray(labels)[idx]
    classes = np.unique(y)
    fig = Figure(figsize=(8, 7))
    ax = fig.subplots()
    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for i, c in enumerate(classes):
        sel = y == c
        name = _short(classnames[c]) if classnames is not None and 0 <= c < len(classnames) else c
        ax.scatter(*xy[sel].T, s=6, color=cmap(i % cmap.N), label=str(name))
    if len(classes) <= 20:
        ax.legend(markerscale=3, fontsize=8, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of {len(idx)} image embeddings")
    return _save(fig, path)


def read_jsonl(path: str) -> list[dict]:
    """Records of a JSON-lines file; lines that do not parse (a torn last write) are skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _numeric_keys(records: Iterable[Mapping]) -> list[str]:
    keys: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                keys.setdefault(k, None)
    return list(keys)


def plot_curves(
    records: Sequence[Mapping] | str,
    path: str,
    *,
    keys: Sequence[str] | None = None,
    group: bool = False,
    max_panels: int = 16,
    title: str = "",
) -> str | None:
    """Metrics against "step", from a list of dicts or a metrics JSONL file.

    One panel per key, or with `group` one panel per key prefix (the part before the first
    "/", e.g. an evaluation's name) holding a line per metric. Returns the path, or None when
    there is nothing to plot.
    """
    if isinstance(records, str):
        records = read_jsonl(records)
    records = [r for r in records if "step" in r]
    keys = list(keys) if keys is not None else _numeric_keys(records)
    panels: dict[str, list[str]] = {}
    for key in keys:
        panels.setdefault(key.split("/", 1)[0] if group else key, []).append(key)
    panels = dict(list(panels.items())[:max_panels])
    if not panels:
        return None
    cols = min(3 if group else 4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (panel, members) in zip(axes, panels.items(), strict=False):
        for key in members:
            pts = sorted(
                (r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)
            )
            if pts:
                label = key[len(panel) + 1 :] if group and key != panel else key
                marker = "." if len(pts) < 50 else None
                ax.plot(*zip(*pts, strict=True), marker=marker, label=label)
        if group and len(members) > 1:
            ax.legend(fontsize=7)
        ax.set_title(panel if len(members) > 1 else members[0], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
