"""One-GPU check: ViT-B/16 SLIP in bf16, the largest batch that fits, JAX vs PyTorch AMP.

    bash tools/gpu_check.sh                    # on a machine with one GPU, < 5 minutes
    python tools/benchmarks/gpu.py --smoke     # the same path on CPU with tiny settings

Each framework runs in its own subprocess (JAX preallocates GPU memory; the two must not
share a device), one after the other:

- JAX: configs/slip_vitb.py with `model.dtype=bfloat16` (parameters and optimizer fp32,
  compute bf16, losses fp32), the Trainer's jitted step (`train.make_train_step`) on a
  synthetic uint8/int32 batch on the device. The batch: one probe compile at the smallest
  candidate gives XLA's memory analysis (arguments + temporaries); the largest candidate
  predicted to fit in 92% of the device's memory is compiled and run, stepping down a
  candidate on a compile-time or run-time out-of-memory. Then warm-up steps and `--steps`
  timed steps (dispatched back to back, one sync at the end, as the Trainer runs).
- PyTorch: the same dims (tools/benchmarks/train.py's `torch_slip`), eager, bf16 autocast,
  AdamW; candidates tried from the largest down, out-of-memory steps down.

Printed and written as JSON: img/s, step time, peak device memory, FLOPs per step from
XLA's cost analysis of the compiled JAX step and from the model dims (6 x params x tokens +
attention), and model FLOP utilisation = model FLOPs / step time / the device's dense bf16 peak
(`PEAK_TFLOPS`; `--peak_tflops` overrides; CPU has none).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tools.benchmarks.emit import emit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Dense bf16 peak (no sparsity), TFLOP/s, by a substring of the device name (first match).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("V100", 125.0),  # fp16 tensor cores (no bf16)
)

# 128 fits an 80 GB H100 (JAX peak 48 GiB, PyTorch AMP 29 GiB, measured); pass several
# candidates (`--batches 256 192 128`) to search with a memory probe (one extra compile).
DEFAULT_BATCHES = (128,)
SMOKE_BATCHES = (32, 16, 8)
MEMORY_HEADROOM = 0.92
# JAX on an H100: ~25 s start-up and state init, ~60 s step compile, ~10 s timed steps.
TIMEOUTS = {"jax": 180, "torch": 100}  # keeps the whole check under 5 minutes


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def bench_config(smoke: bool, attention: str = ""):
    """slip_vitb in bf16 (or, for --smoke, the tiny towers with one block each), with
    `attention` as `model.attention_impl` ("" XLA, "cudnn" fused)."""
    import importlib

    if smoke:
        config = importlib.import_module("configs.tiny_slip").get_config()
        config.model.image_overrides = {"depth": 1}
        config.model.text_overrides = {"layers": 1}
        config.model.ssl_head = dict(hidden=64, out=32, norm="layer")
        config.model.vocab_size = 512
    else:
        config = importlib.import_module("configs.slip_vitb").get_config()
        config.model.vocab_size = 49408  # CLIP's BPE vocabulary, as SLIP
    config.model.dtype = "bfloat16"
    config.model.attention_impl = attention
    return config


def analytic_flops(dims: dict[str, Any], batch: int) -> float:
    """Model FLOPs of one SLIP train step: 3 x forward (fwd + 2 x bwd), matmuls only.

    Per token and block 24 w^2 (qkv, proj, 4x MLP) + 4 n w (attention), three image views
    and one caption per sample, the SimCLR head on two views, the projections."""
    img, txt, head = dims["image"], dims["text"], dims["head"]
    n_img = (img["image_size"] // img["patch_size"]) ** 2 + 1
    w = img["width"]
    vit = n_img * img["depth"] * (24 * w * w + 4 * n_img * w)
    vit += (n_img - 1) * 2 * 3 * img["patch_size"] ** 2 * w
    n_txt, wt = txt["context_length"], txt["width"]
    text = n_txt * txt["layers"] * (24 * wt * wt + 4 * n_txt * wt)
    hid, out = head["hidden"], head["out"]
    mlp = 2 * (w * hid + hid * hid + hid * out)
    proj = 2 * dims["embed_dim"] * (w + wt)
    forward = 3 * vit + text + 2 * mlp + proj
    return 3.0 * forward * batch


# ----------------------------------------------------------------------------------------
# JAX (runs in its own process)


def _is_oom(err: BaseException) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _memory_limit(device) -> int | None:
    stats = device.memory_stats() or {}
    return stats.get("bytes_limit")


def _compiled_bytes(compiled) -> int | None:
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return int(
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )


def run_jax(args) -> dict:
    import jax

    from tools.benchmarks.train import JaxStep, model_dims

    device = jax.devices()[0]
    limit = _memory_limit(device)
    candidates = sorted(args.batches, reverse=True)
    config = bench_config(args.smoke, args.attention)
    log: list[dict] = []

    def build(batch: int) -> JaxStep:
        config.train.batch_size = batch
        return JaxStep(config, seed=0)

    t_start = time.perf_counter()
    order = candidates
    if limit and len(candidates) > 1 and args.probe:
        probe_batch = candidates[-1]
        probe = build(probe_batch)
        need = _compiled_bytes(probe.compiled)
        per_sample = (probe.compiled.memory_analysis().temp_size_in_bytes) / probe_batch
        fixed = need - per_sample * probe_batch
        predicted = int((MEMORY_HEADROOM * limit - fixed) // max(per_sample, 1))
        log.append(
            dict(probe_batch=probe_batch, bytes=need, per_sample=per_sample, max_batch=predicted)
        )
        del probe
        gc.collect()
        order = [b for b in candidates if b <= predicted] or candidates[-1:]
    result: dict[str, Any] = {
        "framework": "jax",
        "device": device.device_kind,
        "attention": args.attention or "xla",
    }
    for batch in order:
        try:
            step = build(batch)
            need = _compiled_bytes(step.compiled)
            if limit and need and need > MEMORY_HEADROOM * limit:
                log.append(dict(batch=batch, bytes=need, skipped="predicted out of memory"))
                del step
                gc.collect()
                continue
            for _ in range(args.warmup):
                step.step()
            jax.block_until_ready(step.state)
        except Exception as e:  # XLA reports OOM as JaxRuntimeError(RESOURCE_EXHAUSTED)
            if not _is_oom(e):
                raise
            log.append(dict(batch=batch, error="out of memory"))
            step = None
            gc.collect()
            continue
        t0 = time.perf_counter()
        for _ in range(args.steps):
            metrics = step.step()
        jax.block_until_ready((step.state, metrics))
        elapsed = time.perf_counter() - t0
        stats = device.memory_stats() or {}
        result.update(
            batch=batch,
            step_s=elapsed / args.steps,
            img_per_s=batch * args.steps / elapsed,
            loss=float(metrics["loss"]),
            compile_s=step.compile_s,
            flops_per_step_xla=step.flops,
            peak_memory_gib=(stats.get("peak_bytes_in_use") or need or 0) / 2**30,
            peak_memory_source="memory_stats" if stats else "xla_memory_analysis",
            memory_limit_gib=(limit or 0) / 2**30 or None,
        )
        break
    else:
        raise RuntimeError(f"no batch in {candidates} fits: {log}")
    result["search"] = log
    result["dims"] = model_dims(config)
    result["seconds"] = time.perf_counter() - t_start
    result["jax"] = jax.__version__
    return result


# ----------------------------------------------------------------------------------------
# PyTorch (runs in its own process)


def run_torch(args) -> dict:
    import torch

    from tools.benchmarks.train import TorchStep, model_dims

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    config = bench_config(args.smoke)
    candidates = sorted(args.batches, reverse=True)
    log: list[dict] = []
    t_start = time.perf_counter()
    result: dict[str, Any] = {"framework": "torch", "device": name}
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    for batch in candidates:
        config.train.batch_size = batch
        dims = model_dims(config)
        step = None
        try:
            step = TorchStep(dims, None, seed=0, device=device, amp_dtype=torch.bfloat16)
            for _ in range(args.warmup):
                step.step()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss = step.step()
            loss_value = loss.item()  # waits for the queue
            elapsed = time.perf_counter() - t0
        except torch.cuda.OutOfMemoryError:
            log.append(dict(batch=batch, error="out of memory"))
            del step
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            continue
        result.update(
            batch=batch,
            step_s=elapsed / args.steps,
            img_per_s=batch * args.steps / elapsed,
            loss=loss_value,
            peak_memory_gib=(torch.cuda.max_memory_allocated() / 2**30) if cuda else None,
            peak_memory_source="torch.cuda.max_memory_allocated" if cuda else None,
        )
        break
    else:
        raise RuntimeError(f"no batch in {candidates} fits: {log}")
    result["search"] = log
    result["dims"] = model_dims(config)
    result["seconds"] = time.perf_counter() - t_start
    result["torch"] = torch.__version__
    return result


# ----------------------------------------------------------------------------------------
# Driver


def _subprocess(framework: str, args, attention: str = "") -> dict:
    """Runs one framework in a fresh process (own device memory); returns its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, f"{framework}.json")
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--framework",
            framework,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--batches",
            *map(str, args.batches),
            "--out",
            out,
            "--attention",
            attention,
        ]
        if args.smoke:
            cmd.append("--smoke")
        if not args.probe:
            cmd.append("--no_probe")
        env = dict(os.environ)
        # JAX preallocates 75% by default; give it the device as PyTorch's allocator has it.
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        timeout = args.timeout or TIMEOUTS[framework]
        try:
            proc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"framework": framework, "error": f"timed out after {timeout} s"}
        if proc.returncode != 0:
            return {"framework": framework, "error": f"exit status {proc.returncode}"}
        with open(out) as f:
            return json.load(f)


