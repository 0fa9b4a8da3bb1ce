"""The command line checks the whole config before touching the workdir, and a workdir
does not depend on the folder it was trained from (paths pinned, tokenizer copied)."""

from __future__ import annotations

import os
import subprocess
import sys

from configs.tiny_slip import get_config
from mmssl_jax.training.trainer import pin_paths
from tests.conftest import ROOT


def test_unknown_image_encoder_fails_before_the_workdir_is_written(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmssl_jax.main",
            "--config=configs/tiny_slip.py",
            f"--workdir={workdir}",
            "--config.model.image_encoder=vit_tinyy",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "model.image_encoder='vit_tinyy' is not an image encoder" in proc.stderr
    assert "vit_tiny" in proc.stderr  # the valid names
    assert not workdir.exists()


def test_pinned_paths_and_the_workdir_tokenizer(embedded_data, tmp_path, monkeypatch):
    monkeypatch.chdir(embedded_data.parent)
    config = get_config(f"data={embedded_data.name}")  # relative to the current folder
    workdir = tmp_path / "run"
    workdir.mkdir()
    pin_paths(config, str(workdir))
    assert config.data.tokenizer == str(workdir / "tokenizer.model")
    assert (workdir / "tokenizer.model").read_bytes() == (
        embedded_data / "tokenizer" / "spm.model"
    ).read_bytes()
    assert os.path.isabs(config.data.sources.emoji.shards)
    assert all(os.path.isabs(e.get("shards") or e.train_shards) for e in config.evals.values())
    # From another folder, with the data gone from where it was: the workdir's copy serves.
    monkeypatch.chdir(tmp_path)
    again = get_config("data=/nonexistent")
    pin_paths(again, str(workdir))
    assert again.data.tokenizer == str(workdir / "tokenizer.model")
