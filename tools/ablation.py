"""The thesis's two ablations on the embedded data: text encoder, and loss on LDA topics.

    python tools/ablation.py --data data --output ablation --steps 300

Every cell trains the tiny ViT from scratch on the emoji image-caption pairs for --steps
steps, then a linear probe on its image feature is fitted and scored on Fashion-MNIST (10
classes) and on the emoji subgroups (99 classes, held-out emoji):

- encoder table: the image feature learns to match a text embedding of its caption with the
  same InfoNCE loss (topic_contrastive), the text embedding being LDA topics, LSA (TF-IDF +
  SVD), mean word2vec vectors (if gensim is installed), the sentence embedding of the
  pretrained all-MiniLM-L6-v2 (bert, 384 dims, if installed), or a transformer learned
  jointly (CLIP, tiny_clip);
- loss table: LDA topics (K=40) with MSE, softmax, BCE, triplet and contrastive losses.

Beside them, the evaluator's two baselines on the same probes: raw pixels and the same
network at random init. Writes OUTPUT/ablation.md (both tables, the command, wall times)
and OUTPUT/ablation.png (bar chart); each run's workdir stays under OUTPUT/runs/.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EVALS = ("fashion", "emoji")
LOSSES = ("mse", "softmax", "bce", "triplet", "contrastive")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="data", help="root of the embedded data")
    p.add_argument("--output", default="ablation", help="output folder")
    p.add_argument("--steps", type=int, default=300, help="training steps per cell")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--dim", type=int, default=40, help="topics / text embedding size")
    p.add_argument("--num_devices", type=int, default=1)
    p.add_argument("--only", default="", help="comma-separated cell names to run")
    return p.parse_args(argv)


def kind_dim(kind: str, dim: int) -> int:
    """The target size of text model `kind`: `dim`, or a BERT encoder's hidden size."""
    if kind != "bert":
        return dim
    from mmssl_jax.models import bert

    return bert.read_bert_config(bert.find_bert_dir("all-minilm-l6-v2"))["hidden"]


def has_bert() -> bool:
    from mmssl_jax.models import bert

    try:
        bert.find_bert_dir("all-minilm-l6-v2")
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as e:
        print(f"all-MiniLM-L6-v2 is not installed ({e}): no bert row", file=sys.stderr)
        return False
    return True


def ensure_topics(data: str, kind: str, dim: int) -> str:
    """Topic shards of the emoji set for text model `kind` (fitted if not there yet)."""
    from input_pipeline.sources import topics

    dim = kind_dim(kind, dim)
    out = os.path.join(data, f"topics_{kind}", "emoji")
    model_json = os.path.join(out, topics.MODEL_JSON)
    if os.path.exists(model_json):
        with open(model_json) as f:
            if json.load(f)["options"]["dim"] == dim:
                return out
    from tools import fit_topics

    emoji = os.path.join(data, "emoji")
    fit_topics.main(
        [
            "--fit",
            os.path.join(emoji, "emoji-train-*.tfrecord"),
            "--apply",
            os.path.join(emoji, "emoji-test-*.tfrecord"),
            "--kind",
            kind,
            "--dim",
            str(dim),
            "--output_dir",
            out,
        ]
    )
    return out


def probe_evals(data: str, baselines: bool) -> dict:
    """Linear probes on the image feature: Fashion-MNIST and the 99 emoji subgroups. The
    baselines (raw pixels, random init) are the same for every cell: the first computes them."""
    common = dict(
        type="linear_probe", image_size=32, layers=("feature",), tsne=False, baselines=baselines
    )
    return {
        "fashion": dict(
            common,
            train_shards=f"{data}/fashion_mnist/fashion_mnist-train-*.tfrecord",
            test_shards=f"{data}/fashion_mnist/fashion_mnist-test-*.tfrecord",
            train_limit=3000,
            test_limit=2000,
        ),
        "emoji": dict(
            common,
            train_shards=f"{data}/emoji/emoji-train-*.tfrecord",
            test_shards=f"{data}/emoji/emoji-test-*.tfrecord",
        ),
    }


def cells(args: argparse.Namespace) -> list[tuple[str, str, str, list, str]]:
    """(table, row, config module, objectives, text model) for every cell."""
    out = []
    encoders = ["lda", "lsa"]
    try:
        import gensim  # noqa: F401

        encoders.append("word2vec")
    except ImportError:
        print("gensim is not installed: no word2vec row", file=sys.stderr)
    for kind in encoders:
        out.append(("encoder", kind, "tiny_topics", [("topic_contrastive", 1.0)], kind))
    if has_bert():
        row = "bert (MiniLM)"
        out.append(("encoder", row, "tiny_topics", [("topic_contrastive", 1.0)], "bert"))
    out.append(("encoder", "transformer (CLIP)", "tiny_clip", [("clip", 1.0)], ""))
    for loss in LOSSES:
        out.append(("loss", loss, "tiny_topics", [(f"topic_{loss}", 1.0)], "lda"))
    return out


