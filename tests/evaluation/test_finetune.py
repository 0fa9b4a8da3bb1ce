"""The finetune evaluator: end-to-end training, layer decay, padded test batches, runner."""

from __future__ import annotations

import io
import json
import os
import re

import jax
import numpy as np
import pytest
from PIL import Image

from input_pipeline import augment
from mmssl_jax.evaluation import finetune as ft
from mmssl_jax.evaluation import linear_probe, runner
from mmssl_jax.evaluation.encoder import encode_images
from mmssl_jax.evaluation.model_encoder import ModelEncoder
from mmssl_jax.models.model import MultimodalModel
from mmssl_jax.models.registry import build_model
from mmssl_jax.parallel import mesh as parallel
from mmssl_jax.training import param_rules

SIZE, DEPTH = 8, 2


def tiny_encoder(seed: int, mesh=None) -> ModelEncoder:
    """An image-only tiny ViT (2 blocks, 4 patches of 4x4) at random init `seed`."""
    model = build_model(
        dict(
            image_encoder="vit_tiny",
            embed_dim=8,
            image_size=SIZE,
            image_overrides=dict(width=16, depth=DEPTH, heads=2, patch_size=4),
        )
    )
    x = np.zeros((1, SIZE, SIZE, 3), np.float32)
    variables = model.init(jax.random.key(seed), x, method=MultimodalModel.encode_image)
    return ModelEncoder(model, jax.device_get(variables), batch_size=64, mesh=mesh)


