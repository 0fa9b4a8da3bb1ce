"""orbax checkpoints of the train state AND the grain iterator, for exact resume.

Layout: `workdir/checkpoints/<step>/{state, data_iter}`. orbax writes each step to a temporary
directory and renames it on commit, so a crash mid-write never leaves a step that restore
would pick up. Saves are async: training continues while arrays are written, and a write that
fails (disk full, permissions) surfaces at the next save, wait or close as a
`CheckpointWriteError` naming the step, the cause and the last complete checkpoint.

Integrity: once orbax has committed a step (checked at the next save, wait or close),
`checkpoints/checksums/<step>.json` records the sha256 of every file in it
(mmssl_jax/checksums.py; beside the steps, not inside them, so orbax's step listing and
keep-N cleanup never see it; manifests of deleted steps are removed).
Restore verifies the step first. A file that changed on disk is named in a warning, the step
is moved to `checkpoints/corrupt/<step>` (out of orbax's way, so training can save that step
again) and the newest checkpoint that verifies is restored instead; when none does,
`CheckpointCorruptError`. A step without a manifest (written before checksums existed, or by
a process killed between commit and manifest) restores unverified, with an info line.
"""

from __future__ import annotations

import logging as std_logging
import os
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from mmssl_jax import checksums
from mmssl_jax.pytree import flat_items

CHECKPOINTS_DIR = "checkpoints"  # workdir/checkpoints/<step>
CHECKSUMS_DIR = "checksums"  # checkpoints/checksums/<step>.json
CORRUPT_DIR = "corrupt"  # checkpoints/corrupt/<step>: steps that failed verification


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


class CheckpointCorruptError(RuntimeError):
    """No checkpoint (at or before the requested step) matches its checksum manifest."""


