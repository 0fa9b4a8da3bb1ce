"""Checkpoints and exports written before the layout pass (main at 4165942, by
tests/data/old_layout/README.md's script) still load with the same parameter names and give
the same embeddings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np

from mmssl_jax import load_pretrained
from mmssl_jax.export import flatten_variables, load_config, restore_variables

OLD = Path(__file__).resolve().parents[1] / "data" / "old_layout"


def test_an_old_export_loads_and_encodes_as_the_old_code_did():
    model = load_pretrained(str(OLD / "export"))
    expected = np.load(OLD / "expected.npz")
    texts = json.loads((OLD / "texts.json").read_text())
    np.testing.assert_allclose(
        model.encode_images(expected["images"]), expected["image_emb"], atol=2e-6
    )
    np.testing.assert_allclose(model.encode_texts(texts), expected["text_emb"], atol=2e-6)


def _old_workdir(tmp_path: Path):
    workdir = tmp_path / "workdir"
    shutil.copytree(OLD / "workdir", workdir)
    config = load_config(str(workdir))
    config.data.tokenizer = str(OLD / "export" / "tokenizer.model")  # the run's tokenizer
    return str(workdir), config


def test_an_old_checkpoint_restores_the_same_variables_as_its_export(tmp_path):
    from safetensors.numpy import load_file

    workdir, config = _old_workdir(tmp_path)
    _, variables, step = restore_variables(config, workdir)
    assert step == 2
    restored = flatten_variables(variables)
    exported = load_file(str(OLD / "export" / "params.safetensors"))
    assert sorted(restored) == sorted(exported)  # the same parameter names
    for name, value in exported.items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)


def test_an_old_checkpoint_resumes_into_the_new_train_state(tmp_path, embedded_data):
    from mmssl_jax.training.checkpoint import Checkpointer
    from mmssl_jax.training.trainer import Trainer

    workdir, config = _old_workdir(tmp_path)
    config.data.sources.emoji.shards = f"{embedded_data}/emoji/emoji-train-*.tfrecord"
    config.data.sources.emoji.classnames = f"{embedded_data}/emoji/emoji-classnames.json"
    trainer = Trainer(config, workdir)
    ckpt = Checkpointer(workdir)
    try:
        state = ckpt.restore(trainer.abstract_state(), None)  # the whole TrainState tree
    finally:
        ckpt.close()
    assert int(jax.device_get(state.step)) == 2
    assert set(state.params) >= {"image_encoder", "text_encoder", "ssl_head", "logit_scale"}
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(trainer.state_shape.opt_state)
