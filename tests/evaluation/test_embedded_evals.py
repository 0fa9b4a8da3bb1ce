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
from mmssl_jax.evaluation import baselines, context, encoder, linear_probe, runner, zero_shot

# 6 fine classes in 3 groups; the toy encoder maps class 5's images to group 0 on purpose.
CLASSES = ["apple", "pear", "car", "bus", "cat", "dog"]
GROUPS = {"groups": ["fruit", "vehicle", "animal"], "group_of_label": [0, 0, 1, 1, 2, 2]}
SEEN_AS = [0, 0, 1, 1, 2, 0]  # the group the toy image embedding points to, per class


def grey_image(y: int) -> np.ndarray:
    """A solid 16 px image whose grey level encodes the class."""
    return np.full((16, 16, 3), 40 * y + 20, np.uint8)


def block_image(y: int) -> np.ndarray:
    """A black 16 px image with a white 4 px block at a place of the class's own (classes
    are linearly separable in pixels, also after downsampling to 8 px)."""
    im = np.zeros((16, 16, 3), np.uint8)
    r, c = divmod(y, 4)
    im[4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = 255
    return im


def write_toy_shards(root, counts, split="test", image=grey_image):
    """Toy shards `toy-<split>-*.tfrecord` (PNG: lossless), class names and groups."""
    from input_pipeline.records import encode_example
    from input_pipeline.tfrecord import TFRecordWriter

    labels = np.repeat(np.arange(len(counts)), counts)
    with TFRecordWriter(str(root / f"toy-{split}-00000-of-00001.tfrecord")) as writer:
        for i, y in enumerate(labels):
            buf = io.BytesIO()
            Image.fromarray(image(y)).save(buf, format="PNG")
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
    assert "emojione_zero_shot" not in evals and "symbola_retrieval" not in evals
    (tmp_path / "emoji_styles").mkdir()
    (tmp_path / "emoji_styles" / "emojione-test-00000-of-00001.tfrecord").write_bytes(b"")
    evals = embedded_evals(str(tmp_path), 32)
    style = evals["emojione_zero_shot"]
    assert style["shards"].endswith("emoji_styles/emojione-test-*.tfrecord")
    assert style["classnames"] == evals["emoji_zero_shot"]["classnames"]  # the same 99 labels
    assert evals["emojione_retrieval"]["captions"] == 1 and "symbola_zero_shot" not in evals
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


# ----------------------------------------------------------------------------------------
# the ridge-map baseline


def test_fit_ridge_matches_an_independent_closed_form():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(80, 6))
    y = x @ rng.normal(size=(6, 3)) + rng.normal(size=3) + 0.3 * rng.normal(size=(80, 3))

    def augmented(x, y, alpha):  # [x 1] theta, penalty on every weight but the bias
        z = np.hstack([x, np.ones((len(x), 1))])
        penalty = alpha * np.diag([1.0] * x.shape[1] + [0.0])
        theta = np.linalg.solve(z.T @ z + penalty, z.T @ y)
        return theta[:-1], theta[-1]

    alphas = (1e-3, 0.3, 3.0, 30.0, 300.0)
    w, b, alpha, scores = baselines.fit_ridge(x, y, alphas, val_fraction=0.25, seed=3)
    fit, val = baselines.holdout_split(80, 0.25, 3)
    assert len(val) == 20 and not set(fit) & set(val) and len(fit) + len(val) == 80
    mse = {}
    for a in alphas:
        wa, ba = augmented(x[fit], y[fit], a)
        mse[a] = np.mean((x[val] @ wa + ba - y[val]) ** 2)
    assert alpha == min(mse, key=mse.get)
    assert scores == pytest.approx(mse, rel=1e-9)
    w_ref, b_ref = augmented(x, y, alpha)  # refit on all of x
    np.testing.assert_allclose(w, w_ref, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b, b_ref, rtol=1e-8, atol=1e-10)
    heavy, _ = baselines.ridge_solve(x, y, 1e9)
    assert np.abs(heavy).max() < 1e-6  # strong penalty: only the (unpenalised) bias is left


def test_caption_targets_average_normalised_captions():
    table = {"a": [3.0, 0.0], "b": [0.0, 2.0], "c": [1.0, 1.0]}

    class Texts:
        def text_embeddings(self, texts):
            return np.asarray([table[t] for t in texts], np.float32)

    targets, kept = baselines.caption_targets(Texts(), [["a", "b"], [], ["c"]])
    np.testing.assert_array_equal(kept, [0, 2])  # the image without captions is left out
    np.testing.assert_allclose(targets, [[0.5, 0.5], [2**-0.5, 2**-0.5]], rtol=1e-6)


