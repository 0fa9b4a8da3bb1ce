"""The SLIP paper's comparison on the embedded data: CLIP, SimCLR and SLIP (and UniCL vs
CLIP with the Fashion-MNIST image-label data, and a pretrained text tower vs one trained
from scratch), the same tiny image tower and budget, several seeds each.

    python tools/reproduce.py --data data --output reproduce --seeds 0,1,2

Every cell (method x seed) is one workdir, OUTPUT/runs/METHOD_sSEED, trained by the
project's Trainer at that method's own recipe (configs/tiny_METHOD.py: its lr, weight decay,
objectives) for one shared budget (by default the CLIP recipe's 10 epochs over the emoji
pairs, 220 steps at batch 128, warmup one such epoch) and evaluated by its config.evals;
the cell's numbers go to OUTPUT/runs/METHOD_sSEED/cell.json (its config beside them, as
config.json). A cell with a cell.json is not trained again and a cell stopped half-way
resumes from its checkpoint, so a long comparison survives a stop: run the same command
again. `--evals` that a finished cell has not run yet (say `emoji_finetune`, SLIP's third
protocol, from configs/common.finetune_evals) run on its last checkpoint and join its
cell.json, so a column added later costs its evaluation only. A progress bar counts cells,
with the rate of the cells run so far.

Writes OUTPUT/reproduce.json (every cell, and mean/std per method), OUTPUT/reproduce.md (the
table, mean +- std over seeds, with the baselines: raw pixels, random init, and the ridge map
into a pretrained text tower's space, each from the first cell that computed it) and
OUTPUT/reproduce.png (one panel per column, a bar per method with its seeds' spread, the
baselines drawn as lines).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.common import finetune_evals, select_evals  # noqa: E402
from mmssl_jax.config_utils import check_keys  # noqa: E402

# method -> (config module, config arg beyond data=..., what it is)
METHODS: dict[str, tuple[str, str, str]] = {
    "clip": ("tiny_clip", "", "CLIP, text transformer from scratch"),
    "simclr": ("tiny_simclr", "", "SimCLR, images only"),
    "slip": ("tiny_slip", "", "SLIP = CLIP + SimCLR"),
    "unicl": ("tiny_unicl", "fashion=0.5", "UniCL: CLIP + Fashion-MNIST labels as prompts"),
    "clip_bert": ("tiny_clip", "text=bert,text_lock=true", "CLIP, pretrained MiniLM locked"),
}
DEFAULT_METHODS = ("clip", "simclr", "slip", "unicl", "clip_bert")
CELL_FILE = "cell.json"
BASELINES = ("raw_pixels", "random_init", "ridge_map")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="data", help="root of the embedded data")
    p.add_argument("--output", default="reproduce", help="output folder")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (>= 3 for a spread)")
    p.add_argument(
        "--steps",
        type=int,
        default=-1,
        help="> 0: steps per cell; default: the CLIP recipe's epochs over the emoji pairs, for"
        " every method, with a warmup of one such epoch (a mixture's epoch would be 60k+ records)",
    )
    p.add_argument("--batch_size", type=int, default=-1, help="> 0: batch size of every cell")
    p.add_argument("--override", action="append", default=[], help="key=value for every cell")
    p.add_argument(
        "--evals",
        default="",
        help="comma-separated: run only these of config.evals and configs/common.finetune_evals",
    )
    return p.parse_args(argv)


def cell_config(args: argparse.Namespace, method: str, seed: int, baselines: bool = True):
    """The config of one cell: the method's tiny recipe, `seed` for init and data order;
    `baselines=False` skips the evaluator's baselines (one cell per method computes them:
    random init depends on the architecture and seed only, raw pixels on nothing trained)."""
    module, extra, _ = METHODS[method]
    arg = ",".join(filter(None, [f"data={args.data}", extra]))
    config = importlib.import_module(f"configs.{module}").get_config(arg)
    config.seed = seed
    config.data.seed = seed
    config.train.progress = False
    if args.batch_size > 0:
        config.train.batch_size = args.batch_size
    steps, warmup = shared_budget(args, config.train.batch_size)
    config.train.total_steps = steps
    if warmup > 0:
        config.optim.warmup_steps = warmup
    for item in args.override:
        key, _, value = item.partition("=")
        try:
            check_keys([key], config)
        except KeyError as e:  # a typo would otherwise add a key no code reads
            raise SystemExit(f"--override {item}: {e.args[0]}") from None
        set_path(config, key, value)
    if args.evals:
        known = {**finetune_evals(args.data, config.data.image_size), **config.evals}
        try:
            config.evals = select_evals(known, args.evals.split(","))
        except ValueError as e:
            raise SystemExit(f"--{e}") from None
    if not baselines:
        for name in config.evals:
            config.evals[name]["baselines"] = False
    return config


def shared_budget(args: argparse.Namespace, batch_size: int) -> tuple[int, int]:
    """(steps, warmup steps) of every cell: `--steps` (warmup left to the recipe), or else the
    CLIP recipe's epochs over its own training records (the emoji pairs) at `batch_size`, with
    one such epoch of warmup. A mixture's epoch is one pass over its scarcest source
    (trainer.epoch_records), so UniCL's own 10 epochs (emoji at weight 1, Fashion-MNIST at
    0.5) would be 1.5x CLIP's steps: one budget for every method keeps compute equal."""
    if args.steps > 0:
        return args.steps, -1
    from mmssl_jax.training.trainer import epoch_records

    clip = importlib.import_module(f"configs.{METHODS['clip'][0]}").get_config(f"data={args.data}")
    per_epoch = max(1, epoch_records(clip.data) // batch_size)
    return max(1, round(clip.train.epochs * per_epoch)), per_epoch


def set_path(config, key: str, value: str) -> None:
    """`config.a.b = value`, the value parsed as a Python literal where it is one."""
    import ast

    *parents, last = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    try:
        node[last] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        node[last] = value


def run_cell(args: argparse.Namespace, method: str, seed: int, baselines: bool = True) -> dict:
    """Trains (or resumes) and evaluates one cell; returns and writes its cell.json. A
    finished cell only runs the evaluations it lacks (`late_evals`)."""
    from mmssl_jax.evaluation import hook
    from mmssl_jax.training.restore import CONFIG_FILE, save_config
    from mmssl_jax.training.trainer import Trainer, pin_paths

    workdir = os.path.join(args.output, "runs", f"{method}_s{seed}")
    done = os.path.join(workdir, CELL_FILE)
    config = cell_config(args, method, seed, baselines)
    finished = os.path.exists(done)
    if not finished or not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
        os.makedirs(workdir, exist_ok=True)
        pin_paths(config, workdir)
        save_config(config, workdir)
    if finished:
        with open(done) as f:
            return late_evals(json.load(f), config, workdir)
    start = time.perf_counter()
    trainer = Trainer(config, workdir)
    trainer.run()
    train_s = time.perf_counter() - start
    metrics = hook.evaluate_latest(trainer)
    cell = {
        "method": method,
        "seed": seed,
        "steps": int(config.train.total_steps),
        "train_s": round(train_s, 1),
        "total_s": round(time.perf_counter() - start, 1),
        "evals": sorted(config.evals),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "baselines": report_baselines(workdir),
    }
    write_cell(cell, workdir)
    return cell


def evals_run(cell: dict) -> set[str]:
    """The evaluations a cell has run (cells written before "evals" was kept: the prefixes
    of its metrics)."""
    return set(cell.get("evals") or {k.split("/", 1)[0] for k in cell["metrics"]})


def late_evals(cell: dict, config, workdir: str) -> dict:
    """`cell` with the evaluations of `config` it has not run yet run on its last checkpoint
    (the same encoder the cell's own evaluation saw) and merged in; written back."""
    from mmssl_jax.evaluation import hook

    missing = [name for name in config.evals if name not in evals_run(cell)]
    if not missing:
        return cell
    config.evals = {name: config.evals[name] for name in missing}
    start = time.perf_counter()
    metrics = hook.evaluate_checkpoint(config, workdir)
    cell = dict(cell, evals=sorted(evals_run(cell) | set(missing)))
    cell["metrics"] = {**cell["metrics"], **{k: float(v) for k, v in metrics.items()}}
    for kind, values in report_baselines(workdir).items():
        cell["baselines"][kind] = {**cell["baselines"].get(kind, {}), **values}
    cell["late_eval_s"] = round(cell.get("late_eval_s", 0) + time.perf_counter() - start, 1)
    write_cell(cell, workdir)
    return cell


def report_baselines(workdir: str) -> dict[str, dict[str, float]]:
    """{kind: {metric: value}} of the baselines in the workdir's latest evaluation report."""
    with open(os.path.join(workdir, "eval", "latest.json")) as f:
        report = json.load(f)
    return {
        kind: {k: float(v) for k, v in report.get("baselines", {}).get(kind, {}).items()}
        for kind in BASELINES
    }


def write_cell(cell: dict, workdir: str) -> None:
    done = os.path.join(workdir, CELL_FILE)
    tmp = done + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cell, f, indent=1)
    os.replace(tmp, done)


