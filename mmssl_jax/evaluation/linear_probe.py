"""Linear probe: logistic regression on frozen features.

Features are standardised (mean 0, variance 1 per dimension, statistics from the training
split) so one grid of inverse regularisation strengths C fits every layer and model. C is
chosen on a held-out part of train (stratified, `val_fraction`), then the probe is refit on all
of train and scored on test. A closed-form or SGD probe on the device would scale further
(big_vision's fewshot_lsr, SLIP's main_linear); scikit-learn's L-BFGS is exact and needs no
schedule, which is what a periodic health check on a few thousand images wants.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from mmssl_jax.evaluation import context

DEFAULT_CS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def make_probe(C: float, max_iter: int = 1000) -> Pipeline:
    """StandardScaler -> multinomial LogisticRegression (L-BFGS)."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))


def _fit(C: float, x: np.ndarray, y: np.ndarray, max_iter: int) -> Pipeline:
    with warnings.catch_warnings():
        # An unconverged fit is still a valid (slightly under-fit) probe; the selection on the
        # held-out split judges it like any other.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return make_probe(C, max_iter).fit(x, y)


def select_c(
    x: np.ndarray,
    y: np.ndarray,
    Cs: Sequence[float] = DEFAULT_CS,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
) -> tuple[float, dict[float, float]]:
    """Chooses C by accuracy on a held-out split of (x, y); returns (best C, {C: accuracy}).

    Ties go to the smaller C (stronger regularisation).
    """
    if len(Cs) == 1:
        return float(Cs[0]), {}
    _, counts = np.unique(y, return_counts=True)
    stratify = y if counts.min() >= 2 else None
    x_tr, x_val, y_tr, y_val = train_test_split(
        x, y, test_size=val_fraction, random_state=seed, stratify=stratify
    )
    # Ascending C with warm starts: each fit starts from the more regularised solution, which
    # cuts L-BFGS iterations several-fold; the final refit below starts cold.
    probe = make_probe(float(min(Cs)), max_iter)
    probe.set_params(logisticregression__warm_start=True)
    scores = {}
    for C in sorted(float(c) for c in Cs):
        probe.set_params(logisticregression__C=C)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(x_tr, y_tr)
        scores[C] = float(probe.score(x_val, y_val))
    best = max(sorted(scores), key=lambda c: scores[c])
    return best, scores


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
) -> dict[str, float]:
    """Test accuracy of a logistic-regression probe; returns {top1, C, val_top1}."""
    train_x = np.asarray(train_x, np.float32).reshape(len(train_x), -1)
    test_x = np.asarray(test_x, np.float32).reshape(len(test_x), -1)
    C, scores = select_c(
        train_x, train_y, Cs, val_fraction=val_fraction, seed=seed, max_iter=max_iter
    )
    probe = _fit(C, train_x, train_y, max_iter)
    return {
        "top1": float(probe.score(test_x, test_y)),
        "C": C,
        "val_top1": scores.get(C, float("nan")),
    }


# ---- the evaluator entry (type "linear_probe", found by name: see runner.py) ----

DEFAULTS = dict(
    train_shards=None,
    test_shards=None,
    train_limit=None,
    test_limit=None,
    layers=("emb", "feature"),
    Cs=DEFAULT_CS,
    val_fraction=0.2,
    max_iter=1000,
)
SPLITS = ("train_shards", "test_shards")  # the shard keys it reads
NEEDS_TEXT = False  # skipped (with a warning) for an encoder without a text tower
RAW_PIXELS = True  # whether the raw-pixel baseline applies
TSNE = True  # t-SNE map by default
PER_LAYER = True  # metrics are "<layer>/<metric>" rows


def run(call, name, cfg, encoder, rows, artifacts) -> dict[str, float]:
    """Runs the evaluation `name` (config `cfg`) on `encoder`; see the module docstring."""
    fn = lambda a, b, c, d: linear_probe(  # noqa: E731
        a,
        b,
        c,
        d,
        Cs=cfg["Cs"],
        val_fraction=cfg["val_fraction"],
        seed=cfg["seed"],
        max_iter=cfg["max_iter"],
    )
    return context.per_layer(call, name, cfg, encoder, rows, artifacts, fn)
