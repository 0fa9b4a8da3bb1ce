"""Runs the benchmarks and gathers them into one JSON document and a Markdown summary.

    python tools/benchmark.py all --out results.json          # input, loss, train
    python tools/benchmark.py train --out train.json -- --cases tiny_slip
    python tools/benchmark.py all --quick --out quick.json     # small settings, minutes
    python tools/benchmark.py gpu --out gpu.json               # the one-GPU check
    python tools/benchmark.py text_cache --out tc.json         # the locked text tower's cache

Each benchmark is `tools/benchmarks/<name>.py` (`parse_args(argv)`, `run(args) -> dict`,
`main()`), run here as its own subprocess: each needs its own JAX start-up (the loss
benchmark emulates 8 CPU devices, the train benchmark pins itself to one core, the GPU check
gives each framework the whole device), and a crash in one is recorded without losing the
others. Arguments after `--` go to every selected benchmark; `--args NAME="..."` to one.
The document holds the machine description, the commit, each benchmark's JSON (or its
error) and the Markdown summary, which is also written next to it (`.md`) and printed.
Each runs under tcmalloc when installed, as the main command does (`MMSSL_JAX_ALLOCATOR=system`:
glibc's malloc); `machine.allocator` records which.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: make mmssl_jax importable from the checkout
    sys.path.insert(0, ROOT)

from mmssl_jax.parallel import allocator  # noqa: E402

BENCHMARKS = ("input", "loss", "train", "text_cache", "gpu")
ALL = ("input", "loss", "train")  # `gpu` only when asked for (or --with_gpu)

# --quick: small settings that finish in minutes on a 2-core machine.
QUICK_ARGS: dict[str, list[str]] = {
    "input": ["--num_images", "60", "--rounds", "1"],
    "loss": ["--batches", "4096", "16384", "--time_max", "4096", "--naive_time_max", "4096"],
    "train": ["--cases", "tiny_slip", "--batch", "tiny_slip=32", "--rounds", "2"],
    "text_cache": ["--batches", "40", "--rounds", "1"],
    "gpu": ["--smoke"],
}


# ----------------------------------------------------------------------------------------
# Machine description


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _command(cmd: Sequence[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine() -> dict[str, Any]:
    """CPU model and cores, memory, GPUs, OS, Python and library versions, load."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            info["cpu"] = line.split(":", 1)[1].strip()
            break
    else:
        info["cpu"] = platform.processor() or platform.machine()
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal"):
            info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    gpus = _command(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    )
    info["gpus"] = gpus.splitlines() if gpus else []
    versions = {}
    for module in ("jax", "jaxlib", "flax", "optax", "torch", "numpy", "PIL", "grain"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # not installed, or no __version__
            versions[module] = None
    info["versions"] = versions
    info["allocator"] = allocator.wanted() or "system"
    return info


# ----------------------------------------------------------------------------------------
# Running


def run_one(name: str, extra: Sequence[str], log_dir: str, timeout: int | None) -> dict:
    """`tools/benchmarks/<name>.py --out ... extra` in a subprocess; its JSON or an error."""
    out = os.path.join(log_dir, f"{name}.json")
    log = os.path.join(log_dir, f"{name}.log")
    script = os.path.join(ROOT, "tools", "benchmarks", f"{name}.py")
    cmd = [sys.executable, script, *extra, "--out", out]
    # The allocator the main command runs under (mmssl_jax.parallel.allocator), shared by both
    # frameworks of a benchmark; MMSSL_JAX_ALLOCATOR=system measures glibc's.
    env = allocator.preload_env(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    print(f"[benchmark] {name}: {shlex.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "log": _tail(log)}
    seconds = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0 or not os.path.exists(out):
        return {"error": f"exit status {proc.returncode}", "seconds": seconds, "log": _tail(log)}
    with open(out) as f:
        result = json.load(f)
    result.setdefault("wall_seconds", seconds)
    result["command"] = shlex.join(["python", os.path.relpath(script, ROOT), *extra])
    return result


def _tail(path: str, chars: int = 3000) -> str:
    return _read(path)[-chars:]


# ----------------------------------------------------------------------------------------
# Markdown


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    if x is None:
        return "-"
    return str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def _md_train(r: dict) -> list[str]:
    rows = []
    for case in r.get("cases", {}).values():
        rows.append(
            [
                case["case"],
                case["batch"],
                case.get("clock"),
                case["jax"]["step_s"],
                case["jax"]["img_per_s"],
                case["torch"]["step_s"],
                case["torch"]["img_per_s"],
                f"{case['ratio']:.2f}x",
            ]
        )
    header = ["case", "batch", "clock", "JAX s/step", "JAX img/s", "torch s/step"]
    lines = _table([*header, "torch img/s", "ratio"], rows)
    lines.append(f"\nThreads: {r.get('threads')}; JAX {r.get('jax')}, torch {r.get('torch')}.")
    for case in r.get("cases", {}).values():
        lines += [f"- {note}" for note in case.get("notes", [])[1:]]
    return lines


def _md_input(r: dict) -> list[str]:
    rates = r.get("samples_per_cpu_s", {})
    rows = [[k, v] for k, v in rates.items()]
    lines = _table(["pipeline", "samples / CPU s"], rows)
    keys = (
        "speedup_vs_slip_per_view_decode",
        "speedup_vs_slip_decode_once",
        "pillow_path_speedup_vs_slip_per_view_decode",
        "speedup_vs_ours_pillow",
        "fraction_of_decode_ceiling",
    )
    for key in keys:
        if key in r:
            lines.append(f"- {key}: {r[key]:.2f}x")
    if "resampler" in r:
        lines.append(f"- resampler: {r['resampler']}; draft scales used: {r.get('draft_scales')}")
    return lines


def _md_loss(r: dict) -> list[str]:
    rows = [
        [x.get("variant"), x.get("global_batch"), x.get("temp_gib"), x.get("step_s")]
        for x in r.get("results", [])
    ]
    lines = _table(["variant", "global batch", "temp GiB / device", "s / step"], rows)
    for key in ("largest_batch", "budget_gib", "within_budget_at_largest_batch"):
        if key in r:
            lines.append(f"- {key}: {r[key]}")
    return lines


def _md_gpu(r: dict) -> list[str]:
    return [f"    {line}" for line in r.get("summary", [])]


def _md_text_cache(r: dict) -> list[str]:
    rows = [
        [
            name,
            x.get("seconds"),
            x.get("cpu_use"),
            x.get("tower_calls"),
            x.get("token_rows_run"),
            x.get("speedup_vs_fixed_32_one_device"),
        ]
        for name, x in r.get("results", {}).items()
    ]
    header = ["variant", "s", "CPU use", "tower calls", "token positions run", "speed-up"]
    lines = _table(header, rows)
    lines.append(
        f"- {r.get('batches')} batches of {r.get('batch_size')} rows, {r.get('context_length')}"
        f" tokens (mean {r.get('mean_tokens_per_row')} used), {r.get('devices')} devices"
    )
    return lines


RENDER = {
    "train": _md_train,
    "input": _md_input,
    "loss": _md_loss,
    "text_cache": _md_text_cache,
    "gpu": _md_gpu,
}


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        f"# Benchmarks ({doc['started']})",
        "",
        f"Machine: {m.get('cpu')} ({m.get('usable_cores')} usable cores of {m.get('cpu_count')}), "
        f"{m.get('memory_gib')} GiB RAM, GPUs: {', '.join(m.get('gpus') or []) or 'none'}; "
        f"{m.get('platform')}; load average at start {m.get('load_average')}.",
        f"Commit: {doc.get('commit')}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v),
    ]
    for name, result in doc["benchmarks"].items():
        lines += ["", f"## {name}", ""]
        if "error" in result:
            lines.append(f"FAILED: {result['error']}")
            continue
        if result.get("command"):
            lines += [f"`{result['command']}`", ""]
        try:
            lines += RENDER.get(name, lambda r: [])(result)
        except (KeyError, TypeError) as e:  # a benchmark changed its format
            lines.append(f"(no summary: {e!r}; see the JSON)")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("which", choices=(*BENCHMARKS, "all"))
    p.add_argument("--out", default="benchmark_results.json", help="the JSON document")
    p.add_argument("--md", help="the Markdown summary (default: --out with .md)")
    p.add_argument("--quick", action="store_true", help="small settings (see QUICK_ARGS)")
    p.add_argument("--with_gpu", action="store_true", help="`all` also runs the GPU check")
    p.add_argument(
        "--args",
        action="append",
        default=[],
        metavar='NAME="ARGS"',
        help='arguments for one benchmark, e.g. --args train="--cases vits_slip"',
    )
    p.add_argument("--timeout", type=int, default=None, help="seconds per benchmark")
    return p.parse_args(argv), extra


def main(argv: Sequence[str] | None = None) -> dict:
    args, extra = parse_args(argv)
    names = list(ALL) + (["gpu"] if args.with_gpu else []) if args.which == "all" else [args.which]
    per_bench: dict[str, list[str]] = {}
    for item in args.args:
        name, _, value = item.partition("=")
        if name not in BENCHMARKS:
            raise SystemExit(f"--args: unknown benchmark {name!r}; valid: {BENCHMARKS}")
        per_bench.setdefault(name, []).extend(shlex.split(value))
    doc: dict[str, Any] = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "commit": _command(["git", "rev-parse", "--short", "HEAD"]),
        "benchmarks": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            bench_args = (QUICK_ARGS.get(name, []) if args.quick else []) + per_bench.get(name, [])
            doc["benchmarks"][name] = run_one(name, bench_args + extra, tmp, args.timeout)
    doc["summary_markdown"] = markdown(doc)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    md_path = args.md or os.path.splitext(args.out)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(doc["summary_markdown"])
    print(doc["summary_markdown"])
    print(f"wrote {args.out} and {md_path}", file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
