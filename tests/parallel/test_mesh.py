"""Mesh construction, batch sharding and host-to-global arrays on 8 emulated devices."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from mmssl_jax.parallel import mesh as parallel


def test_make_mesh_defaults_to_all_devices_on_data():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.shape["data"] == jax.device_count() == 8
    assert mesh.axis_types == (AxisType.Auto,)


def test_make_mesh_subsets_and_shapes():
    assert parallel.make_mesh(4).devices.size == 4
    mesh = parallel.make_mesh(8, ("data", "model"))
    assert dict(mesh.shape) == {"data": 8, "model": 1}
    mesh = parallel.make_mesh(8, ("data", "model"), shape=(4, 2))
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    with pytest.raises(ValueError, match="devices"):
        parallel.make_mesh(16)
    with pytest.raises(ValueError, match="shape"):
        parallel.make_mesh(8, ("data", "model"), shape=(4, 4))


def test_shardings():
    mesh = parallel.make_mesh()
    assert parallel.batch_sharding(mesh).spec == jax.P("data")
    assert parallel.replicated(mesh).spec == jax.P()
    assert parallel.batch_sharding(mesh).mesh == mesh


def test_to_global_shards_the_batch_and_replicates_scalars():
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, size=(16, 4, 4, 3), dtype=np.uint8),
        "label": np.arange(16, dtype=np.int32),
        "step": np.int32(7),
    }
    out = parallel.to_global(batch, mesh)
    assert out["image"].shape == (16, 4, 4, 3) and out["image"].dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
    np.testing.assert_array_equal(np.asarray(out["label"]), batch["label"])
    assert out["label"].sharding == parallel.batch_sharding(mesh)
    shards = sorted(out["label"].addressable_shards, key=lambda s: s.index[0].start)
    assert [s.data.shape for s in shards] == [(2,)] * 8
    np.testing.assert_array_equal(np.asarray(shards[3].data), [6, 7])
    assert out["step"].sharding.is_fully_replicated and int(out["step"]) == 7


def test_check_batch_divisible():
    mesh = parallel.make_mesh()
    parallel.check_batch_divisible(64, mesh)
    with pytest.raises(ValueError, match=r"10 is not divisible by the 8 devices.*'data'"):
        parallel.check_batch_divisible(10, mesh)
    with pytest.raises(ValueError, match="not divisible"):
        parallel.to_global({"label": np.arange(12)}, mesh)


def test_mesh_works_with_jit_named_sharding_and_shard_map():
    mesh = parallel.make_mesh()
    x = parallel.to_global({"x": np.arange(16, dtype=np.float32)}, mesh)["x"]

    def ring_sum(local):  # each device adds its left neighbour's block
        ring = [(i, (i + 1) % 8) for i in range(8)]
        return local + jax.lax.ppermute(local, "data", ring)

    f = jax.jit(
        jax.shard_map(ring_sum, mesh=mesh, in_specs=jax.P("data"), out_specs=jax.P("data")),
        out_shardings=parallel.batch_sharding(mesh),
    )
    y = f(x)
    expected = np.arange(16) + np.roll(np.arange(16), 2)
    np.testing.assert_array_equal(np.asarray(y), expected)
    assert y.sharding == parallel.batch_sharding(mesh)
