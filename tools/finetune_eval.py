"""Runs one `finetune` evaluation on a trained workdir's latest checkpoint, beside the same
architecture at random init, and writes the report under --output (the workdir's own
eval/ is left alone).

    python tools/finetune_eval.py --workdir=workdirs/tiny_slip \\
        --output=workdirs/tiny_slip_finetune --set epochs=3 --set crop_scale='(0.5, 1.0)'

The model comes from `<workdir>/config.json`; the evaluation defaults to Fashion-MNIST
(10000 train / 2000 test records at the model's image size); `--set key=value` (a Python
literal) overrides any finetune key of evaluation/runner.py.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def eval_config(image_size: int, data: str, overrides: list[str]) -> dict:
    """The finetune evaluation config: Fashion-MNIST defaults plus `key=value` overrides."""
    cfg = dict(
        type="finetune",
        train_shards=f"{data}/fashion_mnist/fashion_mnist-train-*.tfrecord",
        test_shards=f"{data}/fashion_mnist/fashion_mnist-test-*.tfrecord",
        classnames=f"{data}/fashion_mnist/fashion_mnist-classnames.json",
        train_limit=10000,
        test_limit=2000,
        image_size=image_size,
        plots=False,
    )
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            cfg[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            cfg[key] = value  # a plain string (a path)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="trained workdir (read only)")
    parser.add_argument("--output", required=True, help="where eval/ (report) is written")
    parser.add_argument("--name", default="fashion_finetune", help="the evaluation's name")
    parser.add_argument("--data", default="data", help="root of the embedded shards")
    parser.add_argument("--set", action="append", default=[], help="finetune key=value")
    args = parser.parse_args()

    import jax
    import ml_collections

    from mmssl_jax.evaluation.hook import encoders_for
    from mmssl_jax.evaluation.runner import run_evals
    from mmssl_jax.training.checkpoint import Checkpointer
    from mmssl_jax.training.trainer import Trainer

    with open(os.path.join(args.workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    config.evals = ml_collections.ConfigDict()  # only this evaluation: no block features
    trainer = Trainer(config, args.workdir)
    ckpt = Checkpointer(args.workdir)
    state = ckpt.restore(trainer.abstract_state(), None)
    ckpt.close()
    encoder, random_encoder = encoders_for(trainer, state)
    evals = {args.name: eval_config(config.data.image_size, args.data, args.set)}
    os.makedirs(args.output, exist_ok=True)
    metrics = run_evals(
        evals,
        encoder,
        workdir=args.output,
        step=int(jax.device_get(state.step)),
        random_encoder=random_encoder,
    )
    print(json.dumps(metrics, indent=1))
    print(open(os.path.join(args.output, "eval", "latest.md")).read())


if __name__ == "__main__":
    main()
