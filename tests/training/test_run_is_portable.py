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


def test_real_recipes_tokenize_as_clip_with_the_packaged_bpe():
    from configs.slip_vits import get_config as slip_vits
    from mmssl_jax.models.registry import build_model
    from mmssl_jax.models.saved import check_bpe_model
    from mmssl_jax.training.state import open_tokenizer, resolve_model_config

    config = slip_vits()
    assert config.data.tokenizer == "clip_bpe" and config.data.text_length == 77
    tokenizer = open_tokenizer(config)
    assert tokenizer.vocab_size == 49408
    ids = tokenizer.encode(["a photo of a cat."], 77)[0]
    assert ids[0] == 49406 and 49407 in ids  # SOT ... EOT, as CLIP
    model = build_model(resolve_model_config(config, tokenizer))
    check_bpe_model(model, tokenizer, "slip_vits")  # pools at argmax, holds every id


def test_the_headline_command_without_data_names_the_fix(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmssl_jax.main",
            f"--config={ROOT / 'configs' / 'slip_vits.py'}:data={tmp_path / 'nothing'}",
            f"--workdir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"no shard matches '{tmp_path / 'nothing'}/emoji/emoji-train-" in proc.stderr
    assert "python tools/make_shards.py embedded --output_dir data" in proc.stderr
    assert ":data=DIR" in proc.stderr


def test_reading_a_checkpoint_says_nothing_about_read_only(caplog):
    from mmssl_jax.training.checkpoint import Checkpointer

    reader = Checkpointer(str(ROOT / "tests" / "data" / "old_layout" / "workdir"), read_only=True)
    assert reader.latest_step() == 2
    reader.close()
    assert "read only" not in caplog.text
