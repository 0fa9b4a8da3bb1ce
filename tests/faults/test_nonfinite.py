"""Issue 9, item 3: a NaN in a batch or an inf in a gradient skips the update and is counted;
`train.max_bad_steps` in a row halt the run with a clear message, and the last good
checkpoint stays intact and loadable.

The faults are injected into the real jitted train step by wrapping the objective: samples
of one step get NaN image embeddings (what a corrupt input does to the activations), and on
other steps the image embedding's cotangent is multiplied by inf (a gradient blow-up with a
finite loss). Which step is hit is read from the batch's global sample `index`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmssl_jax import objectives
from mmssl_jax.training.checkpoint import Checkpointer
from mmssl_jax.training.metrics_writer import read_metrics
from mmssl_jax.training.trainer import NonFiniteError, Trainer
from tests.faults import fault_config

NAN_STEP = 3  # 1-based: the third update sees NaN in its batch
INF_GRAD_STEPS = (6, 7, 8)  # three in a row: with max_bad_steps=3 the run halts at step 8
MAX_BAD = len(INF_GRAD_STEPS)
CKPT_EVERY = fault_config.CKPT_EVERY  # the last good checkpoint before the streak is step 4


@jax.custom_vjp
def _blow_up_grad(x: jax.Array, on: jax.Array) -> jax.Array:
    return x


def _fwd(x, on):
    return x, on


def _bwd(on, g):
    return g * jnp.where(on, jnp.inf, 1.0), None


_blow_up_grad.defvjp(_fwd, _bwd)


@pytest.fixture
def poisoned(monkeypatch):
    """Wraps objectives.total_loss (read by the train step at trace time) with the faults."""
    batch = fault_config.get_config().train.batch_size
    total_loss = objectives.total_loss

    def faulty_total_loss(specs, outputs, mesh, *args, **kwargs):
        index = outputs["index"]
        step = jnp.min(index) // batch + 1  # 1-based step of this batch
        emb = outputs["image_emb"]
        rows = (index // batch + 1) == NAN_STEP
        emb = jnp.where(rows[:, None], jnp.nan, emb)
        emb = _blow_up_grad(emb, jnp.isin(step, jnp.array(INF_GRAD_STEPS)))
        return total_loss(specs, {**outputs, "image_emb": emb}, mesh, *args, **kwargs)

    monkeypatch.setattr(objectives, "total_loss", faulty_total_loss)


def _config(data_root):
    config = fault_config.get_config(f"data={data_root}")
    config.train.max_bad_steps = MAX_BAD
    return config


def test_bad_updates_are_skipped_counted_then_halt(embedded_data, tmp_path, poisoned):
    # Step by step on the trainer's own jitted step: what each update did to the state.
    trainer = Trainer(_config(embedded_data), str(tmp_path / "steps"))
    state = trainer._init(trainer.config.seed)
    batches = trainer.batches()
    good_params = {}
    for step in range(1, INF_GRAD_STEPS[-1] + 1):
        before = jax.device_get(state.params)
        state, metrics = trainer.train_step(state, next(batches))
        after, metrics = jax.device_get((state.params, metrics))
        bad = step == NAN_STEP or step in INF_GRAD_STEPS
        expected_skipped = sum(s == NAN_STEP or s in INF_GRAD_STEPS for s in range(1, step + 1))
        assert int(metrics["skipped_steps"]) == expected_skipped, step
        assert bool(np.isfinite(metrics["loss"])) == (step != NAN_STEP), step
        assert bool(np.isfinite(metrics["grad_norm"])) == (not bad), step
        same = jax.tree.all(jax.tree.map(np.array_equal, before, after))
        assert same == bad, f"step {step}: update {'applied' if same else 'skipped'}"
        assert jax.tree.all(jax.tree.map(lambda x: np.isfinite(x).all(), after))
        good_params[step] = after
    assert int(metrics["bad_streak"]) == MAX_BAD

    # The same faults under Trainer.run: halted with the message, at the streak's end.
    workdir = tmp_path / "run"
    trainer = Trainer(_config(embedded_data), str(workdir))
    with pytest.raises(NonFiniteError) as info:
        trainer.run()
    message = str(info.value)
    assert f"step {INF_GRAD_STEPS[-1]}: {MAX_BAD} consecutive steps" in message
    assert f"{workdir}/checkpoints is intact" in message
    rows = read_metrics(str(workdir))
    assert [r["skipped_steps"] for r in rows if r["step"] == NAN_STEP] == [1.0]
    assert [r["bad_streak"] for r in rows if r["step"] == NAN_STEP + 1] == [0.0]

    # The last checkpoint before the streak is intact, loadable, and holds the good state.
    ckpt = Checkpointer(str(workdir))
    last_good = (INF_GRAD_STEPS[0] - 1) // CKPT_EVERY * CKPT_EVERY
    assert ckpt.latest_step() == last_good
    restored = ckpt.restore(trainer.abstract_state(), None)
    ckpt.close()
    assert int(restored.step) == last_good
    jax.tree.map(
        np.testing.assert_array_equal, jax.device_get(restored.params), good_params[last_good]
    )
