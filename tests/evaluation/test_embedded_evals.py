"""The embedded data's evaluations: group zero-shot, prompt ensembles, the emoji probe and
the config entries (issue 15, item 5)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from threadpoolctl import threadpool_limits

from configs.common import embedded_evals
from input_pipeline.templates import load_templates
from mmssl_jax.evaluation import context, encoder, linear_probe, runner, zero_shot

# 6 fine classes in 3 groups; the toy encoder maps class 5's images to group 0 on purpose.
CLASSES = ["apple", "pear", "car", "bus", "cat", "dog"]
GROUPS = {"groups": ["fruit", "vehicle", "animal"], "group_of_label": [0, 0, 1, 1, 2, 2]}
SEEN_AS = [0, 0, 1, 1, 2, 0]  # the group the toy image embedding points to, per class


def write_toy_shards(root, counts):
    """Solid 16 px images whose grey level encodes the class (PNG: lossless)."""
    from input_pipeline.records import encode_example
    from input_pipeline.tfrecord import TFRecordWriter

    labels = np.repeat(np.arange(len(counts)), counts)
    with TFRecordWriter(str(root / "toy-test-00000-of-00001.tfrecord")) as writer:
        for i, y in enumerate(labels):
            buf = io.BytesIO()
            Image.fromarray(np.full((16, 16, 3), 40 * y + 20, np.uint8)).save(buf, format="PNG")
            caption = f"a picture of a {CLASSES[y]}"
            writer.write(
                encode_example(image=buf.getvalue(), texts=[caption], label=int(y), id=str(i))
            )
    (root / "toy-classnames.json").write_text(json.dumps(CLASSES))
    (root / "toy-groups.json").write_text(json.dumps(GROUPS))
    return labels


class GroupEncoder:
    """Image -> the one-hot of SEEN_AS[class]; a text -> the one-hot of the group it names,
    plus a fixed template-dependent offset (so an ensemble averages distinct vectors)."""

    has_text = True

    def image_features(self, images):
        cls = np.rint((images[:, 0, 0, 0].astype(np.float32) - 20) / 40).astype(int)
        emb = np.eye(8, dtype=np.float32)[np.asarray(SEEN_AS)[cls]]
        return {"emb": emb, "feature": emb}

    def text_embeddings(self, texts):
        out = np.zeros((len(texts), 8), np.float32)
        for i, t in enumerate(texts):
            for g, name in enumerate(GROUPS["groups"]):
                if name in t:
                    out[i, g] = 3.0
            out[i, 3 + len(t) % 5] = 1.0  # the template's own direction
        return out


def test_group_zero_shot_maps_labels_through_the_groups_file(tmp_path):
    labels = write_toy_shards(tmp_path, [3, 2, 4, 1, 2, 5])
    common = dict(
        type="zero_shot",
        shards=str(tmp_path / "toy-test-*.tfrecord"),
        classnames=str(tmp_path / "toy-classnames.json"),
        templates="emoji",
        image_size=16,
        baselines=False,
        plots=False,
    )
    cfg = {"groups": dict(common, label_map=str(tmp_path / "toy-groups.json"))}
    runner.clear_cache()
    out = runner.run_evals(cfg, GroupEncoder(), workdir=str(tmp_path / "w"), step=1)
    group = np.asarray(GROUPS["group_of_label"])[labels]
    predicted = np.asarray(SEEN_AS)[labels]
    assert out["groups/top1"] == pytest.approx(np.mean(group == predicted))  # class 5 wrong
    recalls = [np.mean(predicted[group == g] == g) for g in range(3)]
    assert out["groups/mean_per_class"] == pytest.approx(np.mean(recalls))
    assert out["groups/top1"] == pytest.approx(12 / 17)  # 17 records, the 5 of class 5 wrong

    mapped, names = zero_shot.map_labels(labels, CLASSES, str(tmp_path / "toy-groups.json"))
    np.testing.assert_array_equal(mapped, group)
    assert names == GROUPS["groups"]
    same, names = zero_shot.map_labels(labels, CLASSES, None)
    np.testing.assert_array_equal(same, labels)
    assert names == CLASSES
    with pytest.raises(ValueError, match="6 classes"):
        (tmp_path / "bad.json").write_text(json.dumps({**GROUPS, "group_of_label": [0, 1]}))
        zero_shot.map_labels(labels, CLASSES, str(tmp_path / "bad.json"))


@pytest.mark.parametrize("templates", ["emoji", "fashion"])
def test_ensembles_average_the_normalised_template_embeddings(templates):
    names = ["heart", ["coat", "jacket"]]
    rng = np.random.default_rng(0)
    table: dict[str, np.ndarray] = {}

    def embed(texts):
        for t in texts:
            table.setdefault(t, rng.normal(size=5) * rng.uniform(0.1, 10))
        return np.stack([table[t] for t in texts])

    got = zero_shot.class_embeddings(embed, names, load_templates(templates))
    temps = load_templates(templates)
    assert len(temps) >= 5 and len(table) == 3 * len(temps)
    for row, name in zip(got, names, strict=True):
        synonyms = [name] if isinstance(name, str) else name
        vecs = np.stack([table[t.replace("{}", s)] for s in synonyms for t in temps])
        mean = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).mean(0)
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)


def test_embedded_evals_config(tmp_path):
    evals = embedded_evals(str(tmp_path), 32)
    assert evals["emoji_group_zero_shot"]["label_map"].endswith("emoji/emoji-groups.json")
    assert evals["emoji_zero_shot"]["templates"] == "emoji"
    assert evals["fashion_zero_shot"]["templates"] == "fashion"
    assert evals["emoji_linear_probe"]["test_shards"].endswith("emoji-test-*.tfrecord")
    assert "openclipart_retrieval" not in evals  # no shards: no entry
    (tmp_path / "openclipart").mkdir()
    (tmp_path / "openclipart" / "openclipart-test-00000-of-00001.tfrecord").write_bytes(b"")
    evals = embedded_evals(str(tmp_path), 32)
    assert evals["openclipart_retrieval"]["type"] == "retrieval"
    for name, cfg in evals.items():
        runner.normalize_config(name, cfg)  # every key is one its evaluator knows


def test_emoji_probe_on_the_real_shards(embedded_data):
    """The emoji linear probe of the config, on raw pixels: 99 subgroups, held-out emoji."""
    cfg = runner.normalize_config(
        "emoji_linear_probe", embedded_evals(str(embedded_data), 32)["emoji_linear_probe"]
    )
    train = context.load_arrays("p", cfg, "train_shards")
    test = context.load_arrays("p", cfg, "test_shards")
    raw = encoder.RawPixelEncoder(8)
    x_tr, x_te = (raw.image_features(a["image"])["feature"] for a in (train, test))
    y_tr, y_te = train["label"], test["label"]
    with threadpool_limits(1):
        out = linear_probe.linear_probe(x_tr, y_tr, x_te, y_te, Cs=(0.1,), max_iter=100)
    chance = np.max(np.bincount(y_te)) / len(y_te)
    assert len(np.unique(y_tr)) > len(np.unique(y_te)) > 9  # subgroups, some absent in test
    assert out["top1"] > 2 * chance  # held-out emoji share their subgroup's look
    assert 0.0 < out["mean_per_class"] < 1.0


def test_probe_counts_test_classes_absent_from_train_as_wrong(caplog):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6)) * 5
    y_tr, y_te = np.repeat([0, 1, 2], 20), np.repeat([0, 1, 2, 3], 5)
    x_tr = centres[y_tr] + rng.normal(size=(60, 6))
    x_te = centres[y_te] + rng.normal(size=(20, 6))
    out = linear_probe.linear_probe(x_tr, y_tr, x_te, y_te, Cs=(1.0,))
    assert out["top1"] == pytest.approx(15 / 20)  # classes 0-2 separable, class 3 unseen
    assert out["mean_per_class"] == pytest.approx(3 / 4)
    assert "5 of 20 test records (1 classes)" in caplog.text
