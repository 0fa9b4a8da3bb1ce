"""Per-parameter rules (mmssl_jax/training/param_rules.py) in the optimizer
(mmssl_jax/training/optim.py).

Frozen parameters stay bit-identical through real train steps and hold no optimizer state;
lr multipliers and layer decay scale Adam's first step (|update| = lr * mult) exactly; the
weight-decay rules equal SLIP's ndim rule on every registry model; the table shows the rules.
"""

from __future__ import annotations

import functools
import gzip
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmssl_jax.models.registry import IMAGE_ENCODERS, TEXT_ENCODERS, build_model
from mmssl_jax.parallel import mesh as parallel
from mmssl_jax.training import init_from, optim, param_rules, wise_ft
from mmssl_jax.training.state import init_state
from mmssl_jax.training.step import make_train_step, term_specs

FASHION = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def optim_cfg(**kw) -> ml_collections.ConfigDict:
    base = dict(
        lr=1e-2,
        weight_decay=0.0,
        b1=0.9,
        b2=0.98,
        eps=1e-8,
        warmup_steps=0,
        start_lr=1e-6,
        end_lr=1e-2,
        grad_clip_norm=0.0,
    )
    base.update(kw)
    return ml_collections.ConfigDict(base)


def tiny_model(depth: int = 3, layers: int = 2, ssl_head=None):
    return build_model(
        dict(
            image_encoder="vit_tiny",
            text_encoder="text_tiny",
            vocab_size=64,
            embed_dim=16,
            ssl_head=ssl_head,
            image_overrides=dict(depth=depth, width=32, heads=2),
            text_overrides=dict(layers=layers, width=32, heads=2, context_length=8),
        )
    )


@functools.cache
def tiny_params(depth: int = 3, layers: int = 2):
    """Initialised once per shape for the whole file (init is the slow part on CPU)."""
    model = tiny_model(depth, layers)
    images = jnp.zeros((2, 32, 32, 3))
    tokens = jnp.ones((2, 8), jnp.int32)
    init = jax.jit(lambda: model.init(jax.random.key(0), images, tokens, train=False)["params"])
    return init()


def flat(tree) -> dict[str, np.ndarray]:
    return {p: np.asarray(x) for p, x in param_rules.flat_params(tree)}


def first_update(cfg, params, grads=None):
    tx, _ = optim.make_optimizer(cfg, total_steps=100, steps_per_epoch=10)
    if grads is None:
        grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
    return flat(updates)


# ----------------------------------------------------------------------------- weight decay


def test_slip_wd_rules_equal_the_ndim_rule_on_every_registry_model():
    rules = param_rules.Rules.from_config({})  # no wd_mults key: the SLIP default
    checked = 0
    pairs = [(name, "text_tiny") for name in IMAGE_ENCODERS]
    pairs += [("vit_tiny", name) for name in TEXT_ENCODERS]
    for image_name, text_name in pairs:
        model = build_model(
            dict(
                image_encoder=image_name,
                text_encoder=text_name,
                vocab_size=100,
                ssl_head=dict(hidden=32, out=16, norm="batch"),
            )
        )
        size = 224 if "16" in image_name or "resnet" in image_name else 32
        shapes = jax.eval_shape(
            lambda m=model, s=size: m.init(
                jax.random.key(0), jnp.zeros((1, s, s, 3)), jnp.ones((1, 8), jnp.int32)
            )["params"]
        )
        by_rule = param_rules.wd_mult_fn(rules)(shapes)
        by_ndim = optim.decay_mask(shapes)
        for (path, m), (_, d) in zip(flat(by_rule).items(), flat(by_ndim).items(), strict=True):
            assert (float(m) == 1.0) == bool(d), f"{image_name}+{text_name}: {path}"
        checked += 1
    assert checked == len(IMAGE_ENCODERS) + len(TEXT_ENCODERS)


