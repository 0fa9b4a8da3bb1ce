"""FSDP: the sharding rules, and FSDP training equals data-parallel training on 8 devices."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmssl_jax.parallel import mesh as parallel
from mmssl_jax.parallel import sharding_rules
from mmssl_jax.training.checkpoint import Checkpointer
from mmssl_jax.training.metrics_writer import read_metrics
from mmssl_jax.training.trainer import Trainer


def test_fsdp_spec_picks_largest_divisible_dim():
    spec = sharding_rules.fsdp_spec
    assert spec((768, 3072), 4, "data", 8, 0) == jax.P(None, "data")
    assert spec((3072, 768), 4, "data", 8, 0) == jax.P("data", None)
    # The largest dimension (1001) does not divide by 8: the next one does.
    assert spec((1001, 64), 4, "data", 8, 0) == jax.P(None, "data")
    # Ties go to the later dimension.
    assert spec((64, 64), 4, "data", 8, 0) == jax.P(None, "data")
    # Nothing divides, or too small, or a scalar: replicated.
    assert spec((7, 9), 4, "data", 8, 0) == jax.P(None, None)
    assert spec((768, 3072), 4, "data", 8, 4 * 2**20) == jax.P(None, "data")  # 9 MiB
    assert spec((384, 1536), 4, "data", 8, 4 * 2**20) == jax.P(None, None)  # 2.25 MiB
    assert spec((), 4, "data", 8, 0) == jax.P()


def test_state_shardings_follow_rules_and_match_moments():
    mesh = parallel.make_mesh(8)
    state = {
        "params": {"fc": {"kernel": jnp.zeros((16, 32)), "bias": jnp.zeros(32)}, "scale": 0.0},
        "opt_state": {"mu": {"fc": {"kernel": jnp.zeros((16, 32)), "bias": jnp.zeros(32)}}},
        "step": jnp.zeros((), jnp.int32),
    }
    abstract = jax.eval_shape(lambda: state)
    rules = [(r"bias$", "replicate"), (".*", "fsdp")]
    shardings = sharding_rules.state_shardings(abstract, mesh, rules, min_size_bytes=0)
    assert shardings["params"]["fc"]["kernel"].spec == jax.P(None, "data")
    assert shardings["opt_state"]["mu"]["fc"]["kernel"].spec == jax.P(None, "data")
    assert shardings["params"]["fc"]["bias"].spec == jax.P()
    assert shardings["step"].spec == jax.P()
    full = 2 * (16 * 32 + 32) * 4 + 4 + 4
    assert sharding_rules.bytes_per_device(abstract, shardings) == full - 2 * 16 * 32 * 4 * 7 // 8
    with pytest.raises(ValueError, match="unknown sharding op"):
        sharding_rules.state_shardings(abstract, mesh, [(".*", "shard_all")])
    with pytest.raises(ValueError, match="no FSDP axis"):
        sharding_rules.state_shardings(abstract, mesh, axis="model")


def _config(data_root, fsdp: bool):
    config = importlib.import_module("configs.tiny_clip").get_config(f"data={data_root}")
    config.train.update(
        dict(batch_size=32, total_steps=3, log_every=1, ckpt_every=1000, progress=False)
    )
    # Two blocks per tower instead of four: the same code paths at half the compile time.
    config.model.image_overrides = {"depth": 2}
    config.model.text_overrides = {"layers": 2}
    config.train.fsdp = fsdp
    config.train.fsdp_min_size_mb = 0.0  # the tiny tensors are all below the 4 MiB default
    config.data.num_threads = 1
    config.optim.warmup_steps = 1
    config.evals = {}
    return config


def test_fsdp_equals_data_parallel(embedded_data, tmp_path):
    assert jax.device_count() == 8
    curves, trainers = {}, {}
    for fsdp in (False, True):
        workdir = tmp_path / f"fsdp{int(fsdp)}"
        trainer = Trainer(_config(embedded_data, fsdp), str(workdir))
        trainer.run()
        curves[fsdp] = np.array([row["loss"] for row in read_metrics(str(workdir))])
        trainers[fsdp] = trainer

    # FSDP really shards: the ViT's MLP kernel and its Adam moments, 1/8 per device.
    fsdp = trainers[True]
    kernel = fsdp.state.params["image_encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec in (jax.P("data", None), jax.P(None, "data"))
    assert kernel.addressable_shards[0].data.size == kernel.size // 8
    per_device = sharding_rules.bytes_per_device(fsdp.state_shape, fsdp.state_sharding)
    replicated = sharding_rules.bytes_per_device(
        trainers[False].state_shape, trainers[False].state_sharding
    )
    assert per_device < replicated / 6

    assert len(curves[True]) == 3
    np.testing.assert_allclose(curves[True], curves[False], rtol=1e-5)
    # Matrices agree closely. (Vectors are left out: the key bias has an exactly zero true
    # gradient, so Adam turns rounding noise of either run into lr-sized steps.) Adam does the
    # same, less, to rows with near-zero gradients (rare tokens' embeddings): a few elements
    # in 10^4 may miss 1e-5, but none by a tenth of one step's lr, which a wrong shard would.
    lr = fsdp.config.optim.lr
    for a, b in zip(
        jax.tree.leaves(fsdp.state.params),
        jax.tree.leaves(trainers[False].state.params),
        strict=True,
    ):
        if a.ndim >= 2:
            a, b = np.asarray(a), np.asarray(b)
            close = np.isclose(a, b, rtol=1e-3, atol=1e-5)
            assert close.mean() > 1 - 1e-4, f"{(~close).sum()} of {a.size} elements differ"
            np.testing.assert_allclose(a, b, rtol=0, atol=0.1 * lr)

    # The sharded checkpoint restores onto the FSDP shardings.
    ckpt = Checkpointer(str(tmp_path / "fsdp1"))
    try:
        restored = ckpt.restore(fsdp.abstract_state(), None)
    finally:
        ckpt.close()
    got = restored.params["image_encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert got.sharding.spec == kernel.sharding.spec
    np.testing.assert_array_equal(np.asarray(got), np.asarray(kernel))
