"""Sharded (8 emulated devices, jax.shard_map) losses and gradients equal single-device ones."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmssl_jax import objectives
from mmssl_jax.objectives import core
from mmssl_jax.parallel import mesh as parallel

TOL = dict(rtol=1e-5, atol=1e-5)
B, D = 32, 6  # global batch 32 -> 4 rows per device


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py should emulate 8 CPU devices"
    return parallel.make_mesh()


def _outputs(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda: rng.normal(size=(B, D)).astype(np.float32)
    # Labels spread so that devices differ: caption pairs, duplicated classes across devices.
    labels = rng.choice([-1, -1, 0, 1, 2, 5], size=B).astype(np.int32)
    return {
        "image_emb": f(),
        "text_emb": f(),
        "ssl_a": f(),
        "ssl_b": f(),
        "logit_scale": np.float32(12.0),
        "logit_bias": np.float32(-3.0),
        "label": labels,
    }


FLOAT_KEYS = ("image_emb", "text_emb", "ssl_a", "ssl_b", "logit_scale", "logit_bias")


def _loss_metrics_grads(terms, outputs, mesh):
    """(loss, metrics, grads w.r.t. every float output) of total_loss, jitted."""
    floats = {k: v for k, v in outputs.items() if k in FLOAT_KEYS}
    rest = {k: v for k, v in outputs.items() if k not in FLOAT_KEYS}

    @jax.jit
    def run(floats, rest):
        fn = lambda fl: objectives.total_loss(terms, fl | rest, mesh)
        (loss, metrics), grads = jax.value_and_grad(fn, has_aux=True)(floats)
        return loss, metrics, grads

    return run(floats, rest)


def _assert_same(a, b):
    loss_a, metrics_a, grads_a = a
    loss_b, metrics_b, grads_b = b
    np.testing.assert_allclose(loss_a, loss_b, **TOL)
    assert set(metrics_a) == set(metrics_b)
    for k in metrics_a:
        np.testing.assert_allclose(metrics_a[k], metrics_b[k], **TOL, err_msg=k)
    for k in grads_a:
        np.testing.assert_allclose(grads_a[k], grads_b[k], **TOL, err_msg=k)


TERMS = [
    # Every term in its dense [n, N] form, summed with weights (one compile) ...
    [("clip", 1.0), ("simclr", 0.5), ("siglip", 0.25), ("unicl", 2.0), ("supcon", 0.1)],
    # ... and each chunked form (block sizes that leave a padded tail).
    [("clip", 1.0, {"chunk_size": 5})],
    [("simclr", 1.0, {"chunk_size": 24, "temperature": 0.2})],
    [("unicl", 1.0, {"chunk_size": 7})],
    [("siglip", 1.0, {"chunk_size": 3})],
    [("supcon", 1.0, {"chunk_size": 10})],
]


@pytest.mark.parametrize("terms", TERMS, ids=lambda t: "+".join(map(str, t)))
def test_sharded_equals_single_device(mesh, terms):
    outputs = _outputs()
    single = _loss_metrics_grads(terms, outputs, None)
    sharded = _loss_metrics_grads(terms, parallel.to_global(outputs, mesh), mesh)
    _assert_same(sharded, single)
    used = objectives.needed_inputs(terms) & set(FLOAT_KEYS)
    assert all(np.any(single[2][k] != 0) for k in used)  # the comparison is not vacuous


def _pmean_of(fn, mesh, *args):
    """Runs fn(*args, axis_name='data') per device, pmeans its loss (the documented contract)."""

    def body(*local):
        loss, _ = fn(*local, axis_name="data")
        return jax.lax.pmean(loss, "data")

    specs = tuple(jax.P() if np.ndim(a) == 0 else jax.P("data") for a in args)
    sharded = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=jax.P())
    return jax.jit(jax.value_and_grad(sharded))(*args)


def test_unequal_row_counts_reduce_to_the_global_mean(mesh):
    """SupCon on one view: labelled singletons have no positive, so the number of counted
    anchors differs per device; pmean of the shares must still be the global mean."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(B, D)).astype(np.float32)
    labels = np.arange(B, dtype=np.int32) + 100  # all singletons ...
    labels[:6] = 1  # ... except a class on devices 0-1
    labels[9] = labels[30] = 2  # and a pair split over devices 2 and 7
    single = jax.jit(jax.value_and_grad(lambda z: objectives.supcon_loss(z, labels, 0.2)[0]))(z)
    sharded = _pmean_of(functools.partial(objectives.supcon_loss, temperature=0.2), mesh, z, labels)
    assert np.isfinite(single[0]) and float(single[0]) > 0
    np.testing.assert_allclose(sharded[0], single[0], **TOL)
    np.testing.assert_allclose(sharded[1], single[1], **TOL)