def test_default_config_is_exactly_optax_adamw():
    """No rule keys: the same numbers and the same state tree as before the rules."""
    params = tiny_params()
    cfg = optim_cfg(weight_decay=0.1)
    tx, schedule = optim.make_optimizer(cfg, 100, 10)
    ref = optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1, mask=optim.decay_mask)
    ref = optax.chain(ref)
    s1, s2 = tx.init(params), ref.init(params)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    grads = jax.tree.map(lambda p: jnp.sin(p * 3.0 + 0.1), params)
    update1, update2 = jax.jit(tx.update), jax.jit(ref.update)
    for _ in range(2):
        u1, s1 = update1(grads, s1, params)
        u2, s2 = update2(grads, s2, params)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_wd_mults_scale_the_decay_term():
    params = tiny_params()
    wd_mults = [(r"image_encoder/.*kernel", 2.0), (r".*kernel", 1.0)]
    cfg = optim_cfg(weight_decay=0.1, wd_mults=wd_mults)
    zeros = jax.tree.map(jnp.zeros_like, params)  # Adam's step is 0: only the decay moves
    updates = first_update(cfg, params, zeros)
    p = flat(params)
    for path, u in updates.items():
        mult = 2.0 if path.startswith("image_encoder/") and path.endswith("kernel") else 0.0
        mult = 1.0 if mult == 0.0 and path.endswith("kernel") else mult
        np.testing.assert_allclose(u, -1e-2 * 0.1 * mult * p[path], rtol=1e-6, err_msg=path)


# ----------------------------------------------------------------------------- lr multipliers


def test_lr_mults_and_layer_decay_give_the_expected_update_ratios():
    """Adam's first step is lr * g / (|g| + eps) ~= lr per element; the ratio to the base
    lr is the multiplier: lr_mults (first match) times decay**(L - block)."""
    params = tiny_params(3, 2)
    cfg = optim_cfg(
        lr_mults=[("text_encoder/.*", 0.5), ("logit_scale", 10.0)],
        layer_decay=0.5,
    )
    updates = first_update(cfg, params)
    lr = 1e-2

    def ratio(path):
        return float(np.abs(updates[path]).max()) / lr

    expect = {
        "image_encoder/patch_embed/kernel": 0.5**4,
        "image_encoder/pos_embed": 0.5**4,
        "image_encoder/blocks_0/attn/qkv/kernel": 0.5**3,
        "image_encoder/blocks_1/mlp/fc1/bias": 0.5**2,
        "image_encoder/blocks_2/norm1/scale": 0.5**1,
        "image_encoder/norm/scale": 1.0,
        "image_projection/proj/kernel": 1.0,
        "text_encoder/token_embedding/embedding": 0.5 * 0.5**3,
        "text_encoder/resblocks_0/attn/proj/kernel": 0.5 * 0.5**2,
        "text_encoder/resblocks_1/attn/proj/kernel": 0.5 * 0.5**1,
        "text_encoder/ln_final/scale": 0.5,
        "logit_scale": 10.0,
    }
    for path, mult in expect.items():
        assert ratio(path) == pytest.approx(mult, rel=1e-5), path
        # every element moves by the same amount (g is constant)
        np.testing.assert_allclose(np.abs(updates[path]), lr * mult, rtol=1e-5)

    # Freezing the last block does not change the depth layer decay counts.
    cfg.freeze = [("image_encoder/blocks_2/.*", True)]
    updates = first_update(cfg, params)
    assert not np.any(updates["image_encoder/blocks_2/attn/qkv/kernel"])
    assert ratio("image_encoder/blocks_0/attn/qkv/kernel") == pytest.approx(0.5**3, rel=1e-5)


# ----------------------------------------------------------------------------- freezing


