"""Training on the real embedded data: the tiny recipes learn.

SLIP's two terms are CLIP's and SimCLR's, so one SLIP run asserts that each of them learns
(its loss and its in-batch accuracy, logged per term); tiny_clip and tiny_simclr run the same
term code at the same lr, and each runs through the Trainer elsewhere (tiny_clip: the resume
and fault tests; tiny_simclr: below, a run without any text).
"""

import numpy as np
import pytest

from mmssl_jax.training.trainer import Trainer
from tests.training.tiny_runs import curves, tiny_config


def head_and_tail(values: np.ndarray) -> tuple[float, float]:
    """Means of the first and of the last k logged values, k = 3 where the curve has 9 rows
    or more (one row is a 10-step average; three smooth the batch noise out of the
    comparison), fewer on a shorter curve so that head and tail never share a row."""
    k = max(1, min(3, len(values) // 3))
    return float(values[:k].mean()), float(values[-k:].mean())


# Steps each recipe needs, with room (measured curves at batch 64: UniCL's image-label term
# drops from step 10 on; SLIP sits on a plateau for ~40 steps, then at step 110 its total is
# at 0.88x of the plateau, its CLIP term at 0.86x and its SimCLR term at 0.91x).
LEARNING_STEPS = {"tiny_slip": 110, "tiny_unicl": 40}
# (metric, the largest allowed tail / head ratio) per recipe; for accuracies, the smallest.
LOSS_DROPS = {
    "tiny_slip": {"loss": 0.92, "clip/loss": 0.92, "simclr/loss": 0.95},
    "tiny_unicl": {"loss": 0.9},
}
ACCURACY_RISES = {"tiny_slip": {"clip/i2t_acc": 2.0, "simclr/acc": 1.3}, "tiny_unicl": {}}


@pytest.mark.parametrize("name", sorted(LEARNING_STEPS))
def test_tiny_configs_learn(embedded_data, tmp_path, name):
    # One device: the 8-device equivalence is its own test; here only learning is checked.
    steps = LEARNING_STEPS[name]
    config = tiny_config(name, embedded_data, total_steps=steps, log_every=10, num_devices=1)
    last = Trainer(config, str(tmp_path)).run()
    logged = curves(tmp_path)
    assert np.all(np.isfinite(logged["loss"]))
    assert last["skipped_steps"] == 0
    for key, ratio in LOSS_DROPS[name].items():
        head, tail = head_and_tail(logged[key])
        assert tail < ratio * head, f"{name}: {key} did not drop: {logged[key]}"
    for key, ratio in ACCURACY_RISES[name].items():
        head, tail = head_and_tail(logged[key])
        assert tail > ratio * head, f"{name}: {key} did not rise: {logged[key]}"


def test_image_only_recipe_trains(embedded_data, tmp_path):
    """tiny_simclr reads no text: its batches hold only the two views."""
    config = tiny_config("tiny_simclr", embedded_data, batch_size=16, total_steps=10, num_devices=1)
    trainer = Trainer(config, str(tmp_path))
    last = trainer.run()
    assert "tokens" not in trainer.batch_keys
    logged = curves(tmp_path)
    assert np.all(np.isfinite(logged["loss"])) and last["skipped_steps"] == 0
    # The updates moved the parameters: their norm changed between the logged rows.
    norms = logged["param_norm"]
    assert np.all(logged["grad_norm"] > 0) and norms[-1] != norms[0]