def test_masked_contrastive_sharded(mesh):
    rng = np.random.default_rng(2)
    a, b = (rng.normal(size=(B, D)).astype(np.float32) for _ in range(2))
    valid = rng.random((B, B)) < 0.8
    positives = (rng.random((B, B)) < 0.15) & valid
    positives[5] = False  # a row without positives
    fn = lambda a, b: objectives.masked_contrastive(a, b, positives, valid, 7.0)[0]
    single = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(a, b)

    def body(a, b, p, v):
        loss, _ = objectives.masked_contrastive(a, b, p, v, 7.0, axis_name="data")
        return jax.lax.pmean(loss, "data")

    sharded = jax.shard_map(body, mesh=mesh, in_specs=(jax.P("data"),) * 4, out_specs=jax.P())
    loss, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(a, b, positives, valid)
    np.testing.assert_allclose(loss, single[0], **TOL)
    for g, g_ref in zip(grads, single[1], strict=True):
        np.testing.assert_allclose(g, g_ref, **TOL)


def test_gradient_flows_through_the_gather(mesh, monkeypatch):
    """A stop-gradient gather (SLIP's all_gather) changes the gradient; ours matches one
    device, so a device's embeddings get the gradient of their use on other devices."""
    outputs = _outputs(3)
    terms = [("clip", 1.0)]
    single = _loss_metrics_grads(terms, outputs, None)
    global_outputs = parallel.to_global(outputs, mesh)
    ours = _loss_metrics_grads(terms, global_outputs, mesh)
    _assert_same(ours, single)

    gather = core.gather_rows
    monkeypatch.setattr(
        core, "gather_rows", lambda x, axis_name: jax.lax.stop_gradient(gather(x, axis_name))
    )
    detached = _loss_metrics_grads(terms, global_outputs, mesh)
    np.testing.assert_allclose(detached[0], single[0], **TOL)  # same forward value
    for key in ("image_emb", "text_emb"):
        assert not np.allclose(detached[2][key], single[2][key], **TOL), key


def test_per_device_logits_are_n_by_N(mesh):
    """Under the mesh each device computes [n, N] (or chunked [n, c]) logits, never [N, N]."""
    keys = ("image_emb", "text_emb", "logit_scale")
    outputs = parallel.to_global({k: v for k, v in _outputs().items() if k in keys}, mesh)

    def dot_shapes(jaxpr):
        shapes = []
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                shapes.append(tuple(eqn.outvars[0].aval.shape))
            for param in eqn.params.values():
                sub = getattr(param, "jaxpr", param)
                if hasattr(sub, "eqns"):
                    shapes += dot_shapes(sub)
        return shapes

    for opts, cols in (({}, B), ({"chunk_size": 8}, 8)):
        fn = lambda o, opts=opts: objectives.total_loss([("clip", 1.0, opts)], o, mesh)[0]
        shapes = dot_shapes(jax.make_jaxpr(jax.grad(fn))(outputs).jaxpr)
        logits = [s for s in shapes if len(s) == 2 and s[0] == B // 8]
        assert (B // 8, cols) in logits
        logit_like = [s for s in shapes if len(s) == 2 and D not in s]
        assert max(logit_like, key=np.prod) == (B // 8, cols)
        assert (B, B) not in shapes


def test_batch_not_divisible_by_mesh(mesh):
    outputs = {k: v[:12] if np.ndim(v) else v for k, v in _outputs().items()}
    with pytest.raises(ValueError, match="not divisible"):
        objectives.total_loss([("clip", 1.0)], outputs, mesh)


def test_total_loss_under_jit_with_sharded_inputs(mesh):
    """The training-step shape: jit over NamedSharding global arrays, loss replicated."""
    outputs = parallel.to_global(_outputs(4), mesh)
    terms = [("clip", 1.0), ("simclr", 1.0)]
    step = jax.jit(
        lambda o: objectives.total_loss(terms, o, mesh)[0],
        out_shardings=parallel.replicated(mesh),
    )
    loss = step(outputs)
    ref, _ = objectives.total_loss(terms, jax.device_get(outputs), None)
    np.testing.assert_allclose(loss, ref, **TOL)
    assert loss.sharding.is_fully_replicated
    assert jnp.isfinite(loss)


def test_scale_may_already_vary_per_device(mesh):
    """A scale computed inside the caller's shard_map (device-varying type) is accepted."""
    outputs = _outputs(5)
    img, txt = outputs["image_emb"], outputs["text_emb"]

    def clip_with_local_scale(a, b, axis_name):
        scale = 12.0 + 0.0 * jnp.sum(a)  # same value everywhere, but typed as varying
        return objectives.clip_loss(a, b, scale, axis_name=axis_name)

    sharded = _pmean_of(clip_with_local_scale, mesh, img, txt)
    single = jax.jit(jax.value_and_grad(lambda i: objectives.clip_loss(i, txt, 12.0)[0]))(img)
    np.testing.assert_allclose(sharded[0], single[0], **TOL)
    np.testing.assert_allclose(sharded[1], single[1], **TOL)
