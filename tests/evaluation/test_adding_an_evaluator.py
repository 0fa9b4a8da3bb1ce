"""Adding an evaluator is one module found by its type name plus a config entry (the README's
"Adding an evaluator"): a toy evaluator written to a temporary folder runs in the report,
beside both baselines, with no registry edited anywhere."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest

from mmssl_jax.evaluation import runner
from tests.evaluation.test_evaluators import FakeEncoder, fmnist_shards  # noqa: F401

TOY_EVALUATOR = '''
"""Toy evaluator: nearest class mean of the train features, accuracy on the test split."""
import numpy as np

from mmssl_jax.evaluation import context

DEFAULTS = dict(train_shards=None, test_shards=None, train_limit=None, test_limit=None)
SPLITS = ("train_shards", "test_shards")
NEEDS_TEXT = False
RAW_PIXELS = True
TSNE = False
PER_LAYER = False


def run(call, name, cfg, encoder, rows, artifacts):
    f_tr, f_te, tr, te, y_tr, y_te = context.train_test(call, name, cfg, encoder, name)
    x_tr, x_te = f_tr["feature"][tr], f_te["feature"][te]
    means = np.stack([x_tr[y_tr == c].mean(0) for c in np.unique(y_tr)])
    pred = np.unique(y_tr)[np.argmin(((x_te[:, None] - means[None]) ** 2).sum(-1), axis=1)]
    return {"top1": float((pred == y_te).mean())}
'''


def test_a_toy_evaluator_from_a_temporary_module_runs_with_its_baselines(
    fmnist_shards,  # noqa: F811
    tmp_path,
    monkeypatch,  # noqa: F811
):
    (tmp_path / "toy_nearest_mean.py").write_text(textwrap.dedent(TOY_EVALUATOR))
    monkeypatch.syspath_prepend(str(tmp_path))
    root = fmnist_shards
    cfg = {
        "toy": dict(
            type="toy_nearest_mean",
            train_shards=f"{root}/train-*.tfrecord",
            test_shards=f"{root}/test-*.tfrecord",
            image_size=16,
            raw_pixel_size=8,
        )
    }
    runner.clear_cache()
    workdir = tmp_path / "work"
    workdir.mkdir()
    metrics = runner.run_evals(
        cfg,
        FakeEncoder(None),
        workdir=str(workdir),
        step=3,
        random_encoder=lambda: FakeEncoder(None, seed=5),
    )
    assert 0.3 < metrics["toy/top1"] <= 1.0  # nearest class mean on Fashion-MNIST pixels
    data = json.load(open(workdir / "eval" / "results_step_3.json"))
    assert np.isfinite(data["baselines"]["raw_pixels"]["toy/top1"])
    assert np.isfinite(data["baselines"]["random_init"]["toy/top1"])
    assert "| toy | top1 |" in open(os.path.join(workdir, "eval", "latest.md")).read()


def test_an_unknown_evaluator_type_names_the_built_in_ones():
    with pytest.raises(ValueError, match=r"no evaluator of type 'nope'.*zero_shot"):
        runner.normalize_config("x", {"type": "nope"})


def test_a_module_that_is_not_an_evaluator_says_what_it_lacks(tmp_path, monkeypatch):
    (tmp_path / "not_an_evaluator.py").write_text("DEFAULTS = {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"not an evaluator: it lacks \['SPLITS'"):
        runner.normalize_config("x", {"type": "not_an_evaluator"})
