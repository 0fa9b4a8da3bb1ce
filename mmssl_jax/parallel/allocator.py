"""The process's memory allocator: run under tcmalloc when the system has it.

XLA:CPU gives each execution of a compiled step its buffers afresh. With glibc's malloc,
buffers above its mmap threshold (32 MiB at most) are mapped for each step and unmapped after
it, so every step page-faults its working set in again: ViT-S/16 SLIP at batch 8 spent 1.8 s
of its 6.7 s CPU step in the kernel, one million minor faults per step. tcmalloc keeps freed
pages for reuse (0 faults, 5.2 s per step; `python tools/benchmarks/train.py --cases
vits_slip` with and without `LD_PRELOAD`). The allocator cannot be swapped inside a running
process, so `use_tcmalloc()` re-executes the command once with tcmalloc in `LD_PRELOAD`, as
TensorFlow's and PyTorch's CPU performance guides advise doing by hand.

A command that cannot re-execute itself (pytest has redirected its output by the time a
conftest runs) takes the library from `python -m mmssl_jax.parallel.allocator`, which prints
its path (nothing when absent or opted out): `LD_PRELOAD=$(python -m
mmssl_jax.parallel.allocator) CMD`. `MMSSL_JAX_ALLOCATOR=system` keeps the C library's
allocator, for the re-execution and for that printed path alike. tcmalloc comes from the Debian
package `libtcmalloc-minimal4` (tools/install.sh installs it); without it nothing changes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

ENV = "MMSSL_JAX_ALLOCATOR"
LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
SEARCH_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)


def find_tcmalloc(dirs: Sequence[str] = SEARCH_DIRS) -> str | None:
    """The path of a tcmalloc shared library in `dirs`, or None."""
    for directory in dirs:
        for name in LIBRARIES:
            path = os.path.join(directory, name)
            if os.path.exists(path):
                return path
    return None


def loaded() -> str:
    """Which allocator this process runs: "tcmalloc", "jemalloc" or "system"."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            maps = f.read()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "system"


def wanted() -> str | None:
    """The tcmalloc library a command should preload: None when `MMSSL_JAX_ALLOCATOR=system`
    or none is installed."""
    if os.environ.get(ENV, "tcmalloc") == "system":
        return None
    return find_tcmalloc()


def preload_env(env: dict[str, str]) -> dict[str, str]:
    """A copy of `env` with the wanted tcmalloc first in `LD_PRELOAD` (unchanged if none)."""
    env = dict(env)
    path = wanted()
    if path:
        env["LD_PRELOAD"] = ":".join(filter(None, [path, env.get("LD_PRELOAD")]))
    return env


def use_tcmalloc() -> None:
    """Re-executes this command under tcmalloc, once, unless it runs under one already,
    `MMSSL_JAX_ALLOCATOR=system` says not to, or no tcmalloc is installed. Returns (without
    re-executing) in every case but the re-execution."""
    if loaded() != "system" or os.environ.get(f"{ENV}_REEXEC"):  # REEXEC: do not loop
        return
    if wanted() is None or not sys.orig_argv:
        return
    env = preload_env(os.environ)
    env[f"{ENV}_REEXEC"] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


if __name__ == "__main__":
    print(wanted() or "")