class _DropMessage(std_logging.Filter):
    """Drops log records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)


def checkpoints_dir(workdir: str) -> str:
    """Where a run keeps its checkpoints: `workdir/checkpoints`."""
    return os.path.abspath(os.path.join(workdir, CHECKPOINTS_DIR))


class Checkpointer:
    """Keeps the last `keep` checkpoints plus the best one by `best_metric` (if given).

    `read_only=True` only reads (export, `--mode=eval`, init-from): it never creates,
    cleans up or moves anything, so it cannot disturb a run that is still writing."""

    def __init__(
        self,
        workdir: str,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = checkpoints_dir(workdir)
        self.read_only = read_only
        if read_only:
            if not os.path.isdir(self.directory):
                raise FileNotFoundError(f"no checkpoints in {self.directory}; train first")
            options = ocp.CheckpointManagerOptions(
                read_only=True, save_interval_steps=0, create=False
            )
            # orbax warns "Given directory is read only" about any read-only manager, even of
            # a writable folder: this reader is read-only by choice, so say nothing.
            quiet = _DropMessage("Given directory is read only")
            absl_logger = std_logging.getLogger("absl")
            absl_logger.addFilter(quiet)
            try:
                self.manager = ocp.CheckpointManager(self.directory, options=options)
            finally:
                absl_logger.removeFilter(quiet)
            self._writing, self._failed = None, False
            return
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
        if self._writing is not None:  # orbax would wait for it too; then seal it
            self.wait()
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
        """Restores `step` (default latest) onto the shardings of `abstract_state`.

        The step is verified against its checksum manifest first; a corrupt one is reported,
        moved aside, and the newest older step that verifies is restored instead (see the
        module docstring).
        """
        step = self.latest_step() if step is None else step
        if step is not None and step in self.manager.all_steps():
            step = self._verified_step(step)
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

    def restore_partial(self, item: Any, step: int | None = None) -> tuple[Any, int]:
        """(the subtree `item` of the saved state, step): an orbax partial restore onto the
        shardings of `item`'s ShapeDtypeStructs (e.g. only the model variables, never the
        optimizer state), of `step` (default latest), verified like `restore`."""
        steps = list(self.manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {self.directory}; train first")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise ValueError(
                f"no checkpoint for step {step} in {self.directory}; have {sorted(steps)}"
            )
        step = self._verified_step(step)
        restore = ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        )
        restored = self.manager.restore(step, args=ocp.args.Composite(state=restore))
        return restored.state, int(step)

    def wait(self) -> None:
        """Waits for the save in flight; once it is committed, writes its checksum manifest."""
        self._reporting_write_errors(self.manager.wait_until_finished)
        if self._writing is not None:
            self._write_manifest(self._writing)
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
            self._remove_stale_manifests()  # orbax's keep-N deletions are done by now

    # ------------------------------------------------------------------------ checksums

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))  # orbax's default step names

    def _manifest_path(self, step: int) -> str:
        return os.path.join(self.directory, CHECKSUMS_DIR, f"{step}.json")

    def _write_manifest(self, step: int) -> None:
        """Checksums a committed step (primary process only: the files are shared). A failure
        leaves the step restorable, unverified, and is logged rather than raised."""
        if jax.process_index() == 0 and os.path.isdir(self._step_dir(step)):
            try:
                checksums.write_manifest(self._step_dir(step), self._manifest_path(step))
            except OSError as e:
                logging.warning(
                    "checkpoint step %d: could not write its checksum manifest %s (%s); the "
                    "step is complete but will restore unverified",
                    step,
                    self._manifest_path(step),
                    e,
                )
        self._remove_stale_manifests()

    def _remove_stale_manifests(self) -> None:
        """Deletes the manifests of steps orbax no longer has (keep-N cleanup)."""
        folder = os.path.join(self.directory, CHECKSUMS_DIR)
        if jax.process_index() != 0 or not os.path.isdir(folder):
            return
        for name in os.listdir(folder):
            stem = name.removesuffix(".json")
            if stem.isdigit() and not os.path.isdir(self._step_dir(int(stem))):
                os.remove(os.path.join(folder, name))

    def _problem(self, step: int) -> str | None:
        """Why `step` fails verification, or None when it verifies (or has no manifest)."""
        manifest, step_dir = self._manifest_path(step), self._step_dir(step)
        if not os.path.exists(manifest):
            logging.info(
                "checkpoint step %d has no checksum manifest (written before checksums, or "
                "interrupted before it); restoring it unverified",
                step,
            )
            return None
        try:
            bad = checksums.verify_manifest(step_dir, manifest)
        except checksums.ManifestError as e:
            return str(e)
        if not bad:
            return None
        first = os.path.join(step_dir, *bad[0].split("/"))
        what = "is missing" if not os.path.exists(first) else "does not match its sha256"
        more = f" (and {len(bad) - 1} more files)" if len(bad) > 1 else ""
        return f"{first} {what} in {manifest}{more}"

    def _verified_step(self, step: int) -> int:
        """`step` if it verifies, else the newest earlier step that does (corrupt steps are
        moved to checkpoints/corrupt/); CheckpointCorruptError when none does."""
        candidates = sorted((s for s in self.manager.all_steps() if s <= step), reverse=True)
        corrupt: list[tuple[int, str]] = []
        chosen = None
        for candidate in candidates:
            problem = self._problem(candidate)
            if problem is None:
                chosen = candidate
                break
            logging.warning("checkpoint step %d is corrupt: %s", candidate, problem)
            corrupt.append((candidate, problem))
        if chosen is None:
            raise CheckpointCorruptError(
                f"no checkpoint in {self.directory} verifies: "
                + "; ".join(f"step {s}: {p}" for s, p in corrupt)
                + ". Restore the files from a backup, or move the checkpoints away to "
                "start afresh."
            )
        if corrupt and self.read_only:
            logging.warning(
                "restoring checkpoint step %d, the newest one that verifies, instead of "
                "corrupt step(s) %s (left in place: this reader is read-only)",
                chosen,
                ", ".join(str(s) for s, _ in corrupt),
            )
        elif corrupt:
            moved = self._quarantine([s for s, _ in corrupt])
            logging.warning(
                "restoring checkpoint step %d, the newest one that verifies, instead of "
                "corrupt step(s) %s (moved to %s)",
                chosen,
                ", ".join(str(s) for s, _ in corrupt),
                moved,
            )
        return chosen

    def _quarantine(self, steps: list[int]) -> str:
        """Moves corrupt steps (and their manifests) to checkpoints/corrupt/, where orbax
        does not list them: left in place, orbax would skip or refuse saving those steps."""
        folder = os.path.join(self.directory, CORRUPT_DIR)
        if jax.process_index() == 0:
            os.makedirs(folder, exist_ok=True)
            for step in steps:
                target = os.path.join(folder, str(step))
                suffix = 1
                while os.path.exists(target):  # corrupt twice: keep both
                    target = os.path.join(folder, f"{step}.{suffix}")
                    suffix += 1
                os.rename(self._step_dir(step), target)
                if os.path.exists(self._manifest_path(step)):
                    os.rename(self._manifest_path(step), f"{target}.{CHECKSUMS_DIR}.json")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("mmssl_jax.checkpoint.quarantine")
        self.manager.reload()
        return folder

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
    return flat_items(tree)


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
