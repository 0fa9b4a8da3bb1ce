"""Evaluation tasks on worker threads: the same numbers, baselines and report as one worker;
a task of an evaluator that does not declare itself CONCURRENT runs alone; shared arrays and
features are computed once; overlapping thread limits restore the original only at the end."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from mmssl_jax.evaluation import runner, tasks
from mmssl_jax.evaluation.context import OncePerKey
from mmssl_jax.evaluation.encoder import limit_threads
from tests.evaluation.test_evaluators import FakeEncoder, evals_config, fmnist_shards  # noqa: F401


def _run(root, workdir, workers, monkeypatch):
    monkeypatch.setenv("MMSSL_EVAL_WORKERS", str(workers))
    runner.clear_cache()
    from input_pipeline.pipeline import build_eval_arrays

    train = build_eval_arrays(f"{root}/train-*.tfrecord", image_size=16)
    emb = FakeEncoder(None).image_features(train["image"])["emb"]
    centroids = np.stack([emb[train["label"] == c].mean(0) for c in range(10)])
    metrics = runner.run_evals(
        evals_config(root),
        FakeEncoder(centroids),
        workdir=workdir,
        step=3,
        random_encoder=lambda: FakeEncoder(None, seed=5),
    )
    with open(os.path.join(workdir, "eval", "results_step_3.json")) as f:
        return metrics, json.load(f)


def test_two_workers_give_one_workers_results(fmnist_shards, tmp_path, monkeypatch):  # noqa: F811
    one, one_report = _run(fmnist_shards, str(tmp_path / "one"), 1, monkeypatch)
    two, two_report = _run(fmnist_shards, str(tmp_path / "two"), 2, monkeypatch)
    assert runner.eval_workers() == 2
    assert list(two) == list(one) and two == pytest.approx(one, rel=1e-6)
    assert set(two_report["baselines"]) == set(one_report["baselines"])
    for kind, values in one_report["baselines"].items():
        assert two_report["baselines"][kind] == pytest.approx(values, rel=1e-6), kind
    assert two_report["baselines"]["raw_pixels"] and two_report["baselines"]["random_init"]
    assert two_report["plots"] == one_report["plots"]  # by evaluation, in config order
    names = list(evals_config(fmnist_shards))
    per_eval = [p for p in two_report["plots"] if not p.endswith("_curves.png")]
    owners = [next(n for n in names if os.path.basename(p).startswith(n + "_")) for p in per_eval]
    assert owners == sorted(owners, key=names.index) and len(set(owners)) >= 2


def test_a_task_that_is_not_concurrent_runs_alone():
    lock = tasks._SharedOrAlone()
    active = {"shared": 0, "alone": 0}
    seen = []
    guard = threading.Lock()

    def task(alone: bool):
        with lock.hold(alone):
            with guard:
                active["alone" if alone else "shared"] += 1
                seen.append(dict(active))
            time.sleep(0.02)
            with guard:
                active["alone" if alone else "shared"] -= 1

    threads = [threading.Thread(target=task, args=(i % 3 == 0,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(s["alone"] == 0 or (s["alone"] == 1 and s["shared"] == 0) for s in seen)
    assert max(s["shared"] for s in seen) >= 2  # the shared ones did overlap


def test_once_per_key_computes_once_across_threads():
    store, calls = OncePerKey(), []

    def compute():
        calls.append(1)
        time.sleep(0.05)
        return object()

    got = []
    threads = [
        threading.Thread(target=lambda: got.append(store.get("k", compute))) for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({id(g) for g in got}) == 1


def _blas_threads() -> set[int]:
    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


def test_overlapping_limits_restore_the_original_only_when_the_last_leaves():
    if not _blas_threads():
        pytest.skip("no BLAS library loaded")
    with threadpool_limits(limits=2, user_api="blas"):
        first, second = limit_threads(1, "blas"), limit_threads(1, "blas")
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)  # a task that ends while another still fits
        assert _blas_threads() == {1}
        second.__exit__(None, None, None)
        assert _blas_threads() == {2}
