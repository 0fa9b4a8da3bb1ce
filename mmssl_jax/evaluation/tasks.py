"""How evaluation tasks share the machine: worker threads, and who may run beside whom.

`runner.run_evals` submits each evaluation, and each of its baselines, as a task to `pool()`:
`eval_workers()` threads, or inline for one. Tasks of evaluators that declare
`CONCURRENT = True` run side by side (their device calls take the device one at a time,
encoder.DEVICE_LOCK); any other task runs alone (`serial_unless`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from types import ModuleType


def eval_workers() -> int:
    """Evaluation tasks run at once: MMSSL_EVAL_WORKERS, else 2 on a machine of 2 or more
    cores, 1 when several JAX processes evaluate (each must issue its encoders' device calls
    in the same order as the others).

    Two workers keep both cores of a small machine busy: the encoders' device calls (one at
    a time, see encoder.DEVICE_LOCK) overlap another task's scikit-learn fit, and the fits of
    the trained encoder and its baselines overlap each other.
    """
    env = os.environ.get("MMSSL_EVAL_WORKERS")
    if env:
        return max(1, int(env))
    try:
        import jax

        if jax.process_count() > 1:
            return 1
    except Exception:  # noqa: BLE001 - no JAX backend: a plain single process
        pass
    return 2 if (os.cpu_count() or 1) >= 2 else 1


class _Inline:
    """The executor of one worker: runs each task when it is submitted, in this thread."""

    def submit(self, fn, *args) -> futures.Future:
        future: futures.Future = futures.Future()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the caller by result()
            future.set_exception(e)
        return future

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc) -> None:
        return None


@contextlib.contextmanager
def pool(workers: int) -> Iterator:
    """A thread pool of `workers` (inline for one); on an error, tasks not yet started are
    cancelled rather than run."""
    if workers <= 1:
        yield _Inline()
        return
    pool = futures.ThreadPoolExecutor(workers, thread_name_prefix="eval")
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


class _SharedOrAlone:
    """A readers-writer lock: tasks of CONCURRENT evaluators share it, any other task holds
    it alone (no other task runs meanwhile)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._alone = False

    @contextlib.contextmanager
    def hold(self, alone: bool) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._alone and not (alone and self._shared))
            if alone:
                self._alone = True
            else:
                self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                if alone:
                    self._alone = False
                else:
                    self._shared -= 1
                self._cond.notify_all()


TASKS = _SharedOrAlone()


def serial_unless(module: ModuleType, fn: Callable, *args):
    """fn(*args), beside other tasks if the evaluator declares `CONCURRENT = True` (its
    device work goes through call.features / call.texts, which take the device per call),
    else alone: fine-tuning, and evaluators of users that do not say, may train or call JAX
    in ways the runner cannot see."""
    with TASKS.hold(alone=not getattr(module, "CONCURRENT", False)):
        return fn(*args)