def columns(cells: Sequence[dict]) -> list[str]:
    """The metric names to tabulate: the headline ones (top-1, R@1, R@10, accuracy) present
    in any cell, in a stable order."""
    names = sorted({k for c in cells for k in c["metrics"]})
    keep = ("top1", "R@1", "R@10", "accuracy", "acc")
    return [n for n in names if n.rsplit("/", 1)[-1] in keep or n.endswith("_R@1")]


def summarize(cells: Sequence[dict]) -> dict:
    """{method: {metric: {"mean", "std", "n"}}} over the seeds (std with ddof=1)."""
    import numpy as np

    out: dict[str, dict] = {}
    for method in dict.fromkeys(c["method"] for c in cells):
        rows = [c for c in cells if c["method"] == method]
        stats = {}
        for name in columns(cells):
            values = [c["metrics"][name] for c in rows if name in c["metrics"]]
            if values:
                v = np.asarray(values, np.float64)
                std = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
                stats[name] = {"mean": float(v.mean()), "std": std, "n": len(v)}
        out[method] = stats
    return out


def baseline_values(cells: Sequence[dict]) -> dict[str, dict[str, float]]:
    """{kind: {metric: value}} from the first cell that has each (baselines do not depend on
    the method's training, only on the architecture and the evaluation)."""
    out: dict[str, dict[str, float]] = {kind: {} for kind in BASELINES}
    for c in cells:
        for kind in BASELINES:
            for k, v in c["baselines"].get(kind, {}).items():
                out[kind].setdefault(k, v)
    return out