def run_cell(args, table, row, module, objectives, kind, baselines=True) -> dict:
    from mmssl_jax.evaluation import hook as evaluation_hook
    from mmssl_jax.training.trainer import Trainer

    dim = kind_dim(kind, args.dim) if kind else 0
    arg = f"data={args.data}" + (f",topics={kind},topic_dim={dim}" if kind else "")
    config = importlib.import_module(f"configs.{module}").get_config(arg)
    config.objectives = objectives
    config.train.update(
        dict(
            batch_size=args.batch_size,
            total_steps=args.steps,
            log_every=max(1, args.steps // 20),
            ckpt_every=10 * args.steps,
            progress=False,
            num_devices=args.num_devices,
        )
    )
    config.optim.warmup_steps = max(1, args.steps // 20)
    config.evals = probe_evals(args.data, baselines)
    workdir = os.path.join(args.output, "runs", f"{table}_{row.split()[0]}")
    start = time.perf_counter()
    trainer = Trainer(config, workdir)
    trainer.run()
    train_s = time.perf_counter() - start
    results = evaluation_hook.evaluate_latest(trainer)
    found = {}
    if baselines:
        with open(os.path.join(workdir, "eval", "baselines.json")) as f:
            found = json.load(f)
    out = {
        "table": table,
        "row": row,
        "objectives": objectives,
        "train_s": train_s,
        "total_s": time.perf_counter() - start,
        "final_loss": trainer_last_loss(workdir),
    }
    for name in EVALS:
        out[name] = results[f"{name}/feature/top1"]
        for key, metrics in found.items():
            if key.startswith(f"{name}/"):
                out[f"{name}/{key.split('/')[1]}"] = metrics["feature/top1"]
    return out


def trainer_last_loss(workdir: str) -> float:
    from mmssl_jax.training.metrics_writer import read_metrics

    rows = read_metrics(workdir)
    return float(rows[-1]["loss"]) if rows else float("nan")


def write_report(rows: list[dict], args: argparse.Namespace, command: str, wall_s: float):
    os.makedirs(args.output, exist_ok=True)
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = [
        "# Ablations: text encoder and loss (embedded data)",
        "",
        f"Command: `{command}`  ",
        f"Total wall time: {wall_s / 60:.1f} min ({args.steps} steps per cell, batch "
        f"{args.batch_size}, {args.num_devices} device(s)). Linear-probe top-1 (%) on the "
        "image feature.",
        "",
    ]
    base = rows[0] if rows else {}
    for table, title in (("encoder", "Text encoder"), ("loss", f"Loss (LDA, K={args.dim})")):
        lines += [
            f"## {title}",
            "",
            "| cell | Fashion-MNIST | emoji subgroups | final loss | train s |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            if r["table"] == table:
                lines.append(
                    f"| {r['row']} | {pct(r['fashion'])} | {pct(r['emoji'])} | "
                    f"{r['final_loss']:.3f} | {r['train_s']:.0f} |"
                )
        for kind in ("raw_pixels", "random_init"):
            if f"fashion/{kind}" in base:
                lines.append(
                    f"| *{kind.replace('_', ' ')}* | {pct(base[f'fashion/{kind}'])} | "
                    f"{pct(base[f'emoji/{kind}'])} | | |"
                )
        lines.append("")
    with open(os.path.join(args.output, "ablation.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(args.output, "ablation.json"), "w") as f:
        json.dump(rows, f, indent=1)
    plot(rows, os.path.join(args.output, "ablation.png"))


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not rows:
        return
    labels = [f"{r['table']}: {r['row']}" for r in rows]
    base = rows[0]
    for kind in ("raw_pixels", "random_init"):
        if f"fashion/{kind}" in base:
            labels.append(kind.replace("_", " "))
    values = {
        name: [r[name] for r in rows] + [base[f"{name}/{k}"] for k in ("raw_pixels", "random_init")]
        for name in EVALS
    }
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(8, len(labels) * 0.9), 4.5))
    for i, name in enumerate(EVALS):
        ax.bar(x + (i - 0.5) * 0.4, 100 * np.array(values[name]), 0.4, label=name)
    ax.set_xticks(x, labels, rotation=35, ha="right")
    ax.set_ylabel("linear probe top-1 (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    command = "python tools/ablation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    todo = cells(args)
    if args.only:
        keep = set(args.only.split(","))
        todo = [c for c in todo if f"{c[0]}_{c[1].split()[0]}" in keep]
    for kind in sorted({c[4] for c in todo if c[4]}):
        ensure_topics(args.data, kind, args.dim)
    rows = []
    for cell in todo:
        print(f"== {cell[0]}: {cell[1]}", flush=True)
        rows.append(run_cell(args, *cell, baselines=not rows))
        write_report(rows, args, command, time.perf_counter() - start)
    return rows


if __name__ == "__main__":
    main()
