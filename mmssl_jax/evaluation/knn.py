"""Weighted k-nearest-neighbour classification on L2-normalised features.

The protocol of InstDisc (Wu et al., 2018) and DINO: cosine similarity, the k=20 nearest
training samples each vote for their class with weight exp(sim / T), T = 0.07. It needs no
fitting, so it is the cheapest signal of representation quality during training.
"""

from __future__ import annotations

import numpy as np

from mmssl_jax.evaluation import context
from mmssl_jax.evaluation.encoder import l2_normalize


def knn_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> np.ndarray:
    """int [N_test] predicted classes (vote ties go to the lower class index)."""
    train = l2_normalize(np.asarray(train_x).reshape(len(train_x), -1))
    test = l2_normalize(np.asarray(test_x).reshape(len(test_x), -1))
    train_y = np.asarray(train_y)
    num_classes = int(num_classes or train_y.max() + 1)
    k = min(k, len(train))
    preds = []
    for start in range(0, len(test), chunk):
        sims = test[start : start + chunk] @ train.T  # [n, N_train]
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(sims, idx, axis=1)
        # exp((s - 1) / T) is exp(s / T) rescaled per row: same argmax, no overflow.
        weights = np.exp((top.astype(np.float64) - 1.0) / temperature)
        votes = np.zeros((len(sims), num_classes))
        np.add.at(votes, (np.arange(len(sims))[:, None], train_y[idx]), weights)
        preds.append(np.argmax(votes, axis=1))
    return np.concatenate(preds)


def knn_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """{top1}: accuracy of knn_predict on the test set."""
    num_classes = int(max(np.max(train_y), np.max(test_y)) + 1)
    preds = knn_predict(
        train_x, train_y, test_x, k=k, temperature=temperature, num_classes=num_classes
    )
    return {"top1": float(np.mean(preds == np.asarray(test_y)))}


# ---- the evaluator entry (type "knn", found by name: see runner.py) ----

DEFAULTS = dict(
    **context.TRAIN_TEST,
    layers=("emb", "feature"),
    k=20,
    temperature=0.07,
)
SPLITS = context.TRAIN_TEST_SPLITS  # the shard keys it reads
NEEDS_TEXT = False  # skipped (with a warning) for an encoder without a text tower
RAW_PIXELS = True  # whether the raw-pixel baseline applies
TSNE = False  # t-SNE map by default
PER_LAYER = True  # metrics are "<layer>/<metric>" rows
CONCURRENT = True  # device work only through call.features / call.texts


def run(call, name, cfg, encoder, rows, artifacts) -> dict[str, float]:
    """Runs the evaluation `name` (config `cfg`) on `encoder`; see the module docstring."""
    fn = lambda a, b, c, d: knn_accuracy(  # noqa: E731
        a, b, c, d, k=cfg["k"], temperature=cfg["temperature"]
    )
    return context.per_layer(call, name, cfg, encoder, rows, artifacts, fn)