def write_outputs(args: argparse.Namespace, cells: list[dict], command: str) -> None:
    summary = summarize(cells)
    base = baseline_values(cells)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "reproduce.json"), "w") as f:
        json.dump(
            {"command": command, "cells": cells, "summary": summary, "baselines": base}, f, indent=1
        )
    names = columns(cells)
    pct = lambda m: f"{100 * m['mean']:.1f} ± {100 * m['std']:.1f}"  # noqa: E731
    lines = [
        "# SLIP's comparison on the embedded data",
        "",
        f"Command: `{command}`  ",
        f"{len(cells)} cells; seeds per method: "
        + ", ".join(f"{m} {len([c for c in cells if c['method'] == m])}" for m in summary)
        + ". Mean ± std over seeds, in %.",
        "",
        "| method | " + " | ".join(names) + " | train min |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for method, stats in summary.items():
        minutes = [c["train_s"] / 60 for c in cells if c["method"] == method]
        row = [pct(stats[n]) if n in stats else "-" for n in names]
        lines.append(
            f"| {method} ({METHODS[method][2]}) | "
            + " | ".join(row)
            + f" | {sum(minutes) / len(minutes):.1f} |"
        )
    for kind in (k for k in BASELINES if any(n in base[k] for n in names)):
        row = [f"{100 * base[kind][n]:.1f}" if n in base[kind] else "-" for n in names]
        lines.append(f"| *{kind.replace('_', ' ')}* | " + " | ".join(row) + " | |")
    with open(os.path.join(args.output, "reproduce.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(summary, base, names, os.path.join(args.output, "reproduce.png"))


def plot(summary: dict, base: dict, names: list[str], path: str) -> None:
    """One panel per metric: a bar per method (mean, error bar = std over seeds, n seeds in
    its label), the baselines as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not names:
        return
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    methods = list(summary)
    for ax, name in zip(axes.flat, names, strict=False):
        means = [100 * summary[m].get(name, {}).get("mean", np.nan) for m in methods]
        stds = [100 * summary[m].get(name, {}).get("std", 0.0) for m in methods]
        x = np.arange(len(methods))
        ax.bar(x, means, yerr=np.nan_to_num(stds), capsize=3, color="tab:blue")
        for kind, style in zip(BASELINES, ("--", ":", "-."), strict=True):
            if name in base[kind]:
                ax.axhline(
                    100 * base[kind][name], color="gray", ls=style, label=kind.replace("_", " ")
                )
        seeds = [summary[m].get(name, {}).get("n", 0) for m in methods]
        ax.set_xticks(
            x,
            [f"{m} (n={n})" for m, n in zip(methods, seeds, strict=True)],
            rotation=30,
            ha="right",
        )
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("%")
        if any(name in base[k] for k in BASELINES):
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    from tqdm import tqdm

    args = parse_args(argv)
    command = "python tools/reproduce.py " + " ".join(sys.argv[1:] if argv is None else argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; valid: {sorted(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    todo = [(m, s) for m in methods for s in seeds]
    finished = {
        cell: os.path.exists(os.path.join(args.output, "runs", f"{cell[0]}_s{cell[1]}", CELL_FILE))
        for cell in todo
    }
    cells = []
    # The bar starts at the cells already done, so its rate and ETA are those of cells run.
    with tqdm(total=len(todo), initial=sum(finished.values()), desc="cells", unit="cell") as bar:
        for method, seed in todo:
            bar.set_postfix_str(f"{method} seed {seed}")
            first = seed == seeds[0]  # one cell per method computes the baselines
            cells.append(run_cell(args, method, seed, baselines=first))
            write_outputs(args, cells, command)
            if not finished[(method, seed)]:
                bar.update(1)
    print(open(os.path.join(args.output, "reproduce.md")).read())
    return cells


if __name__ == "__main__":
    main()
