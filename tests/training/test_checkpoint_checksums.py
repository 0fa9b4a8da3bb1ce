"""mmssl_jax/training/checkpoint.py: checksum manifests of committed steps, verified at restore.

A tiny state (a few random arrays, like a model's params and an optimizer count) is saved
with the real Checkpointer and orbax; no training, so each test takes seconds.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmssl_jax.training.checkpoint import CheckpointCorruptError, Checkpointer


def _state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "kernel": jnp.asarray(rng.standard_normal((128, 256)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(256), jnp.float32),
        },
        "step": jnp.asarray(seed, jnp.int32),
    }


def _abstract(state: dict) -> dict:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def _save(workdir, steps, keep: int = 3) -> None:
    ckpt = Checkpointer(str(workdir), keep=keep)
    for step in steps:
        ckpt.save(step, _state(step), None)
    ckpt.close()


def _assert_equal(a: dict, b: dict) -> None:
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _flip_largest_file(step_dir) -> str:
    files = [os.path.join(r, n) for r, _, names in os.walk(step_dir) for n in names]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))
    return path


def test_flipped_byte_names_the_file_and_falls_back_to_the_older_step(tmp_path, caplog):
    """A flipped byte in the newest checkpoint used to be loaded silently."""
    _save(tmp_path, [1, 2])
    checkpoints = tmp_path / "checkpoints"
    assert sorted(os.listdir(checkpoints / "checksums")) == ["1.json", "2.json"]
    flipped = _flip_largest_file(checkpoints / "2")

    ckpt = Checkpointer(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        restored = ckpt.restore(_abstract(_state(0)), None)
    _assert_equal(restored, _state(1))
    assert f"checkpoint step 2 is corrupt: {flipped} does not match its sha256" in caplog.text
    assert "restoring checkpoint step 1, the newest one that verifies" in caplog.text
    # The corrupt step is kept for inspection but out of orbax's listing, so the resumed
    # run can save step 2 again (orbax skips or refuses steps at or below its latest).
    assert ckpt.latest_step() == 1
    assert os.path.isdir(checkpoints / "corrupt" / "2")
    assert os.path.isfile(checkpoints / "corrupt" / "2.checksums.json")
    ckpt.save(2, _state(22), None)
    ckpt.close()
    ckpt = Checkpointer(str(tmp_path))
    _assert_equal(ckpt.restore(_abstract(_state(0)), None), _state(22))
    ckpt.close()


def test_unflipped_checkpoints_restore_and_keep_n_removes_their_manifests(tmp_path, caplog):
    _save(tmp_path, [1, 2, 3, 4], keep=2)
    checkpoints = tmp_path / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["3", "4", "checksums"]
    assert sorted(os.listdir(checkpoints / "checksums")) == ["3.json", "4.json"]
    ckpt = Checkpointer(str(tmp_path), keep=2)
    assert ckpt.manager.all_steps() == [3, 4]  # orbax's listing ignores checksums/
    with caplog.at_level(logging.INFO):
        _assert_equal(ckpt.restore(_abstract(_state(0)), None), _state(4))
        _assert_equal(ckpt.restore(_abstract(_state(0)), None, step=3), _state(3))
    assert "corrupt" not in caplog.text and "unverified" not in caplog.text
    ckpt.close()


def test_checkpoint_without_manifest_restores_with_an_info_line(tmp_path, caplog):
    """Checkpoints written before checksums existed still restore."""
    _save(tmp_path, [5])
    os.remove(tmp_path / "checkpoints" / "checksums" / "5.json")
    ckpt = Checkpointer(str(tmp_path))
    with caplog.at_level(logging.INFO):
        _assert_equal(ckpt.restore(_abstract(_state(0)), None), _state(5))
    lines = [r.getMessage() for r in caplog.records if "checksum manifest" in r.getMessage()]
    assert lines == [
        "checkpoint step 5 has no checksum manifest (written before checksums, "
        "or interrupted before it); restoring it unverified"
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records if "manifest" in r.getMessage())
    ckpt.close()


def test_no_checkpoint_verifies_is_a_clear_error(tmp_path):
    _save(tmp_path, [1, 2])
    checkpoints = tmp_path / "checkpoints"
    first = _flip_largest_file(checkpoints / "1")
    os.remove(_flip_largest_file(checkpoints / "2"))  # a missing file is bad too
    ckpt = Checkpointer(str(tmp_path))
    with pytest.raises(CheckpointCorruptError, match="no checkpoint in .* verifies") as exc:
        ckpt.restore(_abstract(_state(0)), None)
    assert f"step 1: {first} does not match its sha256" in str(exc.value)
    assert "step 2: " in str(exc.value) and "is missing" in str(exc.value)
    assert ckpt.latest_step() == 2  # nothing moved when nothing can be restored
    ckpt.close()
