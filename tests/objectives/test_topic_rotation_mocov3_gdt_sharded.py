"""The topic, rotation, MoCo v3 and GDT terms: sharded over 8 emulated devices (shard_map,
all-gathered candidates) give the single-device loss, metrics and gradients."""

import jax
import numpy as np
import pytest

from mmssl_jax import objectives
from mmssl_jax.parallel import mesh as parallel

TOL = dict(rtol=1e-5, atol=1e-5)
B, D, K = 32, 6, 5  # 4 rows per device

FLOAT_KEYS = (
    "topic_pred",
    "topics",
    "rot_logits",
    "pred_a",
    "pred_b",
    "key_a",
    "key_b",
    "image_emb",
    "text_emb",
    "ssl_a",
    "logit_scale",
)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py should emulate 8 CPU devices"
    return parallel.make_mesh()


def _outputs(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.normal(size=shape).astype(np.float32)
    topics = rng.dirichlet(np.full(K, 0.5), size=B).astype(np.float32)
    topics[9] = topics[30]  # duplicates on different devices
    ids = rng.integers(0, 20, size=B).astype(np.int32)  # repeated ids across devices
    return {
        "topic_pred": f(B, K),
        "topics": topics,
        "rot_logits": f(B, 4),
        "rotation": rng.integers(0, 4, size=B).astype(np.int32),
        "pred_a": f(B, D),
        "pred_b": f(B, D),
        "key_a": f(B, D),
        "key_b": f(B, D),
        "image_emb": f(B, D),
        "text_emb": f(B, D),
        "ssl_a": f(B, D),
        "logit_scale": np.float32(8.0),
        "index": np.arange(1000, 1000 + B, dtype=np.int64),
        "id_hash": ids,
    }


def _run(terms, outputs, mesh):
    floats = {k: v for k, v in outputs.items() if k in FLOAT_KEYS}
    rest = {k: v for k, v in outputs.items() if k not in FLOAT_KEYS}

    @jax.jit
    def run(floats, rest):
        fn = lambda fl: objectives.total_loss(terms, fl | rest, mesh)
        (loss, metrics), grads = jax.value_and_grad(fn, has_aux=True)(floats)
        return loss, metrics, grads

    return jax.device_get(run(floats, rest))


GDT_3VIEWS = {
    "views": ("image_emb", "text_emb", "ssl_a"),
    "view_ids": ((0, 0), (1, 0), (0, 1)),
    "invariant": (True, False),
    "compare": ("differ", "all"),
    "sample_ids": "id_hash",
}

TERMS = [
    [
        ("topic_softmax", 1.0),
        ("topic_bce", 0.5),
        ("topic_mse", 0.25),
        ("topic_triplet", 1.0, {"margin": 0.3}),
        ("topic_contrastive", 1.0, {"symmetric": True, "temperature": 0.2}),
        ("rotation", 1.0),
        ("mocov3", 1.0),
        ("gdt", 1.0, GDT_3VIEWS),
    ],
    [
        ("topic_triplet", 1.0, {"negatives": "random"}),
        ("mocov3", 1.0, {"chunk_size": 12}),
        ("gdt", 1.0, GDT_3VIEWS | {"chunk_size": 10, "temperature": 0.1}),
    ],
]


@pytest.mark.parametrize("terms", TERMS, ids=["dense", "random+chunked"])
def test_sharded_equals_single_device(mesh, terms):
    outputs = _outputs()
    loss_1, metrics_1, grads_1 = _run(terms, outputs, None)
    loss_8, metrics_8, grads_8 = _run(terms, outputs, mesh)
    np.testing.assert_allclose(loss_8, loss_1, **TOL)
    assert set(metrics_8) == set(metrics_1)
    for k in metrics_1:
        np.testing.assert_allclose(metrics_8[k], metrics_1[k], **TOL, err_msg=k)
    for k in grads_1:
        np.testing.assert_allclose(grads_8[k], grads_1[k], **TOL, err_msg=k)
    assert np.any(grads_1["pred_a"] != 0)
    assert np.all(grads_1["key_a"] == 0) and np.all(grads_1["topics"] == 0)