def add_utilisation(row: dict, peak: float | None) -> None:
    """FLOPs per step (analytic at this batch) and MFU, in place."""
    if "batch" not in row:
        return
    row["flops_per_step_model"] = analytic_flops(row["dims"], row["batch"])
    if peak:
        row["mfu_model"] = row["flops_per_step_model"] / row["step_s"] / (peak * 1e12)
        # XLA's cost analysis misses the cuBLAS/cuDNN custom calls on GPU (it reported 5% of
        # the model FLOPs on an H100), so MFU uses the model FLOPs; the XLA count is kept
        # in the JSON for CPU/TPU, where it covers the matmuls.


def summary_lines(result: dict) -> list[str]:
    lines = [f"device: {result['device']}  (peak bf16 {result['peak_tflops']} TFLOP/s)"]
    for key in [k for k in result if k.startswith("jax_")] + ["torch"]:
        r = result.get(key) or {}
        if "batch" not in r:
            lines.append(f"{key:10s}: {r.get('error', 'not run')}")
            continue
        mem = r.get("peak_memory_gib")
        mfu = r.get("mfu_model")
        lines.append(
            f"{key:10s}: batch {r['batch']:4d}  {r['img_per_s']:9.1f} img/s  step "
            f"{1000 * r['step_s']:8.1f} ms  peak mem "
            f"{'n/a' if mem is None else f'{mem:.2f} GiB'}  MFU "
            f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'}"
        )
    if result.get("ratio"):
        best = result["jax"].get("attention", "xla")
        lines.append(f"ratio JAX ({best} attention)/PyTorch img/s: {result['ratio']:.2f}x")
    return lines


