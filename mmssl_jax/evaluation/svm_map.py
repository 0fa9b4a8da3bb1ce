"""Per-layer linear SVMs, mean average precision over classes (the VOC07 protocol).

The protocol of the thesis and of Goyal et al.'s self-supervision benchmark on VOC07: for each
class a one-vs-rest linear SVM on frozen features, its cost C chosen by k-fold cross-validation
on train (scored by average precision), refit on all of train; the test AP comes from the
SVM's decision function; the result is the mean AP over classes. It works for multi-label
targets (a [N, C] 0/1 matrix) and for single-label ones (int [N], one-hot encoded).

Features are standardised once with training statistics (the scaler does not change across
folds; its leak into the CV split is negligible for choosing C and makes the search cheaper).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import average_precision_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from mmssl_jax.evaluation import context

DEFAULT_CS = (0.01, 0.1, 1.0, 10.0)


class SvmMapResult(NamedTuple):
    metrics: dict[str, float]  # mAP, num_classes (classes with positives in train and test)
    ap: np.ndarray  # float [C]; NaN where a class cannot be scored
    costs: np.ndarray  # float [C]; the C chosen per class (NaN when skipped)


def to_multilabel(y: np.ndarray, num_classes: int) -> np.ndarray:
    """int [N] labels -> 0/1 [N, C]; a [N, C] matrix passes through (as 0/1)."""
    y = np.asarray(y)
    if y.ndim == 2:
        return (y > 0).astype(np.int64)
    out = np.zeros((len(y), num_classes), np.int64)
    valid = y >= 0
    out[np.flatnonzero(valid), y[valid]] = 1
    return out


def _num_classes(train_y: np.ndarray, test_y: np.ndarray) -> int:
    if np.ndim(train_y) == 2:
        return int(np.shape(train_y)[1])
    return int(max(np.max(train_y), np.max(test_y)) + 1)


def fit_class_svm(
    x: np.ndarray,
    y: np.ndarray,
    Cs: Sequence[float] = DEFAULT_CS,
    *,
    folds: int = 3,
    seed: int = 0,
    max_iter: int = 2000,
) -> LinearSVC:
    """One binary LinearSVC, C chosen by stratified k-fold CV on average precision.

    With fewer than `folds` positives (or negatives) CV cannot score a fold, so the middle
    of the grid is used.
    """
    svm = LinearSVC(random_state=seed, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if min(y.sum(), len(y) - y.sum()) < folds or len(Cs) == 1:
            return svm.set_params(C=float(Cs[len(Cs) // 2])).fit(x, y)
        search = GridSearchCV(
            svm,
            {"C": [float(c) for c in Cs]},
            scoring="average_precision",
            cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
        )
        return search.fit(x, y).best_estimator_


def svm_map(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    folds: int = 3,
    seed: int = 0,
    max_iter: int = 2000,
) -> SvmMapResult:
    """Mean test AP over classes of one-vs-rest linear SVMs (see the module docstring).

    A class with no positive (or no negative) in train or test is left out of the mean.
    """
    num_classes = _num_classes(train_y, test_y)
    y_tr = to_multilabel(train_y, num_classes)
    y_te = to_multilabel(test_y, num_classes)
    scaler = StandardScaler().fit(np.asarray(train_x, np.float32).reshape(len(train_x), -1))
    x_tr = scaler.transform(np.asarray(train_x, np.float32).reshape(len(train_x), -1))
    x_te = scaler.transform(np.asarray(test_x, np.float32).reshape(len(test_x), -1))
    ap = np.full(num_classes, np.nan)
    costs = np.full(num_classes, np.nan)
    for c in range(num_classes):
        if not (0 < y_tr[:, c].sum() < len(y_tr)) or not (0 < y_te[:, c].sum() < len(y_te)):
            continue
        svm = fit_class_svm(x_tr, y_tr[:, c], Cs, folds=folds, seed=seed, max_iter=max_iter)
        ap[c] = average_precision_score(y_te[:, c], svm.decision_function(x_te))
        costs[c] = svm.C
    scored = ~np.isnan(ap)
    if not scored.any():
        raise context.CannotEvaluateError(
            "svm_map: no class has both positives and negatives in train and test"
        )
    metrics = {"mAP": float(np.mean(ap[scored])), "num_classes": float(scored.sum())}
    return SvmMapResult(metrics, ap, costs)


# ---- the evaluator entry (type "svm_map", found by name: see runner.py) ----

DEFAULTS = dict(
    **context.TRAIN_TEST,
    layers=("emb", "feature"),
    Cs=DEFAULT_CS,
    folds=3,
    max_iter=2000,
)
SPLITS = context.TRAIN_TEST_SPLITS  # the shard keys it reads
NEEDS_TEXT = False  # skipped (with a warning) for an encoder without a text tower
RAW_PIXELS = True  # whether the raw-pixel baseline applies
TSNE = False  # t-SNE map by default
PER_LAYER = True  # metrics are "<layer>/<metric>" rows
CONCURRENT = True  # device work only through call.features / call.texts


def run(call, name, cfg, encoder, rows, artifacts) -> dict[str, float]:
    """Runs the evaluation `name` (config `cfg`) on `encoder`; see the module docstring."""
    fn = lambda a, b, c, d: (
        svm_map(  # noqa: E731
            a, b, c, d, Cs=cfg["Cs"], folds=cfg["folds"], seed=cfg["seed"], max_iter=cfg["max_iter"]
        ).metrics
    )
    return context.per_layer(call, name, cfg, encoder, rows, artifacts, fn)
