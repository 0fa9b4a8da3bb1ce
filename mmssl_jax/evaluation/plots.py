"""Evaluation plots as PNG: confusion matrix, t-SNE map of embeddings, metric curves.

Figures are drawn with matplotlib's object API on the Agg canvas (`matplotlib.figure.Figure`),
never through pyplot, so plotting from the training loop touches no global backend state and
needs no display.

Each plot has a `*_figure` function that builds the Figure (what tests inspect: titles, tick
labels, legends) and a `plot_*` function that saves it as PNG at `DPI`. Figures are sized so
that no side passes about `MAX_SIDE_PX`, whatever the number of classes: past a readable
number, a confusion matrix shows the most confused classes and a t-SNE map colours by group
(or names the most frequent classes and greys the rest).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from mmssl_jax.evaluation.encoder import host_threads, limit_threads

DPI = 100
MAX_SIDE_PX = 1600  # no saved plot is larger than this on a side (labels included)
OTHER_COLOUR = "#c8c8c8"  # classes not named in a t-SNE legend
Groups = tuple[Sequence[str], Sequence[int]]  # (group names, group index of each class)


def short_name(name: str | Sequence[str], width: int = 18) -> str:
    """A class name for a label: the first synonym, cut to `width` characters with "…"."""
    name = name if isinstance(name, str) else str(list(name)[0])
    return name if len(name) <= width else name[: width - 1] + "…"


def _class_name(classnames: Sequence | None, c: int, width: int = 18) -> str:
    if classnames is not None and 0 <= c < len(classnames):
        return short_name(classnames[c], width)
    return f"class {c}"


def save_figure(fig: Figure, path: str) -> str:
    """Writes `fig` as PNG at DPI (tight bounding box); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _palette(n: int) -> list:
    """n distinct colours: tab10 up to 10, tab20 up to 20, else evenly along viridis."""
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["viridis"](x) for x in np.linspace(0, 0.95, n)]


# ----------------------------------------------------------------------------------------
# Confusion matrix


def confused_classes(cm: np.ndarray, max_classes: int) -> np.ndarray:
    """Sorted indices of the classes a confusion matrix shows: all of them when there are at
    most `max_classes`, else the `max_classes` with the most misclassified images (as the
    true class or as the prediction), ties broken by the number of images."""
    cm = np.asarray(cm)
    if len(cm) <= max_classes:
        return np.arange(len(cm))
    off = cm - np.diag(np.diag(cm))
    errors = off.sum(axis=0) + off.sum(axis=1)
    order = np.lexsort((-cm.sum(axis=1), -errors))  # by errors, then by support
    return np.sort(order[:max_classes])


def confusion_figure(
    cm: np.ndarray, classnames: Sequence | None, *, title: str = "", max_classes: int = 30
) -> Figure:
    """Row-normalised confusion matrix (row = true class), labelled with class names.

    With more than `max_classes` classes it shows the most confused ones (see
    `confused_classes`) and an "other" column for predictions outside them, so every row
    still sums to 1; image counts are written in the cells when at most 20 classes show.
    """
    cm = np.asarray(cm, np.int64)
    num = len(cm)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    shown = confused_classes(cm, max_classes)
    cells, counts = rates[np.ix_(shown, shown)], cm[np.ix_(shown, shown)]
    rows = [_class_name(classnames, int(c), 20) for c in shown]
    cols = list(rows)
    rest = num - len(shown)
    if rest:
        cells = np.column_stack([cells, rates[shown].sum(axis=1) - cells.sum(axis=1)])
        counts = np.column_stack([counts, cm[shown].sum(axis=1) - counts.sum(axis=1)])
        cols.append(f"other {rest} classes")
    k = len(shown)
    side = min(2.5 + 0.3 * max(k, 5), 13.0)
    fig = Figure(figsize=(side + 1.2, side + 0.6), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(cells, cmap="Blues", vmin=0.0, vmax=1.0)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label("share of the true class's images", fontsize=8)
    fontsize = 8 if k <= 30 else 6
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(k), rows, fontsize=fontsize)
    if k <= 20:
        for i in range(k):
            for j in range(len(cols)):
                if counts[i, j]:
                    colour = "white" if cells[i, j] > 0.5 else "black"
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, c=colour)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    notes = ["row-normalised: each row (a true class) sums to 1"]
    if k <= 20:
        notes.append("numbers are image counts")
    if rest:
        notes.append(f"the {k} of {num} classes with the most errors")
    ax.set_title(f"{title or 'confusion matrix'}\n" + "; ".join(notes), fontsize=9)
    return fig