class ClassTextEncoder:
    """A "pretrained" text tower: a caption or prompt naming class c -> the one-hot of c.
    Its image tower is deliberately useless (a constant), so only baselines can score."""

    has_text = True

    def __init__(self):
        self.texts = 0

    def image_features(self, images):
        emb = np.tile(np.eye(8, dtype=np.float32)[7], (len(images), 1))
        return {"emb": emb, "feature": images.reshape(len(images), -1)[:, :4].astype(np.float32)}

    def text_embeddings(self, texts):
        self.texts += len(texts)
        out = np.zeros((len(texts), 8), np.float32)
        for i, t in enumerate(texts):
            out[i, next(c for c, name in enumerate(CLASSES) if name in t)] = 1.0
        return out


def test_ridge_map_baseline_end_to_end(tmp_path, monkeypatch):
    write_toy_shards(tmp_path, [8, 8, 8, 8, 8, 8], "train", block_image)
    write_toy_shards(tmp_path, [2, 3, 1, 2, 2, 3], "test", block_image)
    common = dict(image_size=16, raw_pixel_size=8, batch_size=32, plots=False)
    test, train = (str(tmp_path / f"toy-{s}-*.tfrecord") for s in ("test", "train"))
    names = str(tmp_path / "toy-classnames.json")
    cfg = {
        "zs": dict(type="zero_shot", shards=test, classnames=names, **common),
        "ret": dict(type="retrieval", shards=test, **common),
        "nn": dict(type="knn", train_shards=train, test_shards=test, layers=("feature",), k=3),
    }
    cfg["nn"].update(common)
    ridge = baselines.RidgeMap(
        shards=train,
        text_id="toy@0",
        limit=None,
        image_size=16,
        raw_pixel_size=8,
        alphas=(1e-3, 10.0),
        val_fraction=0.25,
    )
    runner.clear_cache()
    baselines._RIDGE_FITS.clear()
    enc = ClassTextEncoder()
    workdir = str(tmp_path / "w")
    out = runner.run_evals(cfg, enc, workdir=workdir, step=1, ridge_map=ridge)
    data = json.load(open(tmp_path / "w" / "eval" / "latest.json"))
    ridge_metrics = data["baselines"]["ridge_map"]
    # linear in pixels by construction: the map finds each class's text exactly
    assert ridge_metrics["zs/top1"] == 1.0 and ridge_metrics["ret/img2txt_class_R@1"] == 1.0
    assert out["zs/top1"] < 0.5  # the constant image tower
    assert not any(k.startswith("nn/") for k in ridge_metrics)  # text evaluations only
    md = open(tmp_path / "w" / "eval" / "latest.md").read()
    assert "| eval | metric | trained | raw pixels | random init | ridge map |" in md
    assert "| zs | top1 | " in md and md.split("| zs | top1 | ")[1].split("\n")[0].endswith("| 1 |")
    assert "| nn | feature/top1 |" in md

    # cached by the text tower's identity: the same id refits nothing, a new one refits
    built = []
    real_build = baselines.RidgeMap.build
    monkeypatch.setattr(
        baselines.RidgeMap,
        "build",
        lambda self, e: built.append(self.text_id) or real_build(self, e),
    )
    runner.run_evals(cfg, enc, workdir=workdir, step=2, ridge_map=ridge)
    assert built == []
    import dataclasses

    tuned = dataclasses.replace(ridge, text_id="toy@1")
    runner.run_evals(cfg, enc, workdir=workdir, step=3, ridge_map=tuned)
    assert built == ["toy@1"]
    keys = json.load(open(tmp_path / "w" / "eval" / "baselines.json"))
    assert len([k for k in keys if k.startswith("zs/ridge_map/")]) == 2


def test_report_shows_the_ridge_column_only_when_there_is_one(tmp_path):
    from mmssl_jax.evaluation import report

    metrics = {"zs/top1": 0.5, "probe/emb/top1": 0.9}
    base = {
        "raw_pixels": {"probe/emb/top1": 0.8},
        "random_init": {"zs/top1": 0.1, "probe/emb/top1": 0.3},
        "ridge_map": {"zs/top1": 0.25},
    }
    paths = report.write_report(str(tmp_path), 3, metrics, base)
    md = open(paths["md"]).read()
    assert "| eval | metric | trained | raw pixels | random init | ridge map |" in md
    assert "| zs | top1 | 0.5 | - | 0.1 | 0.25 |" in md
    assert "| probe | emb/top1 | 0.9 | 0.8 | 0.3 | - |" in md
    row = json.load(open(paths["json"]))["rows"][0]
    assert row["ridge_map"] == 0.25
    paths = report.write_report(str(tmp_path), 4, metrics, {**base, "ridge_map": {}})
    md = open(paths["md"]).read()
    assert "ridge map" not in md and "| zs | top1 | 0.5 | - | 0.1 |" in md


