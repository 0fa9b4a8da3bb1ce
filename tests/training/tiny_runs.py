"""Short Trainer runs of the tiny recipes on the embedded data, shared by the training tests."""

import importlib

import ml_collections
import numpy as np

from mmssl_jax.training.metrics_writer import read_metrics


def tiny_config(name: str, data_root, **train) -> ml_collections.ConfigDict:
    """configs/<name>.py at test size: batch 64, 40 steps, 5 warmup, no evaluations."""
    config = importlib.import_module(f"configs.{name}").get_config(f"data={data_root}")
    config.train.update(
        dict(batch_size=64, total_steps=40, log_every=5, ckpt_every=1000, progress=False)
    )
    config.train.update(train)
    config.optim.warmup_steps = 5
    config.evals = {}
    return config


def curves(workdir) -> dict[str, np.ndarray]:
    """Every logged metric of a run as an array over its rows, metrics.jsonl read once."""
    rows = read_metrics(str(workdir))
    return {key: np.array([row[key] for row in rows]) for key in rows[0]}
