"""Tests for mmssl_jax.models: published parameter counts, shapes, masks, dtypes, init."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmssl_jax.models import heads, registry, text
from mmssl_jax.models.model import LOGIT_BIAS_INIT, LOGIT_SCALE_INIT, MultimodalModel

# Threefry kernels take seconds each to compile on a 2-core CPU; "rbg" keys compile much faster
# and draw from the same distributions, so the init statistics tested here are unchanged.
KEY = jax.random.key(0, impl="rbg")
F32 = jnp.dtype(jnp.float32)


def n_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def abstract_init(module, *inputs):
    """Shapes of `module.init(...)` without materialising anything."""
    return jax.eval_shape(module.init, KEY, *inputs)


def init(module, *inputs, **kw):
    """`module.init` as one compiled program (eager init compiles every op separately)."""
    return jax.jit(lambda key, *a: module.init(key, *a, **kw))(KEY, *inputs)


def apply(module, variables, *inputs, **kw):
    return jax.jit(lambda v, *a: module.apply(v, *a, **kw))(variables, *inputs)


def images(size: int, batch: int = 2, seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, 3)), F32)


def layer_norm(x, params, eps):
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * params["scale"] + params["bias"]


# --- published sizes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [("vit_s16", 21_665_664), ("vit_b16", 85_798_656), ("vit_l16", 303_301_632)],
)
def test_vit_param_count_matches_timm(name, expected):
    variables = abstract_init(registry.get_image_encoder(name), jnp.zeros((1, 224, 224, 3)))
    assert n_params(variables["params"]) == expected


def test_clip_text_param_count_with_projection():
    encoder = registry.get_text_encoder("clip_text", 49_408)
    variables = abstract_init(encoder, jnp.zeros((1, 77), jnp.int32))
    projection = abstract_init(heads.Projection(512), jnp.zeros((1, 512)))
    assert projection["params"]["proj"]["kernel"].shape == (512, 512)
    assert n_params(variables["params"]) + n_params(projection["params"]) == 63_428_096


def test_resnet50_param_count_matches_torchvision_without_fc():
    # torchvision resnet50 has 25,557,032 params; its 2048x1000 fc (+bias) is 2,049,000 of them.
    enc = registry.get_image_encoder("resnet50")
    out, variables = jax.eval_shape(enc.init_with_output, KEY, jnp.zeros((1, 224, 224, 3)))
    assert n_params(variables["params"]) == 23_508_032
    assert "batch_stats" in variables
    assert out["feature"].shape == (1, 2048)
    assert [b.shape[-1] for b in out["blocks"]] == [256, 512, 1024, 2048]


def test_unknown_names_and_fields_raise():
    with pytest.raises(ValueError, match="vit_s16"):
        registry.get_image_encoder("vit_huge")
    with pytest.raises(ValueError, match="clip_text"):
        registry.get_text_encoder("roberta", 100)
    with pytest.raises(ValueError, match="no fields"):
        registry.get_image_encoder("vit_tiny", widht=3)


# --- ViT ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vit():
    """One depth-2 vit_tiny init shared by the ViT tests (pool, dtype, remat add no params)."""
    enc = registry.get_image_encoder("vit_tiny", depth=2)
    x = images(32)
    return enc, init(enc, x), x


def test_vit_tiny_shapes_and_blocks(tiny_vit):
    enc, variables, x = tiny_vit
    out = apply(enc, variables, x)
    assert out["feature"].shape == (2, 128)
    assert len(out["blocks"]) == 2
    assert all(b.shape == (2, 128) for b in out["blocks"])
    assert variables["params"]["pos_embed"].shape == (1, 1 + 64, 128)
    # The feature is the class token after a LayerNorm (zero bias at init): zero channel mean.
    np.testing.assert_allclose(out["feature"].mean(-1), 0.0, atol=1e-4)
    # blocks[-1] is the class token before the final norm.
    ln = variables["params"]["norm"]
    np.testing.assert_allclose(layer_norm(out["blocks"][-1], ln, 1e-6), out["feature"], atol=1e-4)


def test_vit_grid_is_the_normed_patch_tokens_in_image_layout(tiny_vit):
    enc, variables, x = tiny_vit
    out, state = jax.jit(
        lambda v, x: enc.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
    )(variables, x)
    tokens = state["intermediates"]["blocks_1"]["__call__"][0]
    normed = np.asarray(layer_norm(tokens, variables["params"]["norm"], 1e-6))
    assert out["grid"].shape == (2, 8, 8, 128)
    # Row-major patches: token 1 + r * 8 + c is the patch at row r, column c.
    np.testing.assert_allclose(out["grid"][:, 2, 5], normed[:, 1 + 2 * 8 + 5], atol=1e-4)
    np.testing.assert_allclose(out["grid"].reshape(2, 64, 128), normed[:, 1:], atol=1e-4)


def test_vit_gap_is_mean_of_normed_patch_tokens(tiny_vit):
    enc, variables, x = tiny_vit
    gap = enc.clone(pool="gap")  # Same parameters: pooling is parameter-free.
    out, state = jax.jit(
        lambda v, x: gap.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
    )(variables, x)
    tokens = state["intermediates"]["blocks_1"]["__call__"][0]
    normed = layer_norm(tokens, variables["params"]["norm"], 1e-6)
    np.testing.assert_allclose(out["feature"], normed[:, 1:].mean(1), atol=1e-4)
    np.testing.assert_allclose(out["blocks"][-1], tokens[:, 1:].mean(1), atol=1e-5)
    cls_feature = apply(enc, variables, x)["feature"]
    assert not np.allclose(out["feature"], cls_feature, atol=1e-3)


def test_vit_wrong_image_size_raises():
    enc = registry.get_image_encoder("vit_tiny")
    with pytest.raises(ValueError, match="32x32"):
        abstract_init(enc, images(16))
    with pytest.raises(ValueError, match="pool"):
        abstract_init(enc.clone(pool="max"), images(32))


def test_vit_init_statistics_follow_timm(tiny_vit):
    params = tiny_vit[1]["params"]
    assert 0 < float(jnp.abs(params["cls_token"]).max()) < 1e-5
    np.testing.assert_allclose(float(params["pos_embed"].std()), 0.02, rtol=0.1)
    qkv = params["blocks_0"]["attn"]["qkv"]
    np.testing.assert_allclose(float(qkv["kernel"].std()), 0.02, rtol=0.1)
    assert qkv["bias"].shape == (3 * 128,) and float(jnp.abs(qkv["bias"]).max()) == 0.0
    assert params["patch_embed"]["kernel"].shape == (4, 4, 3, 128)
    assert "bias" in params["patch_embed"]


def test_bf16_compute_keeps_float32_params(tiny_vit):
    enc, variables, x = tiny_vit
    bf16 = registry.get_image_encoder("vit_tiny", depth=2, dtype="bfloat16")
    assert jax.tree.structure(abstract_init(bf16, x)) == jax.tree.structure(variables)
    assert {p.dtype for p in jax.tree.leaves(abstract_init(bf16, x))} == {F32}
    out = apply(bf16, variables, x)
    assert out["feature"].dtype == jnp.bfloat16
    assert all(b.dtype == jnp.bfloat16 for b in out["blocks"])
    reference = apply(enc, variables, x)["feature"]
    np.testing.assert_allclose(out["feature"].astype(jnp.float32), reference, atol=0.1)


def test_remat_gives_same_gradients(tiny_vit):
    enc, variables, x = tiny_vit
    # Depth 1 (a subset of the fixture's params) halves the compile time.
    enc = enc.clone(depth=1)
    variables = {"params": {k: v for k, v in variables["params"].items() if k != "blocks_1"}}
    grad = lambda m: jax.grad(lambda v: jnp.sum(m.apply(v, x)["feature"] ** 2))
    g_plain, g_remat = jax.jit(lambda v: (grad(enc)(v), grad(enc.clone(remat=True))(v)))(variables)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# --- text -----------------------------------------------------------------------------------

TEXT_WIDTH, TEXT_LAYERS = 128, 2


@pytest.fixture(scope="module")
def tiny_text():
    enc = registry.get_text_encoder("text_tiny", 100, layers=TEXT_LAYERS)
    return enc, init(enc, jnp.zeros((2, 8), jnp.int32))


def test_text_tiny_shapes(tiny_text):
    enc, variables = tiny_text
    tokens = jnp.array([[5, 6, 7, 3] + [0] * 28, [9] * 31 + [3]], jnp.int32)
    out = apply(enc, variables, tokens)
    assert out["feature"].shape == (2, TEXT_WIDTH)
    assert out["sequence"].shape == (2, 32, TEXT_WIDTH)
    assert variables["params"]["positional_embedding"].shape == (32, TEXT_WIDTH)
    assert variables["params"]["token_embedding"]["embedding"].shape == (100, TEXT_WIDTH)


def test_text_feature_is_taken_at_eos(tiny_text):
    enc, variables = tiny_text
    tokens = jnp.array([[5, 6, 7, 3, 0, 0, 0, 0], [8, 3, 0, 0, 0, 0, 0, 0]], jnp.int32)
    np.testing.assert_array_equal(text.eos_position(tokens), [3, 1])
    out = apply(enc, variables, tokens)
    np.testing.assert_allclose(out["feature"][0], out["sequence"][0, 3], atol=1e-6)
    np.testing.assert_allclose(out["feature"][1], out["sequence"][1, 1], atol=1e-6)
    np.testing.assert_array_equal(text.eos_position(jnp.zeros((1, 4), jnp.int32)), [0])


def test_text_attention_is_causal(tiny_text):
    enc, variables = tiny_text
    tokens = jnp.array([[5, 6, 7, 3, 0, 0, 0, 0]] * 4, jnp.int32)
    tokens = tokens.at[1, 6].set(42)  # after EOS: sequence up to EOS unchanged
    tokens = tokens.at[2, 5].set(0).at[2, 7].set(0)  # after EOS, EOS still at 3: same feature
    tokens = tokens.at[3, 1].set(42)  # before EOS: feature changes
    out = apply(enc, variables, tokens)
    seq, feature = out["sequence"], out["feature"]
    np.testing.assert_array_equal(text.eos_position(tokens), [3, 4, 3, 3])
    np.testing.assert_allclose(seq[1, :4], seq[0, :4], atol=1e-5)
    assert not np.allclose(seq[1, 6], seq[0, 6], atol=1e-3)
    np.testing.assert_allclose(feature[2], feature[0], atol=1e-5)
    assert not np.allclose(feature[3], feature[0], atol=1e-3)


def test_text_context_length_enforced(tiny_text):
    enc, variables = tiny_text
    with pytest.raises(ValueError, match="context_length"):
        enc.apply(variables, jnp.ones((1, 33), jnp.int32))


def test_text_init_std_matches_clip(tiny_text):
    params = tiny_text[1]["params"]
    block = params["resblocks_1"]
    proj_std = TEXT_WIDTH**-0.5 * (2 * TEXT_LAYERS) ** -0.5
    expected = {
        ("attn", "qkv"): TEXT_WIDTH**-0.5,
        ("attn", "proj"): proj_std,
        ("mlp", "fc1"): (2 * TEXT_WIDTH) ** -0.5,
        ("mlp", "fc2"): proj_std,
    }
    for (a, b), std in expected.items():
        np.testing.assert_allclose(float(block[a][b]["kernel"].std()), std, rtol=0.1)
    np.testing.assert_allclose(float(params["token_embedding"]["embedding"].std()), 0.02, rtol=0.1)
    np.testing.assert_allclose(float(params["positional_embedding"].std()), 0.01, rtol=0.1)


# --- heads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_simclr_head_each_norm(norm):
    head = heads.simclr_head(hidden=32, out=8, norm=norm)
    x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, size=(6, 16)), F32)
    variables = init(head, x)
    assert ("batch_stats" in variables) == (norm == "batch")
    (y, state), y_eval = (
        apply(
            head,
            variables,
            x,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=True,
        ),
        apply(head, variables, x, train=False),
    )
    assert y.shape == y_eval.shape == (6, 8)
    normed = state["intermediates"]["norm0"]["__call__"][0] if norm != "none" else None
    if norm == "batch":
        # Training normalises over the batch and moves the running statistics (momentum 0.9).
        np.testing.assert_allclose(normed.mean(0), 0.0, atol=1e-4)
        h = x @ variables["params"]["fc0"]["kernel"] + variables["params"]["fc0"]["bias"]
        np.testing.assert_allclose(
            state["batch_stats"]["norm0"]["mean"], 0.1 * h.mean(0), atol=1e-5
        )
        # Evaluation uses the running averages (initially mean 0, var 1), not the batch.
        assert not np.allclose(y, y_eval, atol=1e-3)
    elif norm == "layer":
        np.testing.assert_allclose(normed.mean(1), 0.0, atol=1e-4)
        np.testing.assert_allclose(y, y_eval, atol=1e-6)
    else:
        assert "norm0" not in state["intermediates"]
        np.testing.assert_allclose(y, y_eval, atol=1e-6)
    kernels = [variables["params"][f"fc{i}"]["kernel"].shape for i in range(3)]
    assert kernels == [(16, 32), (32, 32), (32, 8)]
    assert all("bias" in variables["params"][f"fc{i}"] for i in range(3))


def test_simclr_head_rejects_unknown_norm():
    with pytest.raises(ValueError, match="norm"):
        abstract_init(heads.simclr_head(hidden=4, out=2, norm="group"), jnp.ones((2, 3)))


def test_projection_is_bias_free_with_clip_init():
    variables = init(heads.Projection(64), jnp.ones((1, 400)))
    assert list(variables["params"]["proj"]) == ["kernel"]
    std = float(variables["params"]["proj"]["kernel"].std())
    np.testing.assert_allclose(std, 400**-0.5, rtol=0.1)


# --- ResNet ---------------------------------------------------------------------------------


def test_resnet_tiny_shapes_and_batch_stats():
    enc = registry.get_image_encoder("resnet_tiny")
    x = images(32)

    def run(key, x, x64):  # One program: init, a training step and two evaluation steps.
        variables = enc.init(key, x)
        train = enc.apply(variables, x, train=True, mutable=["batch_stats"])
        # Convolutions take any size: at 64 px the last stage's map is 2 x 2.
        return variables, train, enc.apply(variables, x, train=False), enc.apply(variables, x64)

    x64 = images(64)
    variables, (out, updates), eval_out, out64 = jax.jit(run)(KEY, x, x64)
    assert out["feature"].shape == (2, 256)
    assert [b.shape for b in out["blocks"]] == [(2, 32), (2, 64), (2, 128), (2, 256)]
    # The grid is the last stage's map before the pool that makes the feature.
    assert out["grid"].shape == (2, 1, 1, 256) and out64["grid"].shape == (2, 2, 2, 256)
    np.testing.assert_allclose(out64["grid"].mean(axis=(1, 2)), out64["feature"], atol=1e-6)
    assert not np.allclose(out64["grid"][:, 0, 0], out64["feature"], atol=1e-3)
    stem_mean = updates["batch_stats"]["bn1"]["mean"]
    assert stem_mean.shape == (8,) and float(jnp.abs(stem_mean).max()) > 0
    # Zero-init residual: each bottleneck's last BN scale starts at zero.
    assert float(jnp.abs(variables["params"]["layer1_0"]["bn3"]["scale"]).max()) == 0.0
    assert eval_out["feature"].shape == (2, 256)
    assert np.all(np.asarray(eval_out["feature"]) >= 0)  # pooled after a ReLU


# --- MultimodalModel ------------------------------------------------------------------------


def tiny_model_cfg(**kw) -> ml_collections.ConfigDict:
    cfg = {
        "image_encoder": "vit_tiny",
        "text_encoder": "text_tiny",
        "vocab_size": 100,
        "embed_dim": 48,
        "ssl_head": {"hidden": 32, "out": 16, "norm": "batch"},
        "dtype": "float32",
        "image_overrides": {"depth": 2},
        "text_overrides": {"layers": 2, "context_length": 16},
    }
    return ml_collections.ConfigDict({**cfg, **kw})


@pytest.fixture(scope="module")
def tiny_model():
    model = registry.build_model(tiny_model_cfg())
    x = images(32)
    tokens = jnp.array([[5, 6, 3] + [0] * 13, [7, 3] + [0] * 14], jnp.int32)
    return model, init(model, x, tokens), x, tokens


def test_model_init_creates_every_param(tiny_model):
    model, variables, _, _ = tiny_model
    params = variables["params"]
    assert set(params) == {
        "image_encoder",
        "text_encoder",
        "image_projection",
        "text_projection",
        "ssl_head",
        "logit_scale",
        "logit_bias",
    }
    np.testing.assert_allclose(params["logit_scale"], LOGIT_SCALE_INIT, rtol=1e-6)
    np.testing.assert_allclose(params["logit_bias"], LOGIT_BIAS_INIT)
    assert params["image_projection"]["proj"]["kernel"].shape == (128, 48)
    assert params["text_projection"]["proj"]["kernel"].shape == (128, 48)
    assert params["text_encoder"]["positional_embedding"].shape == (16, 128)
    assert set(variables["batch_stats"]) == {"ssl_head"}


def test_init_temperature_sets_the_logit_scale_and_is_checked():
    cfg = tiny_model_cfg(init_temperature=0.02, ssl_head=None)
    model = registry.build_model(cfg)
    x, tokens = images(32), jnp.zeros((2, 16), jnp.int32)
    params = init(model, x, tokens)["params"]
    np.testing.assert_allclose(params["logit_scale"], np.log(50.0), rtol=1e-6)
    with pytest.raises(ValueError, match="init_temperature"):
        init(registry.build_model(tiny_model_cfg(init_temperature=0.001, ssl_head=None)), x, tokens)


def test_model_methods(tiny_model):
    model, variables, x, tokens = tiny_model

    def run(v, x, tokens):
        img = model.apply(v, x, method=MultimodalModel.encode_image)
        txt = model.apply(v, tokens, method=MultimodalModel.encode_text)
        z_train, _ = model.apply(
            v, x, train=True, method=MultimodalModel.ssl_project, mutable=["batch_stats"]
        )
        z_eval = model.apply(v, x, method=MultimodalModel.ssl_project)
        z_feat = model.apply(v, img["feature"], method=MultimodalModel.ssl_project_feature)
        return img, txt, z_train, z_eval, z_feat, model.apply(v, x, tokens)

    img, txt, z_train, z_eval, z_feat, out = jax.jit(run)(variables, x, tokens)
    assert img["emb"].shape == (2, 48) and img["emb"].dtype == jnp.float32
    assert img["feature"].shape == (2, 128) and len(img["blocks"]) == 2
    assert txt["emb"].shape == (2, 48) and txt["feature"].shape == (2, 128)
    assert z_train.shape == (2, 16)
    # The SimCLR head reads the raw feature, not the projected embedding.
    np.testing.assert_allclose(z_eval, z_feat, atol=1e-6)
    emb = img["feature"] @ variables["params"]["image_projection"]["proj"]["kernel"]
    np.testing.assert_allclose(img["emb"], emb, atol=1e-5)
    np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)
    np.testing.assert_allclose(out["logit_bias"], -10.0)
    np.testing.assert_allclose(out["image_emb"], img["emb"], atol=1e-6)
    np.testing.assert_allclose(out["text_emb"], txt["emb"], atol=1e-6)
    np.testing.assert_allclose(out["ssl"], z_eval, atol=1e-6)


def test_model_logit_scale_is_clamped(tiny_model):
    model, variables, x, tokens = tiny_model
    params = {**variables["params"], "logit_scale": jnp.float32(10.0)}
    scale, _ = jax.jit(lambda v: model.apply(v, method=MultimodalModel.scales))(
        {**variables, "params": params}
    )
    np.testing.assert_allclose(scale, 100.0, rtol=1e-5)


def test_image_only_model_bf16(tiny_model):
    model = registry.build_model(tiny_model_cfg(text_encoder=None, ssl_head=None, dtype="bfloat16"))
    x = images(32)
    shapes = abstract_init(model, x)
    assert set(shapes) == {"params"}
    assert {p.dtype for p in jax.tree.leaves(shapes)} == {F32}
    # Reuse the multimodal fixture's parameters: the image-only tree is a subset of it.
    full = tiny_model[1]["params"]
    variables = {"params": {k: full[k] for k in shapes["params"]}}
    assert jax.tree.structure(variables) == jax.tree.structure(shapes)
    img = apply(model, variables, x, method=MultimodalModel.encode_image)
    assert img["feature"].dtype == jnp.bfloat16 and img["emb"].dtype == jnp.float32
    with pytest.raises(ValueError, match="text encoder"):
        model.apply(variables, jnp.ones((2, 4), jnp.int32), method=MultimodalModel.encode_text)


def test_build_model_resnet_and_errors():
    model = registry.build_model(tiny_model_cfg(image_encoder="resnet_tiny", image_overrides={}))
    variables = abstract_init(model, images(32), jnp.ones((2, 16), jnp.int32))
    assert variables["params"]["image_projection"]["proj"]["kernel"].shape == (256, 48)
    assert "image_encoder" in variables["batch_stats"]
    remat = registry.build_model(tiny_model_cfg(remat=True))
    assert remat.image_encoder.remat and remat.text_encoder.remat
    # Shortcut keys reach the encoders that have the field; *_overrides win over them.
    sized = registry.build_model(
        tiny_model_cfg(image_size=64, context_length=24, text_overrides={"layers": 1})
    )
    assert sized.image_encoder.image_size == 64 and sized.image_encoder.depth == 2
    assert sized.text_encoder.context_length == 24 and sized.text_encoder.layers == 1
    resnet = registry.build_model(
        tiny_model_cfg(image_encoder="resnet_tiny", image_overrides={}, image_size=64)
    )
    assert resnet.image_encoder.width == 8
    with pytest.raises(ValueError, match="vit_tiny"):
        registry.build_model(tiny_model_cfg(image_encoder="nope"))
    with pytest.raises(ValueError, match="vocab_size"):
        registry.build_model(tiny_model_cfg(vocab_size=-1))


@pytest.mark.parametrize("causal", [False, True])
def test_padded_attention_equals_unpadded(causal):
    """The cuDNN path pads 197 tokens to 256 and masks: same outputs and gradients."""
    from mmssl_jax.models.vit import attention

    q, k, v = (jax.random.normal(key, (2, 197, 3, 16)) for key in jax.random.split(KEY, 3))

    def loss(q, pad_to):
        return (attention(q, k, v, causal=causal, pad_to=pad_to) ** 2).sum()

    np.testing.assert_allclose(
        attention(q, k, v, causal=causal, pad_to=64),
        attention(q, k, v, causal=causal),
        atol=2e-6,
    )
    np.testing.assert_allclose(jax.grad(loss)(q, 64), jax.grad(loss)(q, None), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mask", ["none", "causal", "keys"])
def test_head_major_attention_equals_jax_attention(mask, dtype):
    """The models' attention gives jax.nn.dot_product_attention's outputs and gradients."""
    from mmssl_jax.models.vit import head_major_attention

    q, k, v = (
        jax.random.normal(key, (3, 11, 2, 8)).astype(dtype) for key in jax.random.split(KEY, 3)
    )
    key_valid = jnp.arange(11)[None, :] < jnp.array([[11], [5], [1]])
    causal = mask == "causal"
    keys = key_valid if mask == "keys" else None
    jax_mask = None if keys is None else keys[:, None, None, :]

    def ours(q, k, v):
        return head_major_attention(q, k, v, causal=causal, key_valid=keys)

    def reference(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, mask=jax_mask)

    tol = dict(atol=1e-6, rtol=1e-5) if dtype == jnp.float32 else dict(atol=2e-2, rtol=2e-2)
    f32 = lambda t: np.asarray(t, np.float32)
    np.testing.assert_allclose(f32(ours(q, k, v)), f32(reference(q, k, v)), **tol)

    def loss(fn):
        return lambda *a: (fn(*a).astype(jnp.float32) ** 2).sum()

    # Gradients: float32 rounding relative to the largest entry. The hand-written backward
    # takes rowsum(dO * O) where XLA reduces dP * P over keys (equal in exact arithmetic), so an
    # entry whose true gradient is 0 can come out at ~1e-7 of the others.
    for got, want in zip(
        jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v),
        jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v),
        strict=True,
    ):
        got, want = f32(got), f32(want)
        grad_tol = tol
        if dtype == jnp.float32:
            grad_tol = dict(atol=5e-7 * np.abs(want).max(), rtol=1e-5)
        np.testing.assert_allclose(got, want, **grad_tol)
