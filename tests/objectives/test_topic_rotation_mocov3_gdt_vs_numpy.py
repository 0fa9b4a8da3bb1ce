"""Topic, rotation, MoCo v3 and GDT terms against independent float64 numpy formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmssl_jax import objectives
from mmssl_jax.objectives import rotation

TOL = dict(rtol=1e-5, atol=1e-5)
B, K = 12, 7


def np_normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(B, K)).astype(np.float32)
    topics = rng.dirichlet(np.full(K, 0.3), size=B).astype(np.float32)
    topics[5] = topics[2]  # a duplicated caption: never a triplet negative of its twin
    return pred, topics


def _jit(fn, **kw):
    return jax.jit(functools.partial(fn, **kw))


# ---- topic losses ---------------------------------------------------------------------------


def test_topic_softmax(data):
    pred, t = data
    q = t / t.sum(1, keepdims=True)
    expect = -(q * np_log_softmax(pred.astype(np.float64))).sum(1).mean()
    loss, m = _jit(objectives.topic_softmax_loss)(pred, t)
    np.testing.assert_allclose(loss, expect, **TOL)
    np.testing.assert_allclose(m["top1"], (pred.argmax(1) == t.argmax(1)).mean())


def test_topic_bce(data):
    pred, t = data
    x = pred.astype(np.float64)
    sig = 1 / (1 + np.exp(-x))
    expect = -(t * np.log(sig) + (1 - t) * np.log(1 - sig)).sum(1).mean()
    loss, _ = _jit(objectives.topic_bce_loss)(pred, t)
    np.testing.assert_allclose(loss, expect, **TOL)


def test_topic_mse(data):
    pred, t = data
    expect = 0.5 * ((pred.astype(np.float64) - t) ** 2).sum(1).mean()
    loss, _ = _jit(objectives.topic_mse_loss)(pred, t)
    np.testing.assert_allclose(loss, expect, **TOL)


def np_triplet(pred, t, margin, neg=None):
    """Loops over anchors; the negative pool is every sample with a different topic vector;
    `neg` None picks the hardest (closest to the anchor)."""
    p, tn = np_normalize(pred), np_normalize(t)
    losses = []
    for i in range(len(p)):
        pool = [j for j in range(len(p)) if not np.array_equal(t[j], t[i])]
        if not pool:
            continue
        d = {j: ((p[i] - tn[j]) ** 2).sum() for j in pool}
        j = min(pool, key=d.get) if neg is None else int(neg[i])
        assert j in pool
        losses.append(max(0.0, margin + ((p[i] - tn[i]) ** 2).sum() - d[j]))
    return np.mean(losses)


def test_topic_triplet_hardest(data):
    pred, t = data
    loss, m = _jit(objectives.topic_triplet_loss, margin=0.3)(pred, t)
    np.testing.assert_allclose(loss, np_triplet(pred, t, 0.3), **TOL)
    assert 0 < m["active"] <= 1


def test_topic_triplet_random_negatives_are_valid_and_vary(data):
    from mmssl_jax.objectives.topics import triplet_negatives

    pred, t = data
    p, tn = np_normalize(pred).astype(np.float32), np_normalize(t).astype(np.float32)
    fn = jax.jit(lambda idx: triplet_negatives(p, tn, tn, idx, "random")[0])
    picks = np.stack([np.asarray(fn(np.arange(B) + 100 * s)) for s in range(40)])
    for i in range(B):
        twin = {2: 5, 5: 2}.get(i)
        assert i not in picks[:, i] and twin not in picks[:, i]
        assert len(set(picks[:, i])) >= 6  # draws differ with the index
    neg = np.asarray(fn(np.arange(B)))
    loss, _ = _jit(objectives.topic_triplet_loss, margin=0.5, negatives="random")(
        pred, t, np.arange(B)
    )
    np.testing.assert_allclose(loss, np_triplet(pred, t, 0.5, neg), **TOL)


@pytest.mark.parametrize("symmetric", [False, True])
def test_topic_contrastive(data, symmetric):
    pred, t = data
    logits = np_normalize(pred) @ np_normalize(t).T / 0.2
    idx = np.arange(B)
    i2t = -np_log_softmax(logits)[idx, idx].mean()
    t2i = -np_log_softmax(logits.T)[idx, idx].mean()
    expect = (i2t + t2i) / 2 if symmetric else i2t
    loss, m = _jit(objectives.topic_contrastive_loss, temperature=0.2, symmetric=symmetric)(pred, t)
    np.testing.assert_allclose(loss, expect, **TOL)
    np.testing.assert_allclose(m["acc"], (logits.argmax(1) == idx).mean())


def test_topic_targets_get_no_gradient(data):
    pred, t = data
    for name in ["topic_softmax", "topic_bce", "topic_mse", "topic_triplet", "topic_contrastive"]:
        fn = objectives.get_term(name).fn
        out = {"topic_pred": pred, "topics": t, "index": np.arange(B)}
        g = jax.grad(lambda o, fn=fn: fn(o, None)[0], allow_int=True)(out)
        assert np.all(np.asarray(g["topics"]) == 0), name
        assert np.any(np.asarray(g["topic_pred"]) != 0), name


# ---- rotation -------------------------------------------------------------------------------


def test_rotate_batch_matches_np_rot90():
    images = np.random.default_rng(1).integers(0, 255, size=(16, 5, 5, 3), dtype=np.uint8)
    rotated, k = jax.jit(rotation.rotate_batch)(images, jax.random.key(3), np.arange(16))
    k = np.asarray(k)
    assert set(k) == {0, 1, 2, 3}
    for i in range(16):
        np.testing.assert_array_equal(rotated[i], np.rot90(images[i], k[i], axes=(0, 1)))
    # Same (key, index) -> same k, whatever the batch it lands in.
    _, k2 = rotation.rotate_batch(images[::-1], jax.random.key(3), np.arange(16)[::-1])
    np.testing.assert_array_equal(np.asarray(k2)[::-1], k)


def test_rotation_loss():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(B, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=B)
    expect = -np_log_softmax(logits.astype(np.float64))[np.arange(B), labels].mean()
    loss, m = _jit(objectives.rotation_loss)(logits, labels)
    np.testing.assert_allclose(loss, expect, **TOL)
    np.testing.assert_allclose(m["acc"], (logits.argmax(1) == labels).mean())


# ---- MoCo v3 --------------------------------------------------------------------------------


def np_mocov3(qa, qb, ka, kb, T):
    def ctr(q, k):
        logits = np_normalize(q) @ np_normalize(k).T / T
        return -np_log_softmax(logits)[np.arange(len(q)), np.arange(len(q))].mean() * 2 * T

    return ctr(qa, kb) + ctr(qb, ka)


def test_mocov3_loss_and_stop_gradient_on_keys():
    rng = np.random.default_rng(3)
    qa, qb, ka, kb = (rng.normal(size=(B, 6)).astype(np.float32) for _ in range(4))
    loss, _ = _jit(objectives.mocov3_loss, temperature=0.2)(qa, qb, ka, kb)
    np.testing.assert_allclose(loss, np_mocov3(qa, qb, ka, kb, 0.2), **TOL)
    grads = jax.grad(lambda *a: objectives.mocov3_loss(*a)[0], argnums=(0, 1, 2, 3))(qa, qb, ka, kb)
    assert np.any(np.asarray(grads[0]) != 0) and np.any(np.asarray(grads[1]) != 0)
    assert np.all(np.asarray(grads[2]) == 0) and np.all(np.asarray(grads[3]) == 0)


# ---- GDT ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emb():
    rng = np.random.default_rng(4)
    return {k: rng.normal(size=(B, 6)).astype(np.float32) for k in ("a", "b", "c")}


def _value_and_grads(fn, *args):
    return jax.jit(jax.value_and_grad(lambda *a: fn(*a)[0], argnums=(0, 1)))(*args)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_gdt_equals_clip(emb, chunk_size):
    gdt = functools.partial(
        objectives.gdt_loss,
        view_ids=((0,), (1,)),
        invariant=(True,),
        compare=("differ",),
        chunk_size=chunk_size,
    )
    got = _value_and_grads(lambda a, b: gdt([a, b], scale=14.0), emb["a"], emb["b"])
    want = _value_and_grads(lambda a, b: objectives.clip_loss(a, b, 14.0), emb["a"], emb["b"])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_gdt_equals_simclr(emb, chunk_size):
    gdt = functools.partial(
        objectives.gdt_loss,
        view_ids=((0,), (1,)),
        invariant=(True,),
        compare=("all",),
        chunk_size=chunk_size,
    )
    got = _value_and_grads(lambda a, b: gdt([a, b], scale=1 / 0.1), emb["a"], emb["b"])
    want = _value_and_grads(lambda a, b: objectives.simclr_loss(a, b, 0.1), emb["a"], emb["b"])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def np_gdt(views, view_ids, invariant, compare, scale, sample_ids):
    """The GDT formula by explicit loops over (sample, view) pairs."""
    V, n = len(views), len(views[0])
    z = [np_normalize(v) for v in views]
    items = [(i, v) for i in range(n) for v in range(V)]
    losses = []
    for i, v in items:
        w, c, logit = [], [], []
        for j, u in items:
            ok = (i, v) != (j, u)
            pos = sample_ids[i] == sample_ids[j]
            for m in range(len(invariant)):
                same = view_ids[v][m] == view_ids[u][m]
                ok &= {"all": True, "differ": not same, "same": same}[compare[m]]
                pos &= invariant[m] or same
            w.append(ok)
            c.append(pos and ok)
            logit.append(scale * z[v][i] @ z[u][j])
        w, c, logit = np.array(w), np.array(c, float), np.array(logit)
        if c.sum() == 0:
            continue
        lse = np.log(np.exp(logit[w] - logit[w].max()).sum()) + logit[w].max()
        losses.append(-(c / c.sum() * (logit - lse))[w].sum())
    return np.mean(losses)


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_gdt_distinctive_components_match_formula(emb, chunk_size):
    """Image views a, c (augmentations 0, 1) and text view b: modality invariant but compared
    only across modalities; augmentation distinctive, so the other augmentation's image
    of the same sample is a hard negative for the text; duplicate sample ids are positives."""
    views = [emb["a"], emb["b"], emb["c"]]
    view_ids = ((0, 0), (1, 0), (0, 1))
    invariant, compare = (True, False), ("differ", "all")
    sample_ids = np.array([0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 1, 9], np.int32)
    loss, _ = jax.jit(
        lambda vs, s: objectives.gdt_loss(
            vs, view_ids, invariant, compare, 5.0, sample_ids=s, chunk_size=chunk_size
        )
    )(views, sample_ids)
    expect = np_gdt(views, view_ids, invariant, compare, 5.0, sample_ids)
    np.testing.assert_allclose(loss, expect, **TOL)


def test_gdt_term_defaults_to_clip_and_options_set_needs(emb):
    out = {"image_emb": emb["a"], "text_emb": emb["b"], "logit_scale": jnp.float32(10.0)}
    gdt, _ = objectives.total_loss([("gdt", 1.0)], out, None)
    clip, _ = objectives.total_loss([("clip", 1.0)], out, None)
    np.testing.assert_allclose(gdt, clip, rtol=1e-6)
    spec = ("gdt", 1.0, {"views": ("ssl_a", "ssl_b"), "compare": ("all",), "temperature": 0.1})
    assert objectives.needed_inputs([spec]) == {"ssl_a", "ssl_b"}
    spec = ("gdt", 1.0, {"sample_ids": "id_hash"})
    assert objectives.needed_inputs([spec]) == {"image_emb", "text_emb", "logit_scale", "id_hash"}
    with pytest.raises(ValueError, match="one id per component"):
        objectives.gdt_loss([emb["a"], emb["b"]], ((0,), (1, 2)), (True,), ("all",), 1.0)
