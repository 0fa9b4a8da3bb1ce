"""Adding an objective term is its own file plus a config (the README's "Adding an
objective"): a term over existing outputs is 2 files; one that needs a new head also
registers the head and its output from its own file. Both train two real steps."""

from __future__ import annotations

import importlib.util
import textwrap

import jax
import numpy as np
import pytest

from mmssl_jax.training.trainer import Trainer

ALIGN_TERM = '''
"""A toy term: 1 - cosine between each image and its own caption (existing outputs)."""
import jax.numpy as jnp

from mmssl_jax.objectives import core, register_term


@register_term("toy_align", {"image_emb", "text_emb"})
def toy_align(outputs, axis_name, *, margin: float = 0.0):
    a = outputs["image_emb"] / jnp.linalg.norm(outputs["image_emb"], axis=-1, keepdims=True)
    b = outputs["text_emb"] / jnp.linalg.norm(outputs["text_emb"], axis=-1, keepdims=True)
    cos = jnp.sum(a * b, axis=-1)
    ones = jnp.ones_like(cos)
    loss = core.reduce_rows(jnp.maximum(1.0 - cos - margin, 0.0), ones, axis_name)
    return loss, {"cos": core.reduce_rows(cos, ones, axis_name)}
'''

COLOUR_TERM = '''
"""A toy term with a new head: predict each image's mean RGB colour from its feature."""
import jax.numpy as jnp

from mmssl_jax.models.extra_heads import register_head
from mmssl_jax.objectives import core, register_term
from mmssl_jax.objectives.outputs import register_output

register_head("colour_head", "feature", lambda model_cfg: {"out": 3})
register_output(
    "colour_pred",
    lambda f: f.module.apply_head("colour_head", f.feature("image"), train=f.train),
    views=("image",),
    parts=("colour_head",),
)
register_output(
    "colour_target",
    lambda f: f.batch["image"].astype(jnp.float32).mean(axis=(1, 2)) / 255.0,
    batch_keys=("image",),
)


@register_term("toy_colour", {"colour_pred", "colour_target"})
def toy_colour(outputs, axis_name):
    row = jnp.mean((outputs["colour_pred"] - outputs["colour_target"]) ** 2, axis=-1)
    loss = core.reduce_rows(row, jnp.ones_like(row), axis_name)
    return loss, {}
'''

CONFIG = """
import os

from configs.common import recipe

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
    return recipe("{method}", "tiny", arg, objectives=[("{term}", 1.0)],
                  extensions=(os.path.join(HERE, "{module}.py"),))
"""


def _write(tmp_path, module: str, source: str, term: str, method: str):
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    config_path = tmp_path / f"{module}_config.py"
    config_path.write_text(textwrap.dedent(CONFIG.format(term=term, module=module, method=method)))
    spec = importlib.util.spec_from_file_location(f"{module}_config", config_path)
    config_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_module)
    return config_module


def _small(config, data):
    config = config.get_config(f"data={data}")
    config.model.image_overrides = {"depth": 1}
    config.model.text_overrides = {"layers": 1}
    config.train.update(batch_size=16, total_steps=2, log_every=1, progress=False)
    config.evals = {}
    return config


def _train(config, workdir):
    trainer = Trainer(config, str(workdir))
    before = jax.device_get(trainer._init(config.seed).params)
    last = trainer.run()
    return trainer, before, jax.device_get(trainer.state.params), last


@pytest.fixture(scope="module")
def extension_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("extensions")


def test_a_term_over_existing_outputs_is_two_files(extension_dir, embedded_data, tmp_path):
    config = _small(
        _write(extension_dir, "toy_align", ALIGN_TERM, "toy_align", "clip"), embedded_data
    )
    # The config builder derived the towers from the term's outputs: text yes, SSL head no.
    assert config.model.text_encoder and not config.model.ssl_head
    trainer, before, after, last = _train(config, tmp_path / "run")
    assert set(last) >= {"toy_align/loss", "toy_align/cos", "loss"}
    assert np.isfinite(last["toy_align/loss"]) and 0.0 <= last["toy_align/loss"] <= 2.0
    moved = np.abs(
        after["image_projection"]["proj"]["kernel"] - before["image_projection"]["proj"]["kernel"]
    )
    assert moved.max() > 0  # the term's gradient reached the model


def test_a_term_with_a_new_head_registers_it_from_its_own_file(
    extension_dir, embedded_data, tmp_path
):
    config = _small(
        _write(extension_dir, "toy_colour", COLOUR_TERM, "toy_colour", "simclr"), embedded_data
    )
    assert config.model.colour_head.to_dict() == {} and not config.model.text_encoder
    assert config.model.ssl_head is None
    trainer, before, after, last = _train(config, tmp_path / "run")
    assert "colour_head" in after and "text_encoder" not in after
    assert after["colour_head"]["fc0"]["kernel"].shape[-1] == 3
    assert (
        np.abs(after["colour_head"]["fc0"]["kernel"] - before["colour_head"]["fc0"]["kernel"]).max()
        > 0
    )
    assert np.isfinite(last["toy_colour/loss"])
    # The batch carries only what the term's outputs read.
    assert trainer.batch_keys == {"image", "index"}


def test_a_missing_model_part_is_an_error_not_a_dropped_tower(embedded_data, tmp_path):
    from configs.tiny_clip import get_config

    config = get_config(f"data={embedded_data}")
    config.model.text_encoder = None
    with pytest.raises(ValueError, match=r"needs model\.text_encoder"):
        Trainer(config, str(tmp_path / "run"))
