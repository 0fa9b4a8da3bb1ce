"""Each loss against an independent float64 numpy implementation of its paper formula."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmssl_jax import objectives
from mmssl_jax.objectives import core

TOL = dict(rtol=1e-5, atol=1e-5)


def _jit(fn):
    """fn under jax.jit with keyword arguments static (one compile beats eager dispatch)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return jax.jit(functools.partial(fn, **kwargs))(*args)

    return wrapped


clip_loss = _jit(objectives.clip_loss)
simclr_loss = _jit(objectives.simclr_loss)
unicl_loss = _jit(objectives.unicl_loss)
supcon_loss = _jit(objectives.supcon_loss)
siglip_loss = _jit(objectives.siglip_loss)
masked_contrastive = _jit(objectives.masked_contrastive)


def total_loss(terms, outputs):
    return jax.jit(lambda o: objectives.total_loss(terms, o, None))(outputs)


# ---- float64 numpy references, written from the formulas ---------------------------------


def np_normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_clip(img, txt, scale):
    """CLIP: mean of the two cross-entropies with the pair on the diagonal."""
    logits = scale * np_normalize(img) @ np_normalize(txt).T
    idx = np.arange(len(img))
    i2t = -np_log_softmax(logits)[idx, idx].mean()
    t2i = -np_log_softmax(logits.T)[idx, idx].mean()
    acc_i = (logits.argmax(1) == idx).mean()
    acc_t = (logits.T.argmax(1) == idx).mean()
    return (i2t + t2i) / 2, acc_i, acc_t


def np_simclr(za, zb, tau):
    """SLIP's NT-Xent: CE([ab | aa - 1e9 I]) and CE([ba | bb - 1e9 I]) on the partner."""
    qa, qb = np_normalize(za), np_normalize(zb)
    n = len(qa)
    idx = np.arange(n)
    big = 1e9 * np.eye(n)
    la = np.concatenate([qa @ qb.T / tau, qa @ qa.T / tau - big], axis=1)
    lb = np.concatenate([qb @ qa.T / tau, qb @ qb.T / tau - big], axis=1)
    loss = (-np_log_softmax(la)[idx, idx].mean() - np_log_softmax(lb)[idx, idx].mean()) / 2
    return loss, (la.argmax(1) == idx).mean()


def np_unicl(img, txt, labels, scale):
    """UniCL Algorithm 1: y = label + 1 (0 = caption), TargetM, bidirectional SoftCE."""
    y = np.asarray(labels) + 1
    cap = int((y == 0).sum())
    cls_max = int(y[y > 0].max()) if (y > 0).any() else 0
    y = y.copy()
    y[y == 0] = np.arange(cls_max + 1, cls_max + cap + 1)
    T = (y[:, None] == y[None, :]).astype(np.float64)
    S = scale * np_normalize(img) @ np_normalize(txt).T

    def soft_ce(S, T):
        return np.mean(-(T * np_log_softmax(S)).sum(1) / T.sum(1))

    return (soft_ce(S, T) + soft_ce(S.T, T.T)) / 2


