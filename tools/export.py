"""Exports a training run's checkpoint for inference and for use without this codebase.

    python tools/export.py --workdir=workdirs/tiny_slip --output=exports/tiny_slip
    python tools/export.py --workdir=DIR --output=OUT --step=2000 --config=configs/slip_vits.py

Reads the run's config from `DIR/config.json` (written by mmssl_jax.main) unless --config is
given, restores the latest checkpoint (or --step), and writes OUT: params.safetensors,
model.json, preprocess.json, tokenizer.model, the jax.export artifacts encode_images.jax /
encode_texts.jax and a sha256 manifest (layout in mmssl_jax/export/). Load it with

    from mmssl_jax import load_pretrained
    model = load_pretrained("OUT")
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config_file(spec: str):
    """`configs/NAME.py[:arg]` -> its get_config(arg) (the same syntax as mmssl_jax.main)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_export_config", path)
    if module_spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} not found")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True, help="training run directory (checkpoints/)")
    p.add_argument("--output", required=True, help="export directory to write")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument(
        "--config", default=None, help="training config file (default: WORKDIR/config.json)"
    )
    p.add_argument("--tokenizer", default=None, help="override config.data.tokenizer")
    p.add_argument(
        "--no_stablehlo",
        action="store_true",
        help="skip the jax.export artifacts (params, config and tokenizer only)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from mmssl_jax.export import export_checkpoint

    config = load_config_file(args.config) if args.config else None
    out = export_checkpoint(
        args.workdir,
        args.output,
        step=args.step,
        config=config,
        tokenizer=args.tokenizer,
        stablehlo=not args.no_stablehlo,
        overwrite=args.overwrite,
    )
    print(f"exported {args.workdir} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
