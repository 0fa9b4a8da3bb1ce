"""Loss benchmark: per-device memory and time of the sharded losses on 8 emulated CPU devices.

    python tools/benchmarks/loss.py --out loss.json      (or python -m tools.benchmarks.loss)

For global batches 4096 .. 65536 (embed dim 512, float32), forward + backward of:
- `clip`: the sharded CLIP term, one [n, N] logit block per device (n = N / 8);
- `clip_chunked`: the same with `chunk_size` columns per block ([n, chunk] live at a time,
  online logsumexp, custom backward);
- `clip_naive`: a reference that all-gathers both sides and builds the [N, N] logits on every
  device (what a pmap port of a single-device loss does);
- `siglip_ring` / `siglip_ring_chunked`: the sigmoid loss as a ppermute ring of [n, n]
  blocks, optionally split into [n, chunk] sub-blocks.

Memory is XLA's compiled `memory_analysis()` per device (temp = scratch, argument, output),
from `jax.jit(...).lower(...).compile()` on abstract sharded inputs, so sizes that would not
fit in RAM are still measured. Time is wall-clock of the compiled step on real data, only
for the sizes given by --time_max (8 emulated devices share this machine's cores, so times
are for comparing variants, not hardware). Each row also records the largest logit-shaped
dot product per device, read from the jaxpr.
"""

from __future__ import annotations

import os
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import argparse  # noqa: E402
import functools  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mmssl_jax import objectives
from mmssl_jax.objectives import core  # noqa: E402
from mmssl_jax.parallel import mesh as parallel
from tools.benchmarks.emit import emit  # noqa: E402

NUM_DEVICES = 8
GIB = 2**30
VARIANTS = ("clip", "clip_chunked", "clip_naive", "siglip_ring", "siglip_ring_chunked")


def _naive_clip(outputs: dict, axis_name: str) -> jax.Array:
    """Reference: every device gathers both sides and computes the full [N, N] CLIP loss."""
    img = core.gather_rows(core.l2_normalize(outputs["image_emb"]), axis_name)
    txt = core.gather_rows(core.l2_normalize(outputs["text_emb"]), axis_name)
    logits = outputs["logit_scale"] * img @ txt.T
    diag = jnp.diagonal(logits)
    i2t = jnp.mean(jax.nn.logsumexp(logits, axis=1) - diag)
    t2i = jnp.mean(jax.nn.logsumexp(logits, axis=0) - diag)
    return jax.lax.pmean((i2t + t2i) / 2, axis_name)  # identical on all devices already


def _loss_fn(variant: str, mesh, chunk: int) -> Callable[[dict], jax.Array]:
    if variant == "clip_naive":
        specs = {"image_emb": jax.P("data"), "text_emb": jax.P("data"), "logit_scale": jax.P()}
        return jax.shard_map(
            functools.partial(_naive_clip, axis_name="data"),
            mesh=mesh,
            in_specs=(specs,),
            out_specs=jax.P(),
        )
    term, opts = {
        "clip": ("clip", {}),
        "clip_chunked": ("clip", {"chunk_size": chunk}),
        "siglip_ring": ("siglip", {}),
        "siglip_ring_chunked": ("siglip", {"chunk_size": chunk}),
    }[variant]
    return lambda o: objectives.total_loss([(term, 1.0, opts)], o, mesh)[0]


def _inputs(variant: str, batch: int, dim: int, mesh, abstract: bool, seed: int = 0) -> dict:
    keys = ["image_emb", "text_emb", "logit_scale"] + (
        ["logit_bias"] if "siglip" in variant else []
    )
    shard, repl = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    if abstract:
        return {
            k: jax.ShapeDtypeStruct(
                (batch, dim) if k.endswith("emb") else (),
                jnp.float32,
                sharding=shard if k.endswith("emb") else repl,
            )
            for k in keys
        }
    rng = np.random.default_rng(seed)
    host = {k: rng.normal(size=(batch, dim)).astype(np.float32) for k in keys if k.endswith("emb")}
    host |= {"logit_scale": np.float32(14.3), "logit_bias": np.float32(-10.0)}
    return parallel.to_global({k: host[k] for k in keys}, mesh)