def _fashion_images(n: int) -> np.ndarray:
    with gzip.open(FASHION) as f:
        pix = np.frombuffer(f.read(), np.uint8, offset=16)[: n * 784].reshape(n, 28, 28)
    pix = np.pad(pix, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(pix[..., None], 3, axis=-1)


def test_frozen_params_bit_identical_through_train_steps_and_stateless():
    """LiT: the image tower is locked except its last block (+ final norm); real jitted
    CLIP train steps on 8 devices leave every locked parameter bit-identical."""
    model = tiny_model(depth=3)
    freeze = param_rules.lock_tower("image_encoder", depth=3, unlocked_last=1)
    freeze += param_rules.lock_tower("text_encoder")[:0]  # text stays trainable
    cfg = optim_cfg(freeze=freeze, weight_decay=0.1, grad_clip_norm=1.0, lr=1e-3)
    tx, schedule = optim.make_optimizer(cfg, 10, 10)
    mesh = parallel.make_mesh(1)  # one device: what is tested is the optimizer, not sharding
    config = ml_collections.ConfigDict(dict(objectives=[("clip", 1.0)]))
    step = jax.jit(make_train_step(model, tx, term_specs(config), mesh, None, 1, schedule))
    state = jax.jit(lambda: init_state(model, tx, 32, 8, seed=0))()
    before = flat(state.params)

    opt_paths = [p for p, _ in param_rules.flat_params(state.opt_state)]
    assert not any("image_encoder/blocks_0" in p or "patch_embed" in p for p in opt_paths)
    assert any("image_encoder/blocks_2" in p for p in opt_paths)
    assert any("text_encoder/resblocks_0" in p for p in opt_paths)

    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = dict(
            image=_fashion_images(16),
            tokens=rng.integers(4, 64, (16, 8)).astype(np.int32),
            index=np.arange(16, dtype=np.int64),
        )
        state, metrics = step(state, parallel.to_global(batch, mesh))
    assert int(state.skipped_steps) == 0
    after = flat(state.params)
    settings = {s.path: s for s in param_rules.Rules.from_config(cfg).settings(state.params)}
    n_frozen = 0
    for path, value in after.items():
        if settings[path].frozen:
            assert value.tobytes() == before[path].tobytes(), f"{path} moved"
            n_frozen += 1
        elif path.endswith("kernel"):
            assert not np.array_equal(value, before[path]), f"{path} did not train"
    assert n_frozen == len([p for p in after if p.startswith("image_encoder/")]) - 2 - 12
    assert not np.array_equal(after["image_encoder/norm/scale"], before["image_encoder/norm/scale"])


def test_grad_clip_uses_only_trainable_gradients():
    """Huge gradients on frozen parameters do not shrink the clipped trainable update."""
    params = tiny_params()
    freeze = [("image_encoder/.*", True)]
    cfg = optim_cfg(freeze=freeze, grad_clip_norm=0.1, eps=1.0)  # eps=1: Adam sees the scale
    grads = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.full_like(x, 1e6 if "image_encoder" in param_rules.path_of(p) else 0.01),
        params,
    )
    small = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if "image_encoder" in param_rules.path_of(p) else x, grads
    )
    u_big, u_small = first_update(cfg, params, grads), first_update(cfg, params, small)
    for path in u_big:
        np.testing.assert_array_equal(u_big[path], u_small[path], err_msg=path)
    norm = np.sqrt(sum((0.01**2) * v.size for p, v in flat(params).items() if "image_" not in p))
    assert norm > 0.1  # so clipping was active
    assert not np.any(u_big["image_encoder/blocks_0/attn/qkv/kernel"])


def test_bad_rules_are_clear_errors():
    with pytest.raises(ValueError, match="bad regex"):
        param_rules.Rules.from_config({"freeze": [("image_encoder/(", True)]})
    with pytest.raises(ValueError, match="must be"):
        param_rules.Rules.from_config({"lr_mults": [("a", 1.0, 2.0)]})
    with pytest.raises(ValueError, match="needs depth"):
        param_rules.lock_tower("image_encoder", unlocked_last=2)


# ----------------------------------------------------------------------------- the table