def test_the_hook_offers_the_ridge_map_only_for_a_pretrained_text_tower():
    import ml_collections

    from configs.tiny_clip import get_config
    from mmssl_jax.evaluation import hook

    config = get_config("text=bert")
    variables = {"params": {"text_encoder": {"w": np.ones(3, np.float32)}, "img": np.ones(2)}}
    bert = dict(text_encoder="bert", text_pretrained=True, text_path="all-minilm-l6-v2")
    made = hook.ridge_map_for(config, bert, variables)
    assert made.shards == config.eval_baselines.ridge_map.shards
    assert made.text_id.startswith("all-minilm-l6-v2@")
    assert hook.ridge_map_for(config, {**bert, "text_pretrained": False}, variables) is None
    assert hook.ridge_map_for(config, {**bert, "text_encoder": "text_tiny"}, variables) is None
    tuned = {"params": {**variables["params"], "text_encoder": {"w": np.full(3, 2.0)}}}
    other_image = {"params": {**variables["params"], "img": np.zeros(2)}}
    assert hook.ridge_map_for(config, bert, tuned).text_id != made.text_id
    assert hook.ridge_map_for(config, bert, other_image).text_id == made.text_id
    bare = ml_collections.ConfigDict({"evals": {}})
    assert hook.ridge_map_for(bare, bert, variables) is None


def test_ridge_map_fits_on_a_seeded_random_subset_not_the_first_records():
    ridge = baselines.RidgeMap(shards="x", text_id="t", limit=10, seed=1)
    rows = ridge.subset(100)
    assert len(set(rows)) == 10 and list(rows) == sorted(rows) and rows.max() > 50
    np.testing.assert_array_equal(rows, ridge.subset(100))  # deterministic
    np.testing.assert_array_equal(ridge.subset(7), np.arange(7))  # fewer than limit: all
    assert "seed" in ridge.identity() and "batch_size" not in ridge.identity()


def test_baselines_can_be_turned_off_from_the_command_line():
    """`--config.evals.NAME.baselines=False` names a key the config holds (main checks every
    override with check_keys before absl parses), and a bool, so absl parses it as one."""
    from configs.tiny_clip import get_config
    from mmssl_jax.config_utils import check_keys

    config = get_config()
    check_keys([f"evals.{name}.baselines" for name in config.evals], config)
    assert all(cfg.baselines is True for cfg in config.evals.values())


def test_a_recipe_can_keep_some_evaluations_without_baselines():
    """`configs/NAME.py:evals=a+b,baselines=false`: a tuning try pays for what it reads."""
    from configs.tiny_minilm import get_config

    every = get_config()
    config = get_config("evals=emoji_retrieval+emoji_zero_shot,baselines=false")
    assert list(config.evals) == ["emoji_retrieval", "emoji_zero_shot"]
    assert all(cfg.baselines is False for cfg in config.evals.values())
    assert config.evals.emoji_zero_shot.to_dict() == dict(
        every.evals.emoji_zero_shot.to_dict(), baselines=False
    )
    with pytest.raises(ValueError, match="unknown \\['emoji_retreival'\\]; valid: .*emoji_r"):
        get_config("evals=emoji_retreival")


def test_probe_fits_run_on_the_configured_blas_threads(monkeypatch):
    """One BLAS thread by default: OpenBLAS's second thread made the quick start's tall,
    skinny L-BFGS products slower (linear_probe's docstring)."""
    from threadpoolctl import threadpool_info

    seen = []

    def probe(*args, **kwargs):
        seen.append([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"])
        return {"top1": 1.0}

    monkeypatch.setattr(linear_probe, "linear_probe", probe)
    monkeypatch.setattr(context, "per_layer", lambda *a: a[-1](None, None, None, None))
    cfg = dict(linear_probe.DEFAULTS, seed=0)
    assert cfg["blas_threads"] == 1
    assert linear_probe.run(None, "probe", cfg, None, None, False) == {"top1": 1.0}
    assert seen and seen[0] and all(n == 1 for n in seen[0])
