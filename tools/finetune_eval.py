"""Runs one `finetune` evaluation on a trained workdir's latest checkpoint, beside the same
architecture at random init, and writes the report under --output (the workdir's own
eval/ is left alone).

    python tools/finetune_eval.py --workdir=workdirs/tiny_slip \\
        --output=workdirs/tiny_slip_finetune --eval=emoji_finetune --set epochs=5

The model comes from `<workdir>/config.json` (written by mmssl_jax.main and
tools/reproduce.py); the evaluation is one of configs/common.finetune_evals (emoji
subgroups or Fashion-MNIST) at the model's image size; `--set key=value` (a Python literal)
overrides any finetune key of evaluation/runner.py.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.common import finetune_evals  # noqa: E402


def eval_config(name: str, image_size: int, data: str, overrides: list[str]) -> dict:
    """The finetune evaluation `name` of finetune_evals plus `key=value` overrides."""
    choices = finetune_evals(data, image_size)
    if name not in choices:
        raise SystemExit(f"--eval {name!r}: not one of {sorted(choices)}")
    cfg = dict(choices[name])
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            cfg[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            cfg[key] = value  # a plain string (a path)
    return cfg


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="trained workdir (read only)")
    parser.add_argument("--output", required=True, help="where eval/ (report) is written")
    parser.add_argument("--eval", default="fashion_finetune", help="a finetune_evals name")
    parser.add_argument("--data", default="data", help="root of the embedded shards")
    parser.add_argument("--set", action="append", default=[], help="finetune key=value")
    args = parser.parse_args(argv)

    from mmssl_jax.evaluation.hook import make_evaluate
    from mmssl_jax.models.registry import build_model
    from mmssl_jax.training.restore import load_config, restore_variables

    config = load_config(args.workdir)  # config.json, written by main and tools/reproduce.py
    model_cfg, variables, step = restore_variables(config, args.workdir)
    size = config.data.image_size
    config.evals = {args.eval: eval_config(args.eval, size, args.data, args.set)}  # only it
    os.makedirs(args.output, exist_ok=True)
    evaluate = make_evaluate(config, args.output, build_model(model_cfg), model_cfg)
    metrics = evaluate(variables, step)
    print(json.dumps(metrics, indent=1))
    print(open(os.path.join(args.output, "eval", "latest.md")).read())
    return metrics


if __name__ == "__main__":
    main()