def test_rules_table_shows_rules_matches_and_parameters():
    params = tiny_params(3, 2)
    cfg = optim_cfg(
        freeze=param_rules.lock_tower("image_encoder", depth=3, unlocked_last=1),
        lr_mults=[("logit_scale", 10.0), ("nothing/matches/.*", 3.0)],
        layer_decay=0.75,
        grad_clip_norm=1.0,
    )
    table = param_rules.rules_table(cfg, jax.eval_shape(lambda: params))
    lines = table.splitlines()
    rule_lines = {tuple(line.split()[:4]): line for line in lines if line.startswith("freeze")}
    # block 2 (+ final norm) unlocked: 12 + 2 parameters; the rest of the tower locked.
    assert ("freeze", "0", "image_encoder/blocks_(2)/.*", "train") in rule_lines
    n_image = len([p for p, _ in param_rules.flat_params(params) if p.startswith("image_enc")])
    locked = next(line for line in lines if line.split()[:2] == ["freeze", "2"])
    assert locked.split()[3:5] == ["frozen", str(n_image - 14)]
    unused = next(line for line in lines if "nothing/matches" in line)
    assert "decides no parameter" in unused
    layer = [line for line in lines if line.startswith("layer_decay")]
    assert len(layer) == (1 + 3) + (1 + 2)  # image: embed + 3 blocks; text: embed + 2 blocks
    wd = [line for line in lines if line.startswith("wd_mult")]
    assert [w.split()[2] for w in wd] == [r for r, _ in param_rules.SLIP_WD_RULES]
    assert "grad_clip_norm: 1" in table and "layer_decay: 0.75" in table
    rows = [ln.split() for ln in lines if ln.strip()]
    per_param = {r[0]: r[1:] for r in rows if "/" in r[0] and len(r) == 5}
    assert per_param["image_encoder/blocks_0/attn/qkv/kernel"][1:] == ["frozen", "-", "-"]
    assert per_param["image_encoder/blocks_2/attn/qkv/kernel"][1:] == ["train", "0.75", "1"]
    assert per_param["text_encoder/resblocks_0/norm1/bias"][1:] == ["train", "0.5625", "0"]
    assert per_param["text_encoder/token_embedding/embedding"][0] == "64x32"


# ----------------------------------------------------------------------------- init_from, WiSE-FT


def _other_params():
    """Same shapes as tiny_params(), other values (another seed)."""
    model = tiny_model()
    images, tokens = jnp.zeros((2, 32, 32, 3)), jnp.ones((2, 8), jnp.int32)
    return jax.jit(lambda: model.init(jax.random.key(7), images, tokens, train=False)["params"])()


def test_init_from_export_params_and_skip_and_clear_errors(tmp_path):
    from safetensors.numpy import save_file

    params, other = tiny_params(), _other_params()
    stored = {"params/" + p: np.asarray(v) for p, v in param_rules.flat_params(other)}
    stored["params/ssl_head/fc0/kernel"] = np.ones((2, 2), np.float32)  # not in the model
    stored["batch_stats/ssl_head/norm0/mean"] = np.zeros(2, np.float32)  # not a parameter
    export = tmp_path / "export"
    export.mkdir()
    save_file(stored, str(export / "params.safetensors"))

    loaded = flat(init_from.load_init_params(str(export), params))
    for path, value in flat(other).items():
        np.testing.assert_array_equal(loaded[path], value, err_msg=path)
    kept = flat(init_from.load_init_params(str(export), params, skip=("text_.*",)))
    for path, value in flat(params).items():
        want = value if path.startswith("text_") else flat(other)[path]
        np.testing.assert_array_equal(kept[path], want, err_msg=path)

    broken = dict(stored)
    del broken["params/image_encoder/pos_embed"]
    save_file(broken, str(tmp_path / "missing.safetensors"))
    with pytest.raises(init_from.InitFromError, match="'image_encoder/pos_embed'.*not in it"):
        init_from.load_init_params(str(tmp_path / "missing.safetensors"), params)
    broken["params/image_encoder/pos_embed"] = np.zeros((1, 17, 32), np.float32)
    save_file(broken, str(tmp_path / "shape.safetensors"))
    with pytest.raises(init_from.InitFromError, match=r"pos_embed' has shape \(1, 17, 32\)"):
        init_from.load_init_params(str(tmp_path / "shape.safetensors"), params)
    with pytest.raises(init_from.InitFromError, match="not an export"):
        init_from.load_init_params(str(tmp_path), params)