def plot_confusion_matrix(
    cm: np.ndarray,
    classnames: Sequence | None,
    path: str,
    *,
    title: str = "",
    max_classes: int = 30,
) -> str:
    """`confusion_figure` saved to `path`; returns the path."""
    return save_figure(confusion_figure(cm, classnames, title=title, max_classes=max_classes), path)


# ----------------------------------------------------------------------------------------
# t-SNE map


def subsample(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most `max_points` of n items (all when n <= max_points)."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def tsne_2d(x: np.ndarray, *, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """[n, 2] t-SNE map (scikit-learn, PCA init, cosine metric)."""
    from sklearn.manifold import TSNE

    perplexity = min(perplexity, max((len(x) - 1) / 3.0, 1.0))
    tsne = TSNE(2, perplexity=perplexity, init="pca", metric="cosine", random_state=seed)
    with limit_threads(host_threads()):
        return tsne.fit_transform(np.asarray(x, np.float32))


def colour_scheme(
    labels: np.ndarray,
    classnames: Sequence | None = None,
    groups: Groups | None = None,
    *,
    max_named: int = 10,
) -> tuple[list[tuple[str, np.ndarray, object]], str]:
    """How to colour points of `labels`: [(legend name, mask, colour)] in drawing order, and
    what the colours are ("class", "group", or "the N most frequent classes").

    Up to 20 classes: one colour per class. More than a palette can tell apart: one per group
    when `groups` covers the classes (at most 20 groups), else the `max_named` most frequent
    classes by name and every other class light grey as "other".
    """
    y = np.asarray(labels)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) <= 20:
        colours = _palette(len(classes))
        entries = [
            (_class_name(classnames, int(c), 24), y == c, colours[i]) for i, c in enumerate(classes)
        ]
        return entries, "class"
    if groups is not None:
        names, group_of = groups
        if all(0 <= c < len(group_of) for c in classes):
            g = np.asarray(group_of)[y]
            present = [int(i) for i in np.unique(g)]
            if len(present) <= 20:
                colours = _palette(len(present))
                entries = [
                    (short_name(names[i], 24) if i < len(names) else f"group {i}", g == i, col)
                    for i, col in zip(present, colours, strict=True)
                ]
                return entries, "group"
    top = classes[np.argsort(-counts, kind="stable")[:max_named]]
    other = ~np.isin(y, top)
    entries = [(f"other {len(classes) - len(top)} classes", other, OTHER_COLOUR)]
    colours = _palette(len(top))
    entries += [
        (_class_name(classnames, int(c), 24), y == c, colours[i]) for i, c in enumerate(top)
    ]
    return entries, f"the {len(top)} most frequent of {len(classes)} classes"


def embedding_figure(
    xy: np.ndarray,
    labels: np.ndarray,
    classnames: Sequence | None = None,
    *,
    groups: Groups | None = None,
    max_named: int = 10,
    title: str = "",
) -> Figure:
    """A 2-D map of points coloured as `colour_scheme` says, with a legend of names."""
    xy = np.asarray(xy)
    entries, what = colour_scheme(labels, classnames, groups, max_named=max_named)
    fig = Figure(figsize=(9.5, 7), layout="constrained")
    ax = fig.subplots()
    for name, mask, colour in entries:
        if mask.any():
            size = 4 if colour == OTHER_COLOUR else 7
            ax.scatter(*xy[mask].T, s=size, color=colour, label=f"{name} ({int(mask.sum())})")
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0.0,
        markerscale=2.5,
        fontsize=8,
        frameon=False,
        title=f"colour: {what}\n(number of images)",
        title_fontsize=8,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of {len(xy)} image embeddings", fontsize=10)
    return fig


def plot_embedding_map(
    emb: np.ndarray,
    labels: np.ndarray,
    classnames: Sequence | None,
    path: str,
    *,
    groups: Groups | None = None,
    max_points: int = 1000,
    max_named: int = 10,
    seed: int = 0,
    title: str = "",
) -> str:
    """t-SNE of (a random subset of) image embeddings, saved to `path` (see embedding_figure)."""
    idx = subsample(len(emb), max_points, seed)
    xy = tsne_2d(np.asarray(emb)[idx], seed=seed)
    fig = embedding_figure(
        xy,
        np.asarray(labels)[idx],
        classnames,
        groups=groups,
        max_named=max_named,
        title=title or f"t-SNE of {len(idx)} image embeddings",
    )
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------
# Curves

Panels = dict[str, dict[str, str]]  # panel title -> {line label: metric key}

_DIRECTION = re.compile(r"(?<![a-z])(i2t|t2i|img2txt|txt2img)(?![a-z])")
_DIRECTION_NAMES = {
    "i2t": "image→text",
    "img2txt": "image→text",
    "t2i": "text→image",
    "txt2img": "text→image",
}
_TWIN = {"i2t": "t2i", "t2i": "i2t", "img2txt": "txt2img", "txt2img": "img2txt"}


def pretty_metric(metric: str) -> str:
    """A metric name for a label: 'img2txt_class_R@5' -> 'image→text class R@5',
    'emb/top1' -> 'emb top-1', 'mean_per_class' -> 'mean per class'."""
    text = _DIRECTION.sub(lambda m: _DIRECTION_NAMES[m.group(1)], metric)
    text = re.sub(r"\btop(\d+)\b", r"top-\1", text.replace("_", " ").replace("/", " "))
    return text


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


def numeric_keys(records: Iterable[Mapping]) -> list[str]:
    """The keys with a number in some record, "step" aside, in first-seen order."""
    keys: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                keys.setdefault(k, None)
    return list(keys)


def metric_panels(keys: Sequence[str]) -> Panels:
    """Panels for a training log: one per metric, "loss" first; an image→text / text→image
    pair ("clip/i2t_acc", "clip/t2i_acc") shares one, as do step_time and data_time."""
    keys = sorted(keys, key=lambda k: k != "loss")  # stable: the rest keep their order
    panels: Panels = {}
    for key in keys:
        m = _DIRECTION.search(key)
        twin = m and key[: m.start()] + _TWIN[m.group(1)] + key[m.end() :]
        if twin in keys:
            title = re.sub(r"/_|__", lambda x: x.group(0)[0], key[: m.start()] + key[m.end() :])
            label = _DIRECTION_NAMES[m.group(1)]
            panels.setdefault(title.strip("_/ ") or key, {})[label] = key
        elif key in ("step_time", "data_time"):
            label = "step" if key == "step_time" else "waiting for data"
            panels.setdefault("seconds per step", {})[label] = key
        else:
            panels[key] = {key: key}
    return panels


def eval_panels(keys: Sequence[str]) -> Panels:
    """Panels for evaluation metrics "<eval>/<metric>": the metrics of one evaluation that
    differ only in K (R@1, R@5, R@10) share a panel, and its other metrics share one more."""
    by_eval: dict[str, dict[str, list[str]]] = {}
    for key in keys:
        name, _, metric = key.partition("/")
        family = re.sub(r"@\d+$", "@K", metric) if re.search(r"@\d+$", metric) else ""
        by_eval.setdefault(name, {}).setdefault(family, []).append(key)
    panels: Panels = {}
    for name, families in by_eval.items():
        grouped = {fam: ks for fam, ks in families.items() if fam and len(ks) > 1}
        rest = [k for fam, ks in families.items() if fam not in grouped for k in ks]
        for fam, ks in grouped.items():
            lines = {k.rsplit("_", 1)[-1].rsplit("/", 1)[-1]: k for k in ks}
            panels[f"{name}: {pretty_metric(fam)}"] = lines
        if rest:
            tails = {k.rsplit("_", 1)[-1].rsplit("/", 1)[-1] for k in rest}
            title = (
                name if not grouped else f"{name}: " + (tails.pop() if len(tails) == 1 else "other")
            )
            panels[title] = {pretty_metric(k.partition("/")[2]): k for k in rest}
    return panels


def _series(records: Sequence[Mapping], key: str) -> list[tuple[float, float]]:
    return sorted(
        (r["step"], r[key])
        for r in records
        if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)
    )


def _prune(panels: Panels, series: Mapping[str, list]) -> tuple[Panels, list[str]]:
    """Drops series that are always 0 and exact copies of an earlier one; says which."""
    zero, same, seen = [], [], {}
    out: Panels = {}
    for title, lines in panels.items():
        kept = {}
        for label, key in lines.items():
            pts = tuple(series[key])
            if pts and all(v == 0 for _, v in pts):
                zero.append(key)
            elif pts in seen:
                same.append(f"{key} = {seen[pts]}")
            else:
                seen.setdefault(pts, key)
                kept[label] = key
        if kept:
            out[title] = kept
    notes = []
    if zero:
        notes.append("always 0, not shown: " + ", ".join(zero))
    if same:
        notes.append("same as another curve, not shown: " + ", ".join(same))
    return out, notes


def curves_figure(
    records: Sequence[Mapping] | str,
    *,
    keys: Sequence[str] | None = None,
    panels: Mapping[str, Mapping[str, str]] | None = None,
    baselines: Mapping[str, Mapping[str, float]] | None = None,
    prune: bool = False,
    cols: int = 4,
    max_panels: int = 16,
    title: str = "",
) -> Figure | None:
    """Metrics against "step" (from dicts or a JSONL file), one small panel per entry of
    `panels` ({title: {line label: key}}; default `metric_panels(keys)`).

    Points carry markers, so a single evaluation shows. `baselines` ({name: {key: value}},
    e.g. "random init", "raw pixels") are drawn as horizontal reference lines in the colour of
    their metric, one line style per baseline, named in the figure's legend. `prune` drops
    series that are always 0 or copy another (a footnote names them). None when there is
    nothing to plot.
    """
    if isinstance(records, str):
        records = read_jsonl(records)
    records = [r for r in records if "step" in r]
    if panels is None:
        panels = metric_panels(list(keys) if keys is not None else numeric_keys(records))
    series = {k: _series(records, k) for lines in panels.values() for k in lines.values()}
    panels = {t: {lb: k for lb, k in ls.items() if series[k]} for t, ls in panels.items()}
    panels = {t: ls for t, ls in panels.items() if ls}
    notes: list[str] = []
    if prune:
        panels, notes = _prune(panels, series)
    if len(panels) > max_panels:
        notes.append(f"{len(panels) - max_panels} more panels not shown")
        panels = dict(list(panels.items())[:max_panels])
    if not panels:
        return None
    baselines = baselines or {}
    styles = dict(zip(baselines, ["--", ":", "-.", (0, (5, 1, 1, 1))], strict=False))
    cols = min(cols, len(panels))
    rows = math.ceil(len(panels) / cols)
    width = min(4.2 * cols, MAX_SIDE_PX / DPI - 1.0)
    fig = Figure(figsize=(width, 3.0 * rows + 0.4 * bool(notes)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    drawn: list[str] = []  # the baselines drawn somewhere, for the figure's legend
    for ax, (panel, lines) in zip(axes, panels.items(), strict=False):
        steps = set()
        for colour, (label, key) in zip(_palette(len(lines)), lines.items(), strict=True):
            pts = series[key]
            steps.update(s for s, _ in pts)
            marker = "o" if len(pts) <= 50 else None
            ax.plot(*zip(*pts, strict=True), marker=marker, ms=4, c=colour, label=label)
            for name, style in styles.items():
                value = baselines[name].get(key)
                if isinstance(value, int | float) and math.isfinite(value):
                    ax.axhline(value, color=colour, ls=style, lw=1.4)
                    drawn += [] if name in drawn else [name]
        if len(lines) > 1:
            ax.legend(fontsize=7, loc="best", framealpha=0.8)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        if len(steps) <= 6:  # few evaluations: tick exactly those steps
            ax.set_xticks(sorted(steps))
            if len(steps) == 1:
                ax.set_xlim(min(steps) - 1, min(steps) + 1)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title or notes:
        fig.suptitle(
            "\n".join([title] * bool(title) + ["; ".join(notes)] * bool(notes)), fontsize=10
        )
    if drawn:  # line styles mean the same in every panel: one legend says which is which
        handles = [Line2D([], [], c="0.3", marker="o", ms=4, label="trained (points over steps)")]
        handles += [Line2D([], [], c="0.3", ls=styles[n], lw=1.4, label=n) for n in drawn]
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    return fig


def plot_curves(records: Sequence[Mapping] | str, path: str, **kwargs) -> str | None:
    """`curves_figure(records, **kwargs)` saved to `path`; None when there is nothing to plot."""
    fig = curves_figure(records, **kwargs)
    return None if fig is None else save_figure(fig, path)
