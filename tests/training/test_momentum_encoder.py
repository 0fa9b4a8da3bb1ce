"""MoCo v3 in the train step: the momentum encoder is an EMA of the online encoder and
projector under the cosine schedule, its keys see the same views as the online queries,
and the tiny MoCo v3 configs carry MoCo v3's asymmetric augmentations."""

import functools
import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from input_pipeline import augment
from mmssl_jax.models.extra_heads import attach_heads
from mmssl_jax.models.registry import build_model
from mmssl_jax.objectives import outputs as outputs_lib
from mmssl_jax.training import momentum
from mmssl_jax.training import state as state_lib
from mmssl_jax.training import step as step_lib


def _tiny_mocov3():
    cfg = ml_collections.ConfigDict(
        dict(
            image_encoder="vit_tiny",
            image_overrides=dict(depth=1, width=32, heads=2, image_size=16),
            embed_dim=16,
            ssl_head=dict(hidden=32, out=16, norm="layer"),
            predictor=dict(hidden=(32,)),
        )
    )
    return attach_heads(build_model(cfg), cfg)


def test_mocov3_momentum_update_and_keys():
    model = _tiny_mocov3()
    heads = {name: (source, dict(fields)) for name, source, fields in model.heads}
    assert heads["predictor"][0] == "ssl" and heads["predictor"][1]["out"] == 16
    tx = optax.adamw(1e-2)
    state = state_lib.init_state(model, tx, 16, None, seed=0, ema=True)
    assert set(state.ema_params) == set(momentum.MOMENTUM_MODULES)  # no predictor
    rng = np.random.default_rng(0)
    batch = {
        "view_a": rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8),
        "view_b": rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8),
        "index": np.arange(8, dtype=np.int64),
    }
    cheap = dict(jitter_random_order=False, blur_prob=0.0)  # quick to compile
    aug = (augment.AugmentConfig(**cheap), augment.AugmentConfig(**cheap, solarize_prob=0.2))
    # While ema == params, the momentum keys equal the online projections: same views.
    key = jax.random.key(1)
    variables = {"params": state.params}
    ONLINE = functools.partial(outputs_lib.compute, names=["ssl_a", "ssl_b", "pred_a", "pred_b"])
    KEYS = functools.partial(outputs_lib.compute, names=["key_a", "key_b"], momentum=True)
    online = jax.jit(lambda v, b: model.apply(v, b, key, aug, True, method=ONLINE))(
        variables, batch
    )
    keys = jax.jit(lambda v, b: model.apply(v, b, key, aug, True, method=KEYS))(
        {"params": momentum.merged(state.params, state.ema_params)}, batch
    )
    np.testing.assert_allclose(keys["key_a"], online["ssl_a"], atol=1e-5)
    np.testing.assert_allclose(keys["key_b"], online["ssl_b"], atol=1e-5)
    assert online["pred_a"].shape == (8, 16)

    schedule = momentum.momentum_schedule(0.99, total_steps=10)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.99, 0.995, 1.0])
    step = jax.jit(
        step_lib.make_train_step(model, tx, [("mocov3", 1.0, {})], None, aug, 1, None, schedule)
    )
    ema0 = jax.device_get(state.ema_params)
    new_state, metrics = step(state, batch)
    new_state, metrics = jax.device_get((new_state, metrics))
    m = float(schedule(1))
    np.testing.assert_allclose(metrics["momentum"], m)
    for k in momentum.MOMENTUM_MODULES:
        expect = jax.tree.map(lambda e, p: m * e + (1 - m) * p, ema0[k], new_state.params[k])
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
            new_state.ema_params[k],
            expect,
        )
    moved = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), new_state.params, state.params
    )
    assert max(jax.tree.leaves(moved)) > 0
    assert np.isfinite(metrics["loss"])


def test_mocov3_config_has_asymmetric_views_and_momentum():
    config = importlib.import_module("configs.tiny_mocov3").get_config()
    view_a, view_b, _ = step_lib.augment_configs(config)
    assert (view_a.blur_prob, view_b.blur_prob) == (1.0, 0.1)
    assert (view_a.solarize_prob, view_b.solarize_prob) == (0.0, 0.2)
    assert view_a.saturation == view_b.saturation == 0.2
    assert config.objective_options.mocov3.temperature == 0.2
    assert config.momentum.base == 0.99 and config.model.text_encoder is None
    slip = importlib.import_module("configs.tiny_slip_mocov3").get_config()
    assert [n for n, _ in slip.objectives] == ["clip", "mocov3"]
    assert slip.model.text_encoder and slip.model.predictor
    # The existing recipes are unchanged: one augmentation config, no optional heads.
    simclr = importlib.import_module("configs.tiny_slip").get_config()
    views = step_lib.augment_configs(simclr)
    assert views.view_a == views.view_b and views.image is None
    assert simclr.model.predictor is None and simclr.model.topic_head is None
