"""`python tests/faults/fault_main.py FLAGS...` is `python -m mmssl_jax.main FLAGS...` with one
fault injected at a chosen point, named by the environment variable MMSSL_FAULT:

    kill_at_step=K     SIGKILL itself as step K+1 starts: K steps are done and the checkpoint
                       of step K (when K is a multiple of ckpt_every) is still being written
                       asynchronously.
    kill_in_commit=K   SIGKILL inside orbax's commit of checkpoint K: every file is written to
                       the temporary directory, the rename that publishes it has not happened.
    pause_at_step=K    after K steps write WORKDIR/paused and wait (at most 120 s) until a
                       SIGTERM/SIGINT arrives, so the test sends a real signal at a known step.

Nothing else differs from the real entry point: same flags, config, trainer and checkpoints.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAUSE_LIMIT_S = 120.0


def _kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _at_step(step: int, action) -> None:
    """Runs `action(trainer)` when the train step is called on a state at `step`."""
    import jax

    from mmssl_jax.training import trainer as train

    init = train.Trainer.__init__

    def patched_init(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        step_fn = self.train_step

        def train_step(state, batch):
            if int(jax.device_get(state.step)) == step:
                action(self)
            return step_fn(state, batch)

        self.train_step = train_step

    train.Trainer.__init__ = patched_init


def _kill_in_commit(step: int) -> None:
    from orbax.checkpoint._src.path import atomicity

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def patched_finalize(self) -> None:
        if self.get_final().name == str(step):
            _kill()
        await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = patched_finalize


def _pause(step: int) -> None:
    from mmssl_jax.training import checkpoint

    handlers = []
    install = checkpoint.PreemptionHandler.install

    def patched_install(self):
        handlers.append(self)
        return install(self)

    checkpoint.PreemptionHandler.install = patched_install

    def wait_for_signal(trainer) -> None:
        Path(trainer.workdir, "paused").write_text(str(step))
        # Short waits, not one long one: a SIGTERM delivered to another thread only sets
        # CPython's flag, and the handler runs when the main thread next runs Python code.
        deadline = time.monotonic() + PAUSE_LIMIT_S
        while not handlers[-1].requested.wait(0.05) and time.monotonic() < deadline:
            pass

    _at_step(step, wait_for_signal)


def install(fault: str) -> None:
    """Installs the fault `name=step` (see the module docstring); "" installs nothing."""
    if not fault:
        return
    name, _, value = fault.partition("=")
    step = int(value)
    if name == "kill_at_step":
        _at_step(step, lambda trainer: _kill())
    elif name == "kill_in_commit":
        _kill_in_commit(step)
    elif name == "pause_at_step":
        _pause(step)
    else:
        raise ValueError(f"unknown MMSSL_FAULT {fault!r}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    install(os.environ.get("MMSSL_FAULT", ""))
    sys.argv = ["mmssl_jax.main", *sys.argv[1:]]
    runpy.run_module("mmssl_jax.main", run_name="__main__", alter_sys=True)
