"""The locked text tower's feature cache on a recipe's real captions: how it ran the tower on
the misses at first (every row at the full context length, 32 rows per call, one device)
against length buckets, small chunks and the training mesh's devices.

    python tools/benchmark.py text_cache --out text_cache.json
    python -m tools.benchmarks.text_cache --batches 200 --rounds 2 --out text_cache.json

It reads the token rows of the first `--batches` training batches of `--config` (default
the quick start's `configs/tiny_minilm.py`, all-MiniLM-L6-v2 locked, 16 tokens, batch 128)
from the real pipeline, then feeds them, batch by batch in order, through a fresh cache of
each variant, as a training run would (hits are free, misses run the tower), and times it.
Each variant first compiles its shapes on the same rows (then forgets them); variants
alternate over `--rounds` and the fastest round is kept. `cpu_use` is process CPU seconds
per wall second (2.0: both cores of a 2-core machine busy). The tower here runs alone; in
training it also queues behind the step in flight.

Variants (`LockedTextCache` arguments):
- `fixed_32_one_device`: chunk 32, one device, full length: the cache before;
- `buckets_32_one_device`: four length buckets, otherwise the same;
- `buckets_8_one_device`: buckets, 8 rows per call;
- `buckets_8_mesh`: buckets, 8 rows per call split over `--devices` emulated CPU devices (the
  trainer's default now; the quick start trains on 2);
- `buckets_16_mesh`: the same with 16 rows per call.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _devices_from_argv(argv: Sequence[str]) -> int:
    for i, arg in enumerate(argv):
        if arg.startswith("--devices="):
            return int(arg.split("=", 1)[1])
        if arg == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
    return 2


if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={_devices_from_argv(sys.argv[1:])}"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tools.benchmarks.emit import emit  # noqa: E402

VARIANTS = {
    "fixed_32_one_device": dict(chunk=32, buckets=1, mesh=False),
    "buckets_32_one_device": dict(chunk=32, buckets=4, mesh=False),
    "buckets_8_one_device": dict(chunk=8, buckets=4, mesh=False),
    "buckets_8_mesh": dict(chunk=8, buckets=4, mesh=True),
    "buckets_16_mesh": dict(chunk=16, buckets=4, mesh=True),
}
BASELINE = "fixed_32_one_device"


def token_batches(config_spec: str, batches: int) -> tuple[list, object]:
    """(the token rows of the first `batches` training batches of `configs/NAME.py[:arg]`,
    the Trainer built from it)."""
    from mmssl_jax.training.trainer import Trainer
    from tools.export import load_config_file

    config = load_config_file(config_spec)
    config.evals = {}
    trainer = Trainer(config, os.path.join("/tmp", f"text_cache_bench_{os.getpid()}"))
    rows = [np.asarray(next(trainer.data_iter)["tokens"]) for _ in range(batches)]
    return rows, trainer


def time_variant(cache, rows: list[np.ndarray]) -> dict[str, float]:
    """Seconds, CPU use and tower work to feed `rows` through `cache` (cleared first)."""
    cache.clear()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for batch in rows:
        cache.features(batch)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    stats = cache.stats()
    return {
        "seconds": round(wall, 3),
        "cpu_use": round(cpu / wall, 2) if wall else None,
        "misses": int(stats["misses"]),
        "tower_calls": int(cache.calls),
        "token_rows_run": int(cache.tokens_run),
    }


def run(args) -> dict:
    """Runs the benchmark; `args` as from `parse_args` (missing fields take the defaults)."""
    from mmssl_jax.parallel import mesh as parallel
    from mmssl_jax.training.init_from import maybe_load_text_tower
    from mmssl_jax.training.text_cache import LockedTextCache

    args = argparse.Namespace(**(vars(parse_args([])) | vars(args)))
    rows, trainer = token_batches(args.config, args.batches)
    state = maybe_load_text_tower(
        trainer._init(trainer.config.seed), trainer.config, trainer.state_sharding
    )
    params = state.params["text_encoder"]
    mesh = parallel.make_mesh(args.devices)
    caches = {}
    for name in args.variants:
        spec = VARIANTS[name]
        cache = LockedTextCache(
            trainer.model.text_encoder,
            params,
            chunk=spec["chunk"],
            buckets=spec["buckets"],
            mesh=mesh if spec["mesh"] else None,
        )
        time_variant(cache, rows)  # compiles every shape these rows need
        caches[name] = cache
    rounds: dict[str, list[dict]] = {name: [] for name in args.variants}
    for _ in range(args.rounds):
        for name in args.variants:
            rounds[name].append(time_variant(caches[name], rows))
            print(f"{name:>24}: {rounds[name][-1]}", file=sys.stderr, flush=True)
    best = {name: min(r, key=lambda x: x["seconds"]) for name, r in rounds.items()}
    base = best.get(BASELINE)
    for row in best.values():
        if base:
            row["speedup_vs_" + BASELINE] = round(base["seconds"] / row["seconds"], 2)
    lengths = np.concatenate([(b != 0).sum(axis=1) for b in rows])
    return {
        "benchmark": "text_cache",
        "config": args.config,
        "batches": args.batches,
        "batch_size": int(rows[0].shape[0]),
        "context_length": int(rows[0].shape[1]),
        "mean_tokens_per_row": round(float(lengths.mean()), 2),
        "devices": args.devices,
        "host_cores": os.cpu_count(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "rounds": args.rounds,
        "results": best,
        "all_rounds": rounds,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/tiny_minilm.py", help="a recipe, PATH[:arg]")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--devices", type=int, default=2, help="emulated CPU devices of the mesh")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--out", help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    return emit(run(args), args.out)


if __name__ == "__main__":
    main()
