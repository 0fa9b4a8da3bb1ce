"""Test setup: 8 emulated CPU devices, set before JAX initialises its backend."""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import fcntl  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


CACHE = Path(os.environ.get("MMSSL_TEST_CACHE", Path.home() / ".cache" / "mmssl_jax" / "tests"))


@pytest.fixture(scope="session", autouse=True)
def compilation_cache():
    """A persistent XLA compilation cache: the same train step compiled by several tests (and
    test subprocesses) compiles once. Results are unaffected; only compile time is saved."""
    import jax

    path = CACHE / "xla"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(path)


@pytest.fixture(scope="session")
def embedded_data() -> Path:
    """The embedded default data (emoji + a Fashion-MNIST subset + the first 300 OpenClipArt
    PNGs when it is installed, a logged skip otherwise + tokenizer).

    Built by the real `make_shards.py embedded` command into a cache directory; its manifest
    (hashes of inputs, code and parameters) makes a rebuild a no-op when nothing changed.
    """
    out = CACHE / "embedded"
    CACHE.mkdir(parents=True, exist_ok=True)
    # pytest-xdist workers each run this fixture: one builds, the others wait on the lock and
    # then find the manifest up to date.
    with open(CACHE / "embedded.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _build_embedded(out)
    return out


def _build_embedded(out: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "make_shards.py"),
            "embedded",
            "--output_dir",
            str(out),
            "--fashion_limit",
            "3000",
            "--openclipart_limit",
            "300",
        ],
        check=True,
        cwd=ROOT,
    )
