"""The results table: every metric beside its baselines, as JSON and Markdown.

Written to `<workdir>/eval/`: `results_step_<N>.json`, `results_step_<N>.md`, and
`latest.json` / `latest.md` (copies of the newest, what a reader opens first). A row is one
metric of one evaluation ("fmnist_probe" / "emb/top1") with the trained model's value, the
same protocol on raw pixels, and on a randomly initialised encoder of the same architecture;
a baseline that does not apply (raw pixels have no text tower) is shown as "-". A third
baseline column, "ridge map" (a linear map from pixels into the model's pretrained text
space, see baselines.py), appears when a run computed it: only the text evaluations
(zero-shot, retrieval) have values there. An evaluation
that could not run on its data has one row, "skipped: <reason>" (and JSON "skipped").
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

BASELINES = ("raw_pixels", "random_init")  # always shown
OPTIONAL = ("ridge_map",)  # shown when the run has any of its values
_TITLES = {"raw_pixels": "raw pixels", "random_init": "random init", "ridge_map": "ridge map"}


def columns(baselines: Mapping[str, Mapping[str, float]]) -> tuple[str, ...]:
    """The baseline kinds of the table: BASELINES, then each OPTIONAL one with values."""
    return BASELINES + tuple(k for k in OPTIONAL if baselines.get(k))


def split_key(key: str) -> tuple[str, str]:
    """ "eval/metric/parts" -> ("eval", "metric/parts")."""
    name, _, metric = key.partition("/")
    return name, metric


def build_rows(
    metrics: Mapping[str, float], baselines: Mapping[str, Mapping[str, float]]
) -> list[dict]:
    """One row per trained metric: {eval, metric, value, raw_pixels, random_init} (and
    ridge_map when the run has that baseline; see columns)."""
    rows = []
    for key, value in metrics.items():
        name, metric = split_key(key)
        row = {"eval": name, "metric": metric, "value": value}
        for kind in columns(baselines):
            row[kind] = baselines.get(kind, {}).get(key)
        rows.append(row)
    return rows


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"


def to_markdown(
    step: int,
    rows: Sequence[dict],
    plots: Sequence[str] = (),
    skipped: Mapping[str, str] | None = None,
    kinds: Sequence[str] = BASELINES,
) -> str:
    """The table as GitHub Markdown, one column per baseline of `kinds` (a "skipped:
    <reason>" row per evaluation that could not run), plots (paths relative to eval/)
    embedded below it."""
    lines = [
        f"# Evaluation at step {step}",
        "",
        "| eval | metric | trained | " + " | ".join(_TITLES.get(k, k) for k in kinds) + " |",
        "|---|---|---:|" + "---:|" * len(kinds),
    ]
    for row in rows:
        cells = [row["eval"], row["metric"], _fmt(row["value"])]
        cells += [_fmt(row.get(k)) for k in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    for name, reason in (skipped or {}).items():
        reason = " ".join(str(reason).split()).replace("|", "\\|")
        lines.append(f"| {name} | skipped: {reason} | - |" + " - |" * len(kinds))
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{os.path.splitext(os.path.basename(p))[0]}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN
    return value


def write_report(
    workdir: str,
    step: int,
    metrics: Mapping[str, float],
    baselines: Mapping[str, Mapping[str, float]] | None = None,
    *,
    plots: Sequence[str] = (),
    skipped: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Writes the JSON and Markdown tables for `step`; returns their paths by kind.

    `metrics` maps "eval/metric" to the trained model's value; `baselines` maps
    "raw_pixels" / "random_init" (/ "ridge_map") to dicts with the same keys. `plots` are
    paths relative to `<workdir>/eval`; `skipped` maps the evaluations that could not run
    to the reason.
    """
    baselines = baselines or {}
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    rows = build_rows(metrics, baselines)
    kinds = columns(baselines)
    payload = {
        "step": int(step),
        "metrics": {k: _jsonable(v) for k, v in metrics.items()},
        "baselines": {
            kind: {k: _jsonable(v) for k, v in baselines.get(kind, {}).items()} for kind in kinds
        },
        "rows": [{k: _jsonable(v) for k, v in row.items()} for row in rows],
        "skipped": dict(skipped or {}),
        "plots": list(plots),
    }
    text_json = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    text_md = to_markdown(step, rows, plots, skipped, kinds)
    paths = {
        "json": os.path.join(out_dir, f"results_step_{step}.json"),
        "md": os.path.join(out_dir, f"results_step_{step}.md"),
        "latest_json": os.path.join(out_dir, "latest.json"),
        "latest_md": os.path.join(out_dir, "latest.md"),
    }
    for kind, path in paths.items():
        _write_atomic(path, text_json if kind.endswith("json") else text_md)
    return paths
