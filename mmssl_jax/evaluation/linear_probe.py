"""Linear probe: logistic regression on frozen features.

Features are standardised (mean 0, variance 1 per dimension, statistics from the training
split) so one grid of inverse regularisation strengths C fits every layer and model. C is
chosen on a held-out part of train (stratified, `val_fraction`), then the probe is refit on all
of train and scored on test. A closed-form or SGD probe on the device would scale further
(big_vision's fewshot_lsr, SLIP's main_linear); scikit-learn's L-BFGS is exact and needs no
schedule, which is what a periodic health check on a few thousand images wants.

Besides top-1 over the test records it reports `mean_per_class` (mean recall over the classes
present in test), the honest number where class frequencies differ between the splits (the
emoji splits are by base emoji: a subgroup may have 20 test records or none). A test record
of a class that train lacks is kept and counts as wrong (the probe cannot predict it; a
warning says how many there were), rather than being dropped to flatter the score.

The fits run on `blas_threads` BLAS threads (default 1). L-BFGS's products here are tall and
skinny ([records, features] by [features, classes]); on a 2-core machine OpenBLAS's second
thread made the quick start's Fashion-MNIST `grid4` fit (10,000 x 4,096, 10 classes) slower,
94 s at 184% CPU against 65 s at 100% with one. Raise it for probes with many classes.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence

import numpy as np
from absl import logging
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from mmssl_jax.evaluation import context
from mmssl_jax.evaluation.encoder import limit_threads
from mmssl_jax.evaluation.zero_shot import mean_per_class_accuracy

DEFAULT_CS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


class MergeDuplicateColumns(TransformerMixin, BaseEstimator):
    """Collapses feature columns that are identical over the training rows, exactly.

    With an L2 penalty, columns equal on every training row get equal weights at the (unique)
    optimum, so a group of m such columns acts as one column whose weight costs 1/m as much:
    the group's mean times sqrt(m) with the same C is the same probe, on test rows too (which
    see the mean of their own columns). Columns constant over train get weight 0 (the
    intercept is free) and are dropped. Raw pixels of a gray dataset (Fashion-MNIST as RGB:
    three equal channels) shrink 3x, which cuts the L-BFGS fit about as much; features
    without such columns pass through untouched.
    """

    def fit(self, x: np.ndarray, y: np.ndarray | None = None) -> MergeDuplicateColumns:
        x = np.asarray(x)
        _, first, group, counts = np.unique(
            x.T, axis=0, return_index=True, return_inverse=True, return_counts=True
        )
        group = group.reshape(-1)
        keep = np.ptp(x[:, first], axis=0) > 0  # a column constant over train gets weight 0
        keep[0] |= not keep.any()  # all constant: keep one, so the probe still has a column
        self.n_features_in_ = x.shape[1]
        self.identity_ = bool(keep.all() and len(first) == x.shape[1])
        if not self.identity_:
            target = (np.cumsum(keep) - 1)[group]  # feature -> its merged column
            kept = np.flatnonzero(keep[group])
            self.columns_ = kept[np.argsort(target[kept], kind="stable")]
            self.weights_ = 1.0 / np.sqrt(counts[group[self.columns_]])
            sorted_target = target[self.columns_]
            self.starts_ = np.flatnonzero(np.r_[True, sorted_target[1:] != sorted_target[:-1]])
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        if self.identity_:
            return x
        x = np.asarray(x)
        merged = x[:, self.columns_] * self.weights_.astype(x.dtype)
        return np.add.reduceat(merged, self.starts_, axis=1)


def make_probe(C: float, max_iter: int = 1000) -> Pipeline:
    """StandardScaler -> MergeDuplicateColumns -> multinomial LogisticRegression (L-BFGS)."""
    return make_pipeline(
        StandardScaler(), MergeDuplicateColumns(), LogisticRegression(C=C, max_iter=max_iter)
    )


def _fit(C: float, x: np.ndarray, y: np.ndarray, max_iter: int) -> Pipeline:
    with warnings.catch_warnings():
        # An unconverged fit is still a valid (slightly under-fit) probe; the selection on the
        # held-out split judges it like any other.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return make_probe(C, max_iter).fit(x, y)


def _split_sizes(n: int, val_fraction: float) -> tuple[int, int]:
    n_val = math.ceil(val_fraction * n)  # as train_test_split rounds a fractional test_size
    return n_val, n - n_val


def check_split(n: int, num_classes: int, val_fraction: float) -> None:
    """Raises CannotEvaluateError unless both parts of the held-out split of n training
    records can hold every one of `num_classes` classes (else the chosen C measures nothing;
    with stratification scikit-learn refuses the split outright)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"linear_probe: val_fraction must lie in (0, 1); got {val_fraction}")
    n_val, n_fit = _split_sizes(n, val_fraction)
    if min(n_val, n_fit) >= num_classes:
        return
    need = next(m for m in itertools.count(n) if min(_split_sizes(m, val_fraction)) >= num_classes)
    raise context.CannotEvaluateError(
        f"{n} labelled train records are too few to choose C on a held-out split: "
        f"val_fraction={val_fraction} leaves {n_val} for validation and {n_fit} for fitting, "
        f"fewer than the {num_classes} classes (give at least {need} train records, or a "
        "single C in `Cs` to skip the choice)"
    )


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

    Ties go to the smaller C (stronger regularisation). CannotEvaluateError when the split cannot
    hold every class (see check_split).
    """
    if len(Cs) == 1:
        return float(Cs[0]), {}
    check_split(len(y), len(np.unique(y)), val_fraction)
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
    """Test accuracy of a logistic-regression probe; returns {top1, mean_per_class, C,
    val_top1} (see the module docstring for test classes that train lacks).

    CannotEvaluateError when train holds one class, or too few records to choose C.
    """
    train_x = np.asarray(train_x, np.float32).reshape(len(train_x), -1)
    test_x = np.asarray(test_x, np.float32).reshape(len(test_x), -1)
    if len(np.unique(train_y)) < 2:
        raise context.CannotEvaluateError(
            f"the {len(train_y)} labelled train records hold fewer than 2 classes"
        )
    C, scores = select_c(
        train_x, train_y, Cs, val_fraction=val_fraction, seed=seed, max_iter=max_iter
    )
    unseen = ~np.isin(test_y, train_y)
    if unseen.any():
        logging.warning(
            "linear probe: %d of %d test records (%d classes) have a class absent from train; "
            "they count as wrong",
            int(unseen.sum()),
            len(test_y),
            len(np.unique(np.asarray(test_y)[unseen])),
        )
    probe = _fit(C, train_x, train_y, max_iter)
    predictions = probe.predict(test_x)
    return {
        "top1": float(np.mean(predictions == test_y)),
        "mean_per_class": mean_per_class_accuracy(test_y, predictions),
        "C": C,
        "val_top1": scores.get(C, float("nan")),
    }


# ---- the evaluator entry (type "linear_probe", found by name: see runner.py) ----

DEFAULTS = dict(
    **context.TRAIN_TEST,
    layers=("emb", "feature"),
    Cs=DEFAULT_CS,
    val_fraction=0.2,
    max_iter=1000,
    blas_threads=1,
)
SPLITS = context.TRAIN_TEST_SPLITS  # the shard keys it reads
NEEDS_TEXT = False  # skipped (with a warning) for an encoder without a text tower
RAW_PIXELS = True  # whether the raw-pixel baseline applies
TSNE = True  # t-SNE map by default
PER_LAYER = True  # metrics are "<layer>/<metric>" rows
CONCURRENT = True  # device work only through call.features / call.texts


def run(call, name, cfg, encoder, rows, artifacts) -> dict[str, float]:
    """Runs the evaluation `name` (config `cfg`) on `encoder`; see the module docstring."""

    def fn(train_x, train_y, test_x, test_y):
        with limit_threads(int(cfg["blas_threads"]), user_api="blas"):
            return linear_probe(
                train_x,
                train_y,
                test_x,
                test_y,
                Cs=cfg["Cs"],
                val_fraction=cfg["val_fraction"],
                seed=cfg["seed"],
                max_iter=cfg["max_iter"],
            )

    return context.per_layer(call, name, cfg, encoder, rows, artifacts, fn)
