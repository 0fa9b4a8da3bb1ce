"""Issue 9, item 4: the disk fills up while a checkpoint is written. The run stops with a
message naming the step, the cause and the last complete checkpoint; that checkpoint stays
valid, and once space is freed the same command resumes from it and finishes.

The checkpoint directory is a small tmpfs (as root, where `mount` is allowed). Elsewhere
(an unprivileged CI runner) the process gets a file-size limit (RLIMIT_FSIZE) instead: the
write then fails with EFBIG rather than ENOSPC, through the same code path.

The run reports `PytestUnraisableExceptionWarning: ... RuntimeError: Event loop is closed`.
Its cause is inside orbax (0.12.8), not our Checkpointer, which waits for and closes the
manager on the error path: orbax serialises the arrays with `asyncio.gather` over many
tensorstore writes in a fresh event loop (`asyncio_utils._run_sync_via_new_loop`); the first
failed write ends the gather, and the loop is closed while the other writes are still
pending, not cancelled or awaited. When tensorstore completes them, its callback calls
`call_soon_threadsafe` on the closed loop from C, which Python reports as unraisable. A plain
`ocp.CheckpointManager` save onto a full disk shows the same, async or not. It is left
visible on purpose (not filtered): it goes once orbax awaits the pending writes.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

from mmssl_jax.training.checkpoint import Checkpointer, CheckpointWriteError
from mmssl_jax.training.trainer import Trainer
from tests.faults import fault_config

# Room for keep_ckpts (3) checkpoints of the tiny model (~21 MB each) plus one being written.
TMPFS_SIZE = "160m"


def _try_mount(directory: Path) -> bool:
    if os.geteuid() != 0:
        return False
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(directory)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def _files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()]


@contextlib.contextmanager
def _full_disk(checkpoints: Path, mounted: bool, need: int):
    """Leaves less than `need` bytes for the next checkpoint until the block exits."""
    if mounted:
        stat = os.statvfs(checkpoints)
        filler = checkpoints / "filler.bin"  # not a step directory: orbax ignores it
        filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - need // 2))
        try:
            yield "No space left on device"
        finally:
            filler.unlink()
    else:
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (need // 2, hard))
        try:
            yield "File too large"
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_disk_full_during_checkpoint_write(embedded_data, tmp_path):
    config = fault_config.get_config(f"data={embedded_data}")
    first, second = fault_config.CKPT_EVERY, 2 * fault_config.CKPT_EVERY
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    mounted = _try_mount(checkpoints)
    try:
        Trainer(config, str(tmp_path)).run(stop_at=first)
        written = _files(checkpoints / str(first))
        # tmpfs: free space below half a checkpoint; rlimit: below half its largest file.
        need = (
            sum(p.stat().st_size for p in written)
            if mounted
            else max(p.stat().st_size for p in written)
        )
        trainer = Trainer(config, str(tmp_path))
        with (
            _full_disk(checkpoints, mounted, need) as cause,
            pytest.raises(CheckpointWriteError) as info,
        ):
            trainer.run()
        message = str(info.value)
        assert f"checkpoint step {second} could not be written to {checkpoints}" in message
        assert cause in message
        assert f"latest complete checkpoint, step {first}, is intact" in message

        # The previous checkpoint is valid: published, restorable, finite.
        ckpt = Checkpointer(str(tmp_path))
        assert ckpt.latest_step() == first
        restored = ckpt.restore(trainer.abstract_state(), None)
        ckpt.close()
        assert int(restored.step) == first
        assert jax.tree.all(jax.tree.map(lambda x: np.isfinite(x).all(), restored.params))

        # With space again, the same run resumes from it and finishes.
        Trainer(config, str(tmp_path)).run()
        names = sorted(p.name for p in checkpoints.iterdir())
        assert str(fault_config.TOTAL_STEPS) in names
        assert not [n for n in names if "tmp" in n]
    finally:
        if mounted:
            subprocess.run(["umount", str(checkpoints)], check=True)
