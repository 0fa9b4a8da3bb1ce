"""Issue 9, item 6: a bad config or a bad checkpoint/export stops the run with a message that
says what is wrong and where: an unknown key (with the nearest valid keys), a value of the
wrong type, a batch that does not split over the devices, a checkpoint of another
architecture (naming the first mismatched parameter), a tampered export file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import pytest

from mmssl_jax import export
from mmssl_jax.training.checkpoint import Checkpointer, CheckpointMismatchError
from mmssl_jax.training.trainer import Trainer
from tests.faults import fault_config

ROOT = Path(__file__).resolve().parents[2]


def _main(*flags: str) -> subprocess.CompletedProcess:
    """`python -m mmssl_jax.main` on the fault config with extra flags."""
    cmd = [
        sys.executable,
        "-m",
        "mmssl_jax.main",
        f"--config={Path(__file__).with_name('fault_config.py')}",
        "--workdir=/nonexistent/never-created",
        *flags,
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_unknown_key_names_the_nearest_keys():
    run = _main("--config.train.batch_sise=16")
    assert run.returncode != 0
    assert "unknown config key 'train.batch_sise'. Did you mean: train.batch_size" in run.stderr


@pytest.mark.parametrize(
    "flag,reason",
    [
        ("--config.train.batch_size=abc", "invalid literal for int() with base 10: 'abc'"),
        ("--config.optim.lr=fast", "could not convert string to float: 'fast'"),
    ],
)
def test_wrong_type_names_the_flag(flag, reason):
    run = _main(flag)
    assert run.returncode != 0
    assert f"flag {flag}: {reason}" in run.stderr


def test_batch_not_divisible_by_devices(embedded_data, tmp_path):
    devices = jax.device_count()
    assert devices > 1  # tests/conftest.py emulates 8
    config = fault_config.get_config(f"data={embedded_data}")
    config.train.num_devices = devices
    config.train.batch_size = 2 * devices + 1
    with pytest.raises(ValueError) as info:
        Trainer(config, str(tmp_path))
    assert f"global batch size {2 * devices + 1} is not divisible by the {devices} devices" in (
        str(info.value)
    )
    assert f"use a multiple of {devices} (e.g. {2 * devices} or {3 * devices})" in str(info.value)


def _first_difference(a, b) -> tuple[str, tuple, tuple]:
    """Independent of checkpoint.first_mismatch: the first leaf (in tree order) whose
    shape differs between two abstract states of the same tree structure."""
    leaves_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(a)[0]:
        if tuple(leaves_b[path].shape) != tuple(leaf.shape):
            name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            return name, tuple(leaves_b[path].shape), tuple(leaf.shape)
    raise AssertionError("the two models have the same shapes")


@pytest.fixture(scope="module")
def saved(embedded_data, tmp_path_factory):
    """A workdir with a checkpoint of the fault config's model (fresh parameters)."""
    workdir = tmp_path_factory.mktemp("saved")
    trainer = Trainer(fault_config.get_config(f"data={embedded_data}"), str(workdir))
    state = trainer._init(trainer.config.seed)
    ckpt = Checkpointer(str(workdir))
    ckpt.save(1, state, trainer.data_iter, force=True)
    ckpt.close()
    return {"workdir": workdir, "trainer": trainer, "state": state}


def test_checkpoint_of_another_architecture(saved, embedded_data):
    config = fault_config.get_config(f"data={embedded_data}")
    config.model.embed_dim //= 2  # same towers, narrower projections
    other = Trainer(config, str(saved["workdir"]))
    name, stored, wanted = _first_difference(other.abstract_state(), saved["trainer"].state_shape)
    with pytest.raises(CheckpointMismatchError) as info:
        other.run()
    message = str(info.value)
    assert f"checkpoint {saved['workdir']}/checkpoints/1 does not match the configured model" in (
        message
    )
    assert f"parameter {name}: checkpoint shape {stored} vs model shape {wanted}" in message


def test_tampered_export_file_is_named(saved, tmp_path):
    trainer = saved["trainer"]
    out = export.write_export(
        str(tmp_path / "export"),
        model_cfg=trainer.model_cfg.to_dict(),
        variables={"params": jax.device_get(saved["state"].params)},
        preprocess=export.preprocess_spec(trainer.config.data.image_size),
        text_length=trainer.config.data.text_length,
        stablehlo=False,
    )
    export.load_pretrained(out)  # intact: loads
    params = Path(out) / export.PARAMS
    data = bytearray(params.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    params.write_bytes(bytes(data))
    with pytest.raises(export.ExportError) as info:
        export.load_pretrained(out)
    assert f"{params}: sha256 " in str(info.value)
    assert "differs from the manifest's" in str(info.value) and "modified" in str(info.value)