def run(args) -> dict:
    """Both frameworks (each in a subprocess), merged; the dispatcher's entry point."""
    t0 = time.perf_counter()
    rows: dict[str, dict] = {}
    if "torch" in args.frameworks:
        rows["torch"] = _subprocess("torch", args)
    if "jax" in args.frameworks:
        for attention in args.jax_attention:
            rows[f"jax_{attention or 'xla'}"] = _subprocess("jax", args, attention)
        measured = [r for k, r in rows.items() if k.startswith("jax_") and "img_per_s" in r]
        if measured:  # the headline JAX row: the fastest attention implementation
            rows["jax"] = max(measured, key=lambda r: r["img_per_s"])
    device = (rows.get("jax") or rows.get("torch") or {}).get("device", "unknown")
    peak = args.peak_tflops or peak_tflops(device)
    if device.lower() in ("cpu", "") or "cpu" in device.lower():
        peak = args.peak_tflops  # no table entry for CPUs
    for row in rows.values():
        add_utilisation(row, peak)
    result: dict[str, Any] = {
        "benchmark": "gpu_check_vitb16_slip_bf16" if not args.smoke else "gpu_check_smoke",
        "device": device,
        "peak_tflops": peak,
        "steps": args.steps,
        "warmup": args.warmup,
        **rows,
    }
    jax_row, torch_row = rows.get("jax", {}), rows.get("torch", {})
    if "img_per_s" in jax_row and "img_per_s" in torch_row:
        result["ratio"] = jax_row["img_per_s"] / torch_row["img_per_s"]
    result["seconds"] = time.perf_counter() - t0
    result["summary"] = summary_lines(result)
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, small batches (CPU path)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="candidate batch sizes")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 50; smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5; smoke 1)")
    p.add_argument("--frameworks", nargs="+", choices=("jax", "torch"), default=["jax", "torch"])
    p.add_argument("--framework", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--attention", default="", help=argparse.SUPPRESS)
    p.add_argument(
        "--jax_attention",
        nargs="+",
        default=None,
        help="model.attention_impl values to run JAX with, each in its own process "
        "('xla' = XLA's choice, the default; 'cudnn' = fused, padded to 64 tokens)",
    )
    p.add_argument(
        "--no_probe",
        dest="probe",
        action="store_false",
        help="JAX: try the candidates from the largest down without the memory probe compile",
    )
    p.add_argument("--peak_tflops", type=float, default=None, help="override the peak table")
    p.add_argument(
        "--timeout", type=int, default=0, help="seconds per framework (0: jax 180, torch 100)"
    )
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.batches is None:
        args.batches = list(SMOKE_BATCHES if args.smoke else DEFAULT_BATCHES)
    if args.jax_attention is None:
        args.jax_attention = ["xla"]
    args.jax_attention = ["" if a == "xla" else a for a in args.jax_attention]
    if args.steps is None:
        args.steps = 3 if args.smoke else 50
    if args.warmup is None:
        args.warmup = 1 if args.smoke else 5
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.framework:  # inside a subprocess
        result = run_jax(args) if args.framework == "jax" else run_torch(args)
    else:
        result = run(args)
        print("\n".join(result["summary"]))
    return emit(result, args.out, show=args.out is None and args.framework is None)


if __name__ == "__main__":
    main()
