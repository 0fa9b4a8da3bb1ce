"""Issue 9, items 1 and 2: kill -9 and SIGTERM at chosen points lose nothing.

One uninterrupted reference run, then one chain of runs in a second workdir, each started by
the real entry point (`python -m mmssl_jax.main`, through fault_main.py which injects the
fault) and each resuming from what the one before left behind:

    kill -9 after 3 steps          no checkpoint yet: the next run starts from scratch
    kill -9 inside the commit of   its files are all written but it is not published:
      checkpoint 8                 the next run resumes from 4, never from the half-written 8
    kill -9 after 10 steps         between checkpoints
    kill -9 after 12 steps         checkpoint 12 is being written asynchronously
    SIGTERM after 18 steps         checkpoint 19 written, exit 0 within the deadline
    kill -9 after 21 steps         checkpoint 20 possibly in flight
    no fault                       trains to the end

The chain's final train state (parameters, optimizer, step, RNG) and every logged loss row
equal the reference bitwise: on CPU the step is deterministic, the data iterator is restored
with the state, and with log_every=1 each row is one step, so no interval average spans a
restart.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmssl_jax.training.checkpoint import CHECKSUMS_DIR
from tests.faults import fault_config

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("fault_main.py")
CONFIG = Path(__file__).with_name("fault_config.py")
# A preemptible VM gets 30 s between SIGTERM and the hard stop (GCE spot/preemptible; AWS
# gives 120 s), so a preempted run must have its checkpoint written and exited within it.
SIGTERM_DEADLINE_S = 30.0
SIGTERM_AT = 18
COMMIT = "commit_success.txt"  # what orbax writes into a checkpoint just before publishing it
CHAIN = [
    "kill_at_step=3",
    "kill_in_commit=8",
    "kill_at_step=10",
    "kill_at_step=12",
    f"pause_at_step={SIGTERM_AT}",
    "kill_at_step=21",
    "",
]


def _listing(workdir: Path) -> dict[str, bool]:
    """Entries of workdir/checkpoints -> whether each holds orbax's commit marker (the
    checksum manifests' folder is ours, not a step)."""
    directory = workdir / "checkpoints"
    if not directory.exists():
        return {}
    return {p.name: (p / COMMIT).exists() for p in directory.iterdir() if p.name != CHECKSUMS_DIR}


def _published(listing: dict[str, bool]) -> list[int]:
    return sorted(int(name) for name in listing if name.isdigit())


def _run(workdir: Path, data_root: Path, fault: str) -> dict:
    """One process of the chain; returns what a test needs to judge it."""
    env = dict(os.environ, MMSSL_FAULT=fault, PYTHONPATH=str(ROOT))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    args = [
        sys.executable,
        str(DRIVER),
        f"--config={CONFIG}:data={data_root}",
        f"--workdir={workdir}",
    ]
    paused = workdir / "paused"
    paused.unlink(missing_ok=True)
    before = _listing(workdir)
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    record = {"fault": fault, "before": before, "elapsed": None}
    if fault.startswith("pause_at_step"):
        deadline = time.monotonic() + 300
        while not paused.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert paused.exists(), f"the run never reached step {SIGTERM_AT}"
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=SIGTERM_DEADLINE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
        record["elapsed"] = time.monotonic() - start
    out, err = proc.communicate(timeout=600)
    resumed = re.findall(r"resuming from \S+/checkpoints/(\d+)", err)
    record.update(
        rc=proc.returncode,
        stderr=err,
        stdout=out,
        after=_listing(workdir),
        resumed=int(resumed[0]) if resumed else None,
    )
    return record


@pytest.fixture(scope="module")
def runs(embedded_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("preemption")
    reference = _run(root / "reference", embedded_data, "")
    assert reference["rc"] == 0, reference["stderr"][-3000:]
    chain = [_run(root / "chain", embedded_data, fault) for fault in CHAIN]
    return {"reference": reference, "chain": chain, "root": root}


def _rows(workdir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for timing in ("img_per_s", "step_time", "data_time"):  # wall-clock columns
            row.pop(timing)
    return rows


def _final_state(workdir: Path) -> dict[str, np.ndarray]:
    step = workdir / "checkpoints" / str(fault_config.TOTAL_STEPS) / "state"
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(step)
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def test_each_fault_struck_where_planned(runs):
    """The faults really happened: every faulted process died by SIGKILL (or exited 0 after
    SIGTERM), so the later checks judge interrupted runs, not uninterrupted ones."""
    for run in runs["chain"]:
        expected = 0 if run["fault"].startswith("pause") or not run["fault"] else -signal.SIGKILL
        assert run["rc"] == expected, (run["fault"], run["stderr"][-3000:])
    in_commit = runs["chain"][1]
    assert any(name.startswith("8.") and not done for name, done in in_commit["after"].items())
    assert 8 not in _published(in_commit["after"])


def test_resume_never_picks_up_a_half_written_checkpoint(runs):
    chain = runs["chain"]
    for run in chain:
        for listing in (run["before"], run["after"]):
            # Every published step directory is complete; the rest are orbax temporaries.
            assert all(done for name, done in listing.items() if name.isdigit()), listing
            assert all(".orbax-checkpoint-tmp" in n for n in listing if not n.isdigit())
    for previous, run in zip(chain, chain[1:], strict=False):
        published = _published(previous["after"])
        assert run["resumed"] == (published[-1] if published else None), run["stderr"][-2000:]
    assert chain[2]["resumed"] == 4  # not the 8 killed in its commit
    # Leftover temporaries are removed by the next run; the finished run leaves none.
    assert _published(chain[-1]["after"])[-1] == fault_config.TOTAL_STEPS
    assert all(name.isdigit() for name in chain[-1]["after"])


def test_killed_and_resumed_run_equals_uninterrupted_run(runs):
    reference = _rows(runs["root"] / "reference")
    chain = _rows(runs["root"] / "chain")
    assert [r["step"] for r in reference] == list(range(1, fault_config.TOTAL_STEPS + 1))
    by_step = {r["step"]: r for r in reference}
    # Rows of steps redone after a kill appear twice in the chain's log; each copy must equal
    # the reference, and the last copies form the same curve.
    assert len(chain) > len(reference)
    for row in chain:
        assert row == by_step[row["step"]], row["step"]
    assert {r["step"]: r for r in chain} == by_step

    a, b = _final_state(runs["root"] / "reference"), _final_state(runs["root"] / "chain")
    assert a.keys() == b.keys() and any("params" in k for k in a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_sigterm_writes_a_checkpoint_and_exits_zero_in_time(runs):
    run = runs["chain"][4]
    assert run["rc"] == 0, run["stderr"][-3000:]
    assert run["elapsed"] < SIGTERM_DEADLINE_S
    # The signal arrived before step SIGTERM_AT + 1 ran; the loop finishes that step, then
    # checkpoints it and returns.
    stopped = SIGTERM_AT + 1
    assert f"preempted: checkpoint at step {stopped} written; exiting" in run["stderr"]
    assert _published(run["after"])[-1] == stopped
    assert runs["chain"][5]["resumed"] == stopped
