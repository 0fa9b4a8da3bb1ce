"""Test setup: 8 emulated CPU devices, set before JAX initialises its backend."""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def embedded_data(tmp_path_factory) -> Path:
    """The embedded default data (emoji + a Fashion-MNIST subset + tokenizer), built once."""
    out = tmp_path_factory.mktemp("embedded")
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "make_shards.py"),
            "embedded",
            "--output_dir",
            str(out),
            "--fashion_limit",
            "3000",
        ],
        check=True,
        cwd=ROOT,
    )
    return out