def test_init_from_training_checkpoint_and_trainer_hook(tmp_path):
    """A workdir's orbax checkpoint (params read alone, optimizer state never), placed on the
    trainer's shardings by `maybe_init_from`; WiSE-FT interpolation is exact at 0 and 1."""
    from mmssl_jax.training.checkpoint import Checkpointer

    model = tiny_model()
    tx, _ = optim.make_optimizer(optim_cfg(freeze=[("image_encoder/.*", True)]), 10, 10)
    saved = jax.jit(lambda: init_state(model, tx, 32, 8, seed=3))()
    ckpt = Checkpointer(str(tmp_path / "run"), async_save=False)
    ckpt.save(5, saved, None, force=True)
    ckpt.close()

    tx2, _ = optim.make_optimizer(optim_cfg(), 10, 10)  # another optimizer state layout
    fresh = jax.jit(lambda: init_state(model, tx2, 32, 8, seed=0))()
    mesh = parallel.make_mesh()
    sharding = jax.tree.map(lambda _: parallel.replicated(mesh), fresh)
    config = ml_collections.ConfigDict(dict(init_from=dict(path=str(tmp_path / "run"), skip=())))
    state = init_from.maybe_init_from(fresh, config, sharding)
    for path, value in flat(saved.params).items():
        np.testing.assert_array_equal(flat(state.params)[path], value, err_msg=path)
    leaf = state.params["image_encoder"]["pos_embed"]
    assert leaf.sharding == parallel.replicated(mesh)
    config.init_from.path = ""
    assert init_from.maybe_init_from(fresh, config, sharding) is fresh

    a, b = saved.params, fresh.params
    for alpha, want in ((0.0, a), (1.0, b)):
        mixed = flat(wise_ft.interpolate(a, b, alpha))
        for path, value in flat(want).items():
            np.testing.assert_array_equal(mixed[path], value)
    half = flat(wise_ft.interpolate(a, b, 0.5))
    k = "image_encoder/blocks_0/attn/qkv/kernel"
    np.testing.assert_allclose(half[k], 0.5 * (flat(a)[k] + flat(b)[k]), rtol=1e-6)


def test_lit_and_finetune_configs():
    """configs/lit_tiny.py locks the image tower (last block open) and reads only it from
    init; configs/finetune_*.py fine-tune with UniCL over class prompts from init."""
    from configs.finetune_tiny import get_config as finetune_config
    from configs.lit_tiny import get_config as lit_config

    config = lit_config("init=/some/export,open_blocks=1")
    model_cfg = dict(config.model.to_dict(), vocab_size=100)
    model = build_model(model_cfg)
    shapes = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.ones((1, 32), jnp.int32)
        )["params"]
    )
    settings = param_rules.Rules.from_config(config.optim).settings(shapes)
    depth = model.image_encoder.depth
    opened = (f"image_encoder/blocks_{depth - 1}/", "image_encoder/norm/")
    for s in settings:
        open_block = s.path.startswith(opened)
        assert s.frozen == (s.path.startswith("image_encoder/") and not open_block), s.path
    skip = config.init_from.skip
    reads = [s.path for s in settings if not any(re.fullmatch(r, s.path) for r in skip)]
    assert reads and all(p.startswith("image_encoder/") for p in reads)
    assert "frozen" in param_rules.rules_table(config.optim, shapes)

    ft = finetune_config("init=/w/clip,freeze=text,layer_decay=0.8")
    assert ft.objectives == [("unicl", 1.0)] and ft.init_from.path == "/w/clip"
    assert ft.data.sources.task.use_labels and ft.optim.layer_decay == 0.8
    assert ft.optim.freeze == (("text_encoder/.*", True),)
    assert set(ft.evals) == {"task_zero_shot", "emoji_zero_shot"}
    with pytest.raises(ValueError, match="needs `init=`"):
        finetune_config("")