def xor_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy grey images; the top-left and bottom-right quadrants are each brighter or darker
    (independent signs a, b) and the class is a == b: an XOR that no single pixel (and no
    linear function of the pixels) predicts, so a tower has to learn it."""
    rng = np.random.default_rng(seed)
    a, b = rng.choice([-1.0, 1.0], n), rng.choice([-1.0, 1.0], n)
    img = rng.normal(0.5, 0.12, (n, SIZE, SIZE, 3))
    half = SIZE // 2
    img[:, :half, :half] += 0.2 * a[:, None, None, None]
    img[:, half:, half:] += 0.2 * b[:, None, None, None]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), (a == b).astype(np.int32)


FIT = dict(epochs=15, batch_size=64, lr=3e-3, weight_decay=0.0, warmup_epochs=1, crop_scale=None)


@pytest.fixture(scope="module")
def data():
    return xor_images(512, 1), xor_images(256, 2)


@pytest.fixture(scope="module")
def tuned(data):
    (x_tr, y_tr), (x_te, y_te) = data
    return ft.finetune(tiny_encoder(0), x_tr, y_tr, x_te, y_te, **FIT)


def test_end_to_end_beats_the_frozen_tower(data, tuned):
    (x_tr, y_tr), (x_te, y_te) = data
    enc = tiny_encoder(0)
    f_tr = encode_images(enc, x_tr, batch_size=64, progress=False)["feature"]
    f_te = encode_images(enc, x_te, batch_size=64, progress=False)["feature"]
    probe = linear_probe.linear_probe(f_tr, y_tr, f_te, y_te)["top1"]
    assert tuned.metrics["top1"] >= 0.9
    assert tuned.metrics["top1"] >= probe + 0.1, (tuned.metrics, probe)
    assert tuned.losses[-10:].mean() < 0.5 * tuned.losses[:10].mean()
    # the tower itself moved (not only the head), and the encoder's own copy did not
    before = enc.variables["params"]["image_encoder"]["blocks_0"]
    after = tuned.variables["params"]["image_encoder"]["blocks_0"]
    moved = jax.tree.map(lambda u, v: float(np.abs(np.asarray(u) - v).max()), before, after)
    assert max(jax.tree.leaves(moved)) > 1e-3
    again = jax.tree.leaves(tiny_encoder(0).variables["params"]["image_encoder"])
    kept = jax.tree.leaves(enc.variables["params"]["image_encoder"])
    assert all(np.array_equal(u, v) for u, v in zip(again, kept, strict=True))


def expected_mult(path: str, decay: float) -> float:
    """BEiT/MAE layer decay written out for the 2-block tower: block i gets decay**(L - i),
    the embeddings decay**(L + 1), the final norm and the head 1."""
    if m := re.match(r"image_encoder/blocks_(\d+)/", path):
        return decay ** (DEPTH - int(m.group(1)))
    if re.match(r"image_encoder/(patch_embed|cls_token|pos_embed)", path):
        return decay ** (DEPTH + 1)
    return 1.0


def test_layer_decay_scales_each_blocks_update(data):
    (x_tr, y_tr), _ = data
    x, y = x_tr[:64], y_tr[:64]
    tower, tower_vars = ft.tower_of(tiny_encoder(0))
    model = ft.Classifier(tower, 2)
    start = ft.init_variables(model, tower_vars, SIZE, seed=0)
    one_step = dict(epochs=1, batch_size=64, lr=1e-2, weight_decay=0.0, warmup_epochs=0)
    deltas = {}
    for decay in (0.0, 0.5):
        end, losses = ft.train(model, start, x, y, layer_decay=decay, crop_scale=None, **one_step)
        assert len(losses) == 1
        deltas[decay] = {
            path: np.abs(np.asarray(b) - np.asarray(a)).sum()
            for (path, a), (_, b) in zip(
                param_rules.flat_params(start["params"]),
                param_rules.flat_params(end["params"]),
                strict=True,
            )
        }
    paths = [p for p, d in deltas[0.0].items() if d > 1e-6]
    assert any(p.startswith("image_encoder/blocks_0/") for p in paths)
    assert any(p.startswith("image_encoder/patch_embed") for p in paths)
    assert any(p.startswith("head/") for p in paths)
    for path in paths:
        ratio = deltas[0.5][path] / deltas[0.0][path]
        assert ratio == pytest.approx(expected_mult(path, 0.5), rel=1e-3), path


def test_padded_eval_scores_every_example_once(tuned):
    x, y = xor_images(13, 3)
    tower, _ = ft.tower_of(tiny_encoder(0))
    model = ft.Classifier(tower, 2)
    logits = model.apply(tuned.variables, augment.normalize(augment.to_float(x)))
    hand = int((np.argmax(np.asarray(logits), -1) == y).sum())
    mesh = parallel.make_mesh(4)
    out = ft.evaluate(model, tuned.variables, x, y, batch_size=4, mesh=mesh, desc="t")
    assert out["count"] == 13  # 4 batches of 4: 3 padding rows masked, none dropped
    assert out["correct"] == hand
    assert out["top1"] == hand / 13
    # training batches: every example once per epoch, the last batch filled up
    batches = list(ft.train_batches(13, 4, 8, seed=0))
    assert all(len(b) == 4 for b in batches)
    assert sorted(np.concatenate(batches[:4])[:13]) == list(range(13))


def write_shard(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    from input_pipeline.records import encode_example
    from input_pipeline.tfrecord import TFRecordWriter

    with TFRecordWriter(path) as writer:
        for i, (img, y) in enumerate(zip(images, labels, strict=True)):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            writer.write(encode_example(image=buf.getvalue(), label=int(y), id=str(i)))


def test_runner_reports_finetune_beside_random_init(data, tuned, tmp_path):
    (x_tr, y_tr), (x_te, y_te) = data
    write_shard(str(tmp_path / "train-0.tfrecord"), x_tr[:256], y_tr[:256])
    write_shard(str(tmp_path / "test-0.tfrecord"), x_te[:100], y_te[:100])
    # "trained": a tower that already solves the task; random init: a fresh one
    mesh = parallel.make_mesh(2)
    trained = tiny_encoder(0, mesh)
    trained.variables["params"]["image_encoder"] = tuned.variables["params"]["image_encoder"]
    built = []

    def random_factory():
        built.append(1)
        return tiny_encoder(1, mesh)

    cfg = {
        "ft": dict(
            type="finetune",
            train_shards=str(tmp_path / "train-*.tfrecord"),
            test_shards=str(tmp_path / "test-*.tfrecord"),
            image_size=SIZE,
            epochs=2,
            batch_size=64,
            lr=1e-3,
            crop_scale=None,
            plots=False,
        )
    }
    runner.clear_cache()
    workdir = str(tmp_path / "work")
    metrics = runner.run_evals(cfg, trained, workdir=workdir, step=3, random_encoder=random_factory)
    assert set(metrics) == {"ft/top1"}
    assert built == [1]
    data_out = json.load(open(os.path.join(workdir, "eval", "results_step_3.json")))
    rand = data_out["baselines"]["random_init"]["ft/top1"]
    assert "ft/top1" not in data_out["baselines"]["raw_pixels"]
    # 2 epochs: enough for a head on the tuned tower, far too little to learn the XOR
    assert metrics["ft/top1"] >= 0.9 and rand <= metrics["ft/top1"] - 0.2, (metrics, rand)
    row = [r for r in open(os.path.join(workdir, "eval", "latest.md")) if "| ft |" in r]
    assert len(row) == 1 and "| - |" in row[0]  # raw pixels do not apply