def np_supcon(z, labels, tau):
    """Khosla et al. L_out with a loop over anchors; z [n, V, d]; label < 0 = own class."""
    n, V, _ = z.shape
    q = np_normalize(z).reshape(n * V, -1)
    cls = [("c", int(lab)) if lab >= 0 else ("s", i) for i, lab in enumerate(labels)]
    ids = [cls[k // V] for k in range(n * V)]
    losses = []
    for i in range(n * V):
        others = [a for a in range(n * V) if a != i]
        pos = [p for p in others if ids[p] == ids[i]]
        if not pos:
            continue
        denom = sum(np.exp(q[i] @ q[a] / tau) for a in others)
        losses.append(-np.mean([np.log(np.exp(q[i] @ q[p] / tau) / denom) for p in pos]))
    return float(np.mean(losses)) if losses else 0.0


def np_siglip(img, txt, scale, bias):
    """-(1/N) sum_ij log sigmoid(z_ij (s <x_i, y_j> + b)), z = +1 on the diagonal, -1 off."""
    logits = scale * np_normalize(img) @ np_normalize(txt).T + bias
    z = 2 * np.eye(len(img)) - 1
    return np.logaddexp(0.0, -z * logits).sum() / len(img)


def np_masked(a, b, P, W, scale):
    """The general formula: mean over rows with positives of -sum_j P_ij/|P_i| log p_ij,
    p over the valid columns."""
    logits = scale * np_normalize(a) @ np_normalize(b).T
    rows = []
    for i in range(len(a)):
        if P[i].sum() == 0:
            continue
        cols = np.flatnonzero(W[i])
        lse = np.log(np.exp(logits[i, cols]).sum())
        rows.append(-(P[i] * (logits[i] - lse))[P[i] > 0].sum() / P[i].sum())
    return float(np.mean(rows)) if rows else 0.0


def randn(rng, *shape):
    return rng.normal(size=shape).astype(np.float32)


# ---- CLIP ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 16])
def test_clip_matches_numpy(n):
    rng = np.random.default_rng(n)
    img, txt = randn(rng, n, 8), randn(rng, n, 8)
    loss, metrics = clip_loss(img, txt, 14.0)
    ref, acc_i, acc_t = np_clip(img, txt, 14.0)
    np.testing.assert_allclose(loss, ref, **TOL)
    np.testing.assert_allclose(metrics["i2t_acc"], acc_i, **TOL)
    np.testing.assert_allclose(metrics["t2i_acc"], acc_t, **TOL)
    assert float(metrics["scale"]) == 14.0
    if n == 1:
        assert abs(float(loss)) < 1e-6


def test_clip_accuracy_is_one_for_identical_pairs():
    x = randn(np.random.default_rng(0), 12, 16)
    loss, metrics = clip_loss(x, 3 * x, 100.0)
    assert float(metrics["i2t_acc"]) == 1.0 and float(metrics["t2i_acc"]) == 1.0
    assert float(loss) < 1e-3


def test_clip_loss_is_float32_for_bfloat16_inputs():
    rng = np.random.default_rng(1)
    img = jnp.asarray(randn(rng, 6, 8), jnp.bfloat16)
    txt = jnp.asarray(randn(rng, 6, 8), jnp.bfloat16)
    loss, _ = clip_loss(img, txt, 10.0)
    assert loss.dtype == jnp.float32
    ref, _, _ = np_clip(np.asarray(img, np.float32), np.asarray(txt, np.float32), 10.0)
    np.testing.assert_allclose(loss, ref, **TOL)


def _loss_and_grads(fn, *args):
    grad_fn = jax.value_and_grad(lambda *a: fn(*a)[0], argnums=tuple(range(len(args))))
    return jax.jit(grad_fn)(*args)


@pytest.mark.parametrize("chunk", [1, 3, 16, 100])
def test_clip_chunked_equals_dense(chunk):
    rng = np.random.default_rng(chunk)
    img, txt = randn(rng, 16, 8), randn(rng, 16, 8)
    scale = jnp.float32(20.0)
    dense = _loss_and_grads(lambda i, t, s: clip_loss(i, t, s), img, txt, scale)
    chunked = _loss_and_grads(lambda i, t, s: clip_loss(i, t, s, chunk_size=chunk), img, txt, scale)
    np.testing.assert_allclose(chunked[0], dense[0], **TOL)
    for g_c, g_d in zip(chunked[1], dense[1], strict=True):
        np.testing.assert_allclose(g_c, g_d, **TOL)
    _, m_d = clip_loss(img, txt, scale)
    _, m_c = clip_loss(img, txt, scale, chunk_size=chunk)
    for k in m_d:
        np.testing.assert_allclose(m_c[k], m_d[k], **TOL)


def _numeric_grad(f, x, eps=1e-6):
    """Central differences of a float64 numpy function."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[idx] = eps
        g[idx] = (f(x + d) - f(x - d)) / (2 * eps)
    return g


@pytest.mark.parametrize("chunk", [None, 2])
def test_clip_gradient_matches_finite_differences(chunk):
    rng = np.random.default_rng(40)
    img, txt, scale = randn(rng, 5, 3), randn(rng, 5, 3), np.float32(6.0)
    _, (g_img, g_txt, g_scale) = _loss_and_grads(
        lambda i, t, s: clip_loss(i, t, s, chunk_size=chunk), img, txt, scale
    )
    np.testing.assert_allclose(g_img, _numeric_grad(lambda x: np_clip(x, txt, 6.0)[0], img), **TOL)
    np.testing.assert_allclose(g_txt, _numeric_grad(lambda x: np_clip(img, x, 6.0)[0], txt), **TOL)
    np.testing.assert_allclose(
        g_scale, _numeric_grad(lambda s: np_clip(img, txt, s)[0], 6.0), **TOL
    )


def test_siglip_gradient_matches_finite_differences():
    rng = np.random.default_rng(41)
    img, txt = randn(rng, 4, 3), randn(rng, 4, 3)
    _, (g_img, g_bias) = _loss_and_grads(
        lambda i, b: siglip_loss(i, txt, 5.0, b, chunk_size=3), img, np.float32(-1.0)
    )
    np.testing.assert_allclose(
        g_img, _numeric_grad(lambda x: np_siglip(x, txt, 5.0, -1.0), img), **TOL
    )
    np.testing.assert_allclose(
        g_bias, _numeric_grad(lambda b: np_siglip(img, txt, 5.0, b), -1.0), **TOL
    )


def test_chunk_size_must_be_positive():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        clip_loss(x, x, 1.0, chunk_size=0)


# ---- SimCLR --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 9])
def test_simclr_matches_numpy(n):
    rng = np.random.default_rng(10 + n)
    za, zb = randn(rng, n, 8), randn(rng, n, 8)
    loss, metrics = simclr_loss(za, zb, 0.1)
    ref, acc = np_simclr(za, zb, 0.1)
    np.testing.assert_allclose(loss, ref, **TOL)
    np.testing.assert_allclose(metrics["acc"], acc, **TOL)
    chunked, _ = simclr_loss(za, zb, 0.1, chunk_size=4)
    np.testing.assert_allclose(chunked, ref, **TOL)


# ---- UniCL ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels",
    [
        [-1, 3, 3, -1, 0, 0, 0, -1, 7, -1],  # mixed, duplicate labels
        [2] * 10,  # all one label
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # all labelled, distinct
    ],
)
def test_unicl_matches_numpy(labels):
    rng = np.random.default_rng(len(set(labels)))
    img, txt = randn(rng, 10, 8), randn(rng, 10, 8)
    labels = np.array(labels, np.int32)
    loss, metrics = unicl_loss(img, txt, labels, 12.0)
    np.testing.assert_allclose(loss, np_unicl(img, txt, labels, 12.0), **TOL)
    chunked, _ = unicl_loss(img, txt, labels, 12.0, chunk_size=3)
    np.testing.assert_allclose(chunked, loss, **TOL)
    assert 0.0 <= float(metrics["i2t_acc"]) <= 1.0


def test_unicl_without_labels_is_exactly_clip():
    rng = np.random.default_rng(3)
    img, txt = randn(rng, 8, 8), randn(rng, 8, 8)
    labels = -np.ones(8, np.int32)
    scale = jnp.float32(9.0)
    u = _loss_and_grads(lambda i, t, s: unicl_loss(i, t, labels, s), img, txt, scale)
    c = _loss_and_grads(lambda i, t, s: clip_loss(i, t, s), img, txt, scale)
    assert float(u[0]) == float(c[0])
    for g_u, g_c in zip(u[1], c[1], strict=True):
        np.testing.assert_array_equal(g_u, g_c)


def test_unicl_target_ids():
    ids = np.asarray(objectives.unicl_target_ids(jnp.array([-1, 4, -1, 4]), offset=10))
    np.testing.assert_array_equal(ids, [-11, 4, -13, 4])


# ---- SupCon --------------------------------------------------------------------------------


@pytest.mark.parametrize("views", [1, 2])
def test_supcon_matches_numpy(views):
    rng = np.random.default_rng(20 + views)
    z = randn(rng, 8, views, 6)
    labels = np.array([1, 1, -1, 2, 5, 1, -1, 2], np.int32)
    loss, metrics = supcon_loss(z, labels, 0.2)
    np.testing.assert_allclose(loss, np_supcon(z, labels, 0.2), **TOL)
    chunked, _ = supcon_loss(z, labels, 0.2, chunk_size=5)
    np.testing.assert_allclose(chunked, loss, **TOL)
    assert 0.0 <= float(metrics["acc"]) <= 1.0


def test_supcon_two_views_without_labels_is_simclr():
    rng = np.random.default_rng(4)
    za, zb = randn(rng, 7, 8), randn(rng, 7, 8)
    sup, _ = supcon_loss(jnp.stack([za, zb], 1), -np.ones(7, np.int32), 0.1)
    sim, _ = simclr_loss(za, zb, 0.1)
    np.testing.assert_allclose(sup, sim, **TOL)


def test_supcon_single_view_without_positives_is_zero_not_nan():
    z = randn(np.random.default_rng(5), 6, 4)
    labels = np.array([-1, -1, 3, -1, 4, -1], np.int32)  # nobody shares a class
    loss, grad = jax.jit(jax.value_and_grad(lambda z: supcon_loss(z, labels)[0]))(z)
    assert float(loss) == 0.0
    assert np.all(np.isfinite(grad)) and not np.any(grad)


# ---- SigLIP --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7])
def test_siglip_matches_numpy(n):
    rng = np.random.default_rng(30 + n)
    img, txt = randn(rng, n, 8), randn(rng, n, 8)
    loss, metrics = siglip_loss(img, txt, 10.0, -3.0)
    np.testing.assert_allclose(loss, np_siglip(img, txt, 10.0, -3.0), **TOL)
    assert float(metrics["bias"]) == -3.0
    for chunk in (1, 3):
        chunked = _loss_and_grads(
            lambda i, t, c=chunk: siglip_loss(i, t, 10.0, -3.0, chunk_size=c), img, txt
        )
        dense = _loss_and_grads(lambda i, t: siglip_loss(i, t, 10.0, -3.0), img, txt)
        np.testing.assert_allclose(chunked[0], dense[0], **TOL)
        for g_c, g_d in zip(chunked[1], dense[1], strict=True):
            np.testing.assert_allclose(g_c, g_d, **TOL)


# ---- the masked core and GDT masks --------------------------------------------------------


def test_masked_contrastive_matches_numpy_with_empty_rows():
    rng = np.random.default_rng(6)
    a, b = randn(rng, 7, 5), randn(rng, 9, 5)
    W = rng.random((7, 9)) < 0.7
    W[:, 0] = True
    P = (rng.random((7, 9)) < 0.3) & W
    P[2] = False  # a row without positives
    W[4] = False  # a row with no valid column at all (so no positives either)
    P[4] = False
    loss, metrics = masked_contrastive(a, b, P, W, 5.0)
    np.testing.assert_allclose(loss, np_masked(a, b, P, W, 5.0), **TOL)
    grads = jax.jit(jax.grad(lambda a, b: masked_contrastive(a, b, P, W, 5.0)[0], (0, 1)))(a, b)
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert not np.any(grads[0][2]) and not np.any(grads[0][4])


def test_masked_contrastive_soft_positives():
    rng = np.random.default_rng(7)
    a, b = randn(rng, 4, 5), randn(rng, 6, 5)
    P = rng.random((4, 6)) * (rng.random((4, 6)) < 0.5)
    P[:, 1] = 0.5
    W = np.ones((4, 6), bool)
    loss, _ = masked_contrastive(a, b, P, W, 3.0)
    np.testing.assert_allclose(loss, np_masked(a, b, P, W, 3.0), **TOL)


def test_masked_contrastive_without_any_positive_is_zero():
    a = randn(np.random.default_rng(8), 3, 4)
    zeros = np.zeros((3, 3), bool)
    fn = jax.value_and_grad(lambda a: masked_contrastive(a, a, zeros, ~zeros, 10.0)[0])
    loss, grad = jax.jit(fn)(a)
    assert float(loss) == 0.0 and np.all(np.isfinite(grad))


def test_gdt_masks_give_clip_and_simclr():
    rng = np.random.default_rng(9)
    n = 6
    img, txt = randn(rng, n, 8), randn(rng, n, 8)
    ids = np.arange(n)
    P, W = objectives.gdt_masks(ids, ids, np.zeros(n), np.zeros(n), invariant=True)
    i2t, _ = masked_contrastive(img, txt, P, W, 14.0)
    t2i, _ = masked_contrastive(txt, img, P.T, W.T, 14.0)
    clip, _ = clip_loss(img, txt, 14.0)
    np.testing.assert_allclose((i2t + t2i) / 2, clip, **TOL)

    za, zb = randn(rng, n, 8), randn(rng, n, 8)
    views = np.concatenate([za, zb])
    sample, trans = np.tile(ids, 2), np.repeat([0, 1], n)
    P, W = objectives.gdt_masks(sample, sample, trans, trans, True, exclude_identical=True)
    loss, _ = masked_contrastive(views, views, P, W, 10.0)
    simclr, _ = simclr_loss(za, zb, 0.1)
    np.testing.assert_allclose(loss, simclr, **TOL)


def test_gdt_masks_distinctive_transformation_makes_hard_negatives():
    sample = np.array([0, 0, 1, 1])
    trans = np.array([0, 1, 0, 1])
    P_inv, W = objectives.gdt_masks(sample, sample, trans, trans, True, exclude_identical=True)
    P_var, _ = objectives.gdt_masks(sample, sample, trans, trans, False, exclude_identical=True)
    expected_inv = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], bool)
    np.testing.assert_array_equal(P_inv, expected_inv)
    assert not np.any(P_var)  # only the identical view would match, and it is excluded
    np.testing.assert_array_equal(W, ~np.eye(4, dtype=bool))
    # Cross-modal, distinctive: positive only on the same sample and transformation.
    P, _ = objectives.gdt_masks(sample, sample, trans, trans, invariant=False)
    np.testing.assert_array_equal(P, np.eye(4, dtype=bool))


def test_column_offset_single_device_is_zero():
    assert int(core.column_offset(5, None)) == 0


# ---- registry ------------------------------------------------------------------------------


def _outputs(rng, n=8, d=6):
    return {
        "image_emb": randn(rng, n, d),
        "text_emb": randn(rng, n, d),
        "ssl_a": randn(rng, n, d),
        "ssl_b": randn(rng, n, d),
        "logit_scale": np.float32(11.0),
        "logit_bias": np.float32(-4.0),
        "label": np.array([-1, 1, 1, -1, 2, -1, 2, -1], np.int32)[:n],
    }


def test_get_term_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="clip.*siglip.*simclr.*supcon.*unicl"):
        objectives.get_term("clap")


def test_get_term_rejects_unknown_option():
    with pytest.raises(ValueError, match="temperature"):
        objectives.get_term("simclr", temprature=0.2)


def test_needed_inputs():
    assert objectives.needed_inputs([("clip", 1.0), ("simclr", 1.0)]) == {
        "image_emb",
        "text_emb",
        "logit_scale",
        "ssl_a",
        "ssl_b",
    }
    assert objectives.needed_inputs(["unicl"]) == {"image_emb", "text_emb", "logit_scale", "label"}
    assert "logit_bias" in objectives.needed_inputs([("siglip", 1.0)])


def test_total_loss_is_the_weighted_sum():
    o = _outputs(np.random.default_rng(11))
    loss, metrics = total_loss([("clip", 1.0), ("simclr", 0.5, {"temperature": 0.2})], o)
    clip, clip_m = clip_loss(o["image_emb"], o["text_emb"], o["logit_scale"])
    simclr, _ = simclr_loss(o["ssl_a"], o["ssl_b"], 0.2)
    np.testing.assert_allclose(loss, clip + 0.5 * simclr, **TOL)
    np.testing.assert_allclose(metrics["loss"], loss, **TOL)
    np.testing.assert_allclose(metrics["simclr/loss"], simclr, **TOL)
    np.testing.assert_allclose(metrics["clip/i2t_acc"], clip_m["i2t_acc"], **TOL)
    assert {"clip/t2i_acc", "clip/scale", "simclr/acc"} <= set(metrics)


def test_total_loss_errors():
    o = _outputs(np.random.default_rng(12))
    with pytest.raises(ValueError, match="logit_bias"):
        total_loss([("siglip", 1.0)], {k: o[k] for k in ("image_emb", "text_emb")})
    with pytest.raises(ValueError, match="once"):
        total_loss([("clip", 1.0), ("clip", 2.0)], o)


def test_register_term():
    @objectives.register_term("test_mean_norm", {"image_emb"})
    def _term(outputs, axis_name, *, power: float = 1.0):
        value = jnp.mean(jnp.linalg.norm(outputs["image_emb"], axis=-1) ** power)
        return value, {"value": value}

    o = _outputs(np.random.default_rng(13))
    loss, metrics = total_loss([("test_mean_norm", 2.0, {"power": 2.0})], o)
    expected = 2 * np.mean(np.sum(o["image_emb"].astype(np.float64) ** 2, -1))
    np.testing.assert_allclose(loss, expected, **TOL)
    assert "test_mean_norm/value" in metrics
    with pytest.raises(ValueError, match="already registered"):
        objectives.register_term("clip", {"image_emb"})(_term)