def _dot_shapes(jaxpr) -> list[tuple[int, ...]]:
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for param in eqn.params.values():
            sub = getattr(param, "jaxpr", param)
            if hasattr(sub, "eqns"):
                shapes += _dot_shapes(sub)
    return shapes


def _largest_logits(fn: Callable, variant: str, batch: int, mesh) -> list[int]:
    """The largest per-device dot output of forward + backward, traced with a tiny embed dim
    (3, unlike any batch or block size) so the [rows, cols] logit blocks stand out."""
    inputs = _inputs(variant, batch, 3, mesh, abstract=True)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(fn))(inputs).jaxpr
    shapes = [s for s in _dot_shapes(jaxpr) if len(s) == 2 and 3 not in s]
    return list(max(shapes, key=np.prod)) if shapes else []


def measure(variant: str, batch: int, args, mesh) -> dict:
    """Compile (and maybe time) one variant at one global batch size."""
    fn = _loss_fn(variant, mesh, args.chunk)
    step = jax.jit(jax.value_and_grad(fn))
    abstract = _inputs(variant, batch, args.dim, mesh, abstract=True)
    t0 = time.perf_counter()
    compiled = step.lower(abstract).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    row = {
        "variant": variant,
        "global_batch": batch,
        "per_device_batch": batch // NUM_DEVICES,
        "chunk_size": args.chunk if variant.endswith("chunked") else None,
        "logits_block_per_device": _largest_logits(fn, variant, batch, mesh),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_gib": round(mem.temp_size_in_bytes / GIB, 4),
        "compile_s": round(compile_s, 2),
        "step_s": None,
    }
    time_max = args.naive_time_max if variant == "clip_naive" else args.time_max
    if batch <= time_max:
        inputs = _inputs(variant, batch, args.dim, mesh, abstract=False)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(inputs))
            times.append(time.perf_counter() - t0)
        row["step_s"] = round(min(times), 3)
    return row


def run(args) -> dict:
    """Runs the benchmark; `args` as from `parse_args` (missing fields take the defaults)."""
    args = argparse.Namespace(**(vars(parse_args([])) | vars(args)))
    if jax.device_count() < NUM_DEVICES:
        raise RuntimeError(
            f"the loss benchmark needs {NUM_DEVICES} devices, found {jax.device_count()}: "
            "JAX was initialised before this module set XLA_FLAGS; run it as a script"
        )
    mesh = parallel.make_mesh(NUM_DEVICES)
    rows = []
    for batch in args.batches:
        for variant in args.variants:
            row = measure(variant, batch, args, mesh)
            rows.append(row)
            print(
                f"{variant:>20} N={batch:>6} logits/device={row['logits_block_per_device']} "
                f"temp={row['temp_gib']:.3f} GiB step={row['step_s']} s",
                file=sys.stderr,
                flush=True,
            )
    best = {r["variant"]: r["temp_gib"] for r in rows if r["global_batch"] == max(args.batches)}
    return {
        "benchmark": "loss",
        "device": f"{NUM_DEVICES} x {jax.devices()[0].device_kind} (emulated)",
        "host_cores": os.cpu_count(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "embed_dim": args.dim,
        "dtype": "float32",
        "budget_gib": args.budget_gib,
        "largest_batch": max(args.batches),
        "temp_gib_at_largest_batch": best,
        "within_budget_at_largest_batch": {k: v <= args.budget_gib for k, v in best.items()},
        "results": rows,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk", type=int, default=2048, help="columns per block (chunked forms)")
    p.add_argument("--time_max", type=int, default=8192, help="time batches up to this size")
    p.add_argument("--naive_time_max", type=int, default=4096, help="same for clip_naive")
    p.add_argument("--repeats", type=int, default=1, help="timed runs (the minimum is kept)")
    p.add_argument("--budget_gib", type=float, default=1.2, help="scratch budget per device")
    p.add_argument("--out", help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    return emit(run(args), args.out)


if __name__ == "__main__":
    main()
