"""orbax checkpoints of the train state AND the grain iterator, for exact resume.

Layout: `workdir/checkpoints/<step>/{state, data_iter}`. orbax writes each step to a temporary
directory and renames it on commit, so a crash mid-write never leaves a step that restore
would pick up. Saves are async: training continues while arrays are written, and a write that
fails (disk full, permissions) surfaces at the next save, wait or close as a
`CheckpointWriteError` naming the step, the cause and the last complete checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointMismatchError(ValueError):
    """A checkpoint whose parameter tree does not fit the configured model."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions, ...); earlier ones are intact."""

    def __init__(self, step: int, directory: str, latest: int | None, cause: BaseException):
        kept = (
            f"The latest complete checkpoint, step {latest}, is intact: free space (or fix the "
            "directory) and rerun the same command to resume from it."
            if latest is not None
            else "There is no complete checkpoint yet."
        )
        super().__init__(
            f"checkpoint step {step} could not be written to {directory}: "
            f"{type(cause).__name__}: {cause}. {kept}"
        )
        self.step, self.directory, self.latest = step, directory, latest


class Checkpointer:
    """Keeps the last `keep` checkpoints plus the best one by `best_metric` (if given)."""

    def __init__(
        self,
        workdir: str,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
    ):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        policies = [ocp.checkpoint_managers.LatestN(keep)]
        if best_metric:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=lambda m: m[best_metric],
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._writing: int | None = None  # step of the save that may still be in flight
        self._failed = False  # a write error was already raised to the caller

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        state: Any,
        data_iter: grain.DatasetIterator | None,
        metrics: dict | None = None,
        force: bool = False,
    ) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        saved = self._reporting_write_errors(
            lambda: self.manager.save(
                step, args=ocp.args.Composite(**items), metrics=metrics, force=force
            ),
            step,
        )
        if saved:
            self._writing = step
        return saved

    def restore(
        self, abstract_state: Any, data_iter: grain.DatasetIterator | None, step: int | None = None
    ) -> Any:
        """Restores `step` (default latest) onto the shardings of `abstract_state`."""
        step = self.latest_step() if step is None else step
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError) as e:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not match the configured model: "
                f"{first_mismatch(self.manager, step, abstract_state) or e}"
            ) from e
        return restored.state

    def wait(self) -> None:
        self._reporting_write_errors(self.manager.wait_until_finished)
        self._writing = None

    def close(self) -> None:
        """Waits for the last save and releases the manager. A write error already raised
        (e.g. while the caller unwinds from it) is not raised a second time."""
        reported = self._failed
        try:
            self.wait()
        except Exception as e:
            if not reported:
                raise
            logging.warning("checkpoint manager after the reported write error: %s", e)
        finally:
            try:
                self.manager.close()
            except Exception as e:
                if not self._failed:
                    raise
                logging.warning("closing the checkpoint manager after a write error: %s", e)

    def _reporting_write_errors(self, fn: Any, step: int | None = None) -> Any:
        """Runs `fn`; an error of an async write (or of this one) becomes a
        CheckpointWriteError naming the failed step and the latest complete checkpoint."""
        try:
            return fn()
        except (OSError, ValueError, RuntimeError) as e:
            if self._failed:
                raise
            failed = self._writing if self._writing is not None else step
            self._writing, self._failed = None, True
            steps = ocp.utils.checkpoint_steps(self.directory)  # committed ones only
            latest = max((s for s in steps if s != failed), default=None)
            raise CheckpointWriteError(failed, self.directory, latest, e) from e


def first_mismatch(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> str:
    """Names the first parameter whose path or shape differs between checkpoint and model."""
    try:
        stored = manager.item_metadata(step)["state"]
    except Exception:  # metadata unavailable: fall back to orbax's own message
        return ""
    stored_leaves = dict(_flat(stored))
    for path, leaf in _flat(abstract_state):
        if path not in stored_leaves:
            return f"parameter {path} is missing from the checkpoint"
        shape = tuple(getattr(stored_leaves[path], "shape", ()))
        if shape != tuple(leaf.shape):
            return f"parameter {path}: checkpoint shape {shape} vs model shape {leaf.shape}"
    extra = sorted(set(stored_leaves) - {p for p, _ in _flat(abstract_state)})
    return f"checkpoint has parameter {extra[0]} the model lacks" if extra else ""


def _flat(tree: Any) -> list[tuple[str, Any]]:
    return [
        ("/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


class PreemptionHandler:
    """Turns SIGTERM/SIGINT into a flag the loop polls: save a checkpoint, then exit 0."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._previous: dict[int, Any] = {}

    def install(self) -> PreemptionHandler:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        logging.warning("received signal %d: checkpointing and exiting", signum)
        if self.requested.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.requested.set()

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
