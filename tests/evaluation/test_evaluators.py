"""Evaluators on hand-made features with exact expected values, and the runner end to end on
tiny real Fashion-MNIST shards with a fake encoder (fixed random projections of pixels)."""

from __future__ import annotations

import gzip
import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from mmssl_jax.evaluation import (
    baselines,
    context,
    encoder,
    knn,
    linear_probe,
    plots,
    report,
    retrieval,
    runner,
    svm_map,
    zero_shot,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: str) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, path
    with Image.open(path) as im:
        im.verify()


# ----------------------------------------------------------------------------------------
# zero-shot


def test_zero_shot_top1_top5_mean_per_class():
    # 6 classes with one-hot embeddings; an image's logits are its (normalised) row.
    class_emb = np.eye(6, dtype=np.float32)
    images = np.array(
        [
            [9, 1, 0, 0, 0, 0],  # label 0, predicted 0
            [8, 0, 0, 0, 0, 0],  # label 0, predicted 0
            [1, 5, 0, 0, 0, 0],  # label 0, predicted 1 (true class 2nd)
            [0, 7, 1, 0, 0, 0],  # label 1, predicted 1
            [6, 5, 4, 3, 2, 1],  # label 5, predicted 0 (true class ranked 6th: top-5 miss)
        ],
        np.float32,
    )
    labels = np.array([0, 0, 0, 1, 5])
    result = zero_shot.evaluate(images, class_emb, labels)
    np.testing.assert_array_equal(result.predictions, [0, 0, 1, 1, 0])
    assert result.metrics["top1"] == pytest.approx(3 / 5)
    assert result.metrics["top5"] == pytest.approx(4 / 5)
    # classes present: 0 (2/3), 1 (1/1), 5 (0/1)
    assert result.metrics["mean_per_class"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    np.testing.assert_array_equal(zero_shot.topk_correct(result.logits, labels, 2), [1, 1, 1, 1, 0])
    cm = zero_shot.confusion_matrix(labels, result.predictions, 6)
    assert cm[0, 0] == 2 and cm[0, 1] == 1 and cm[1, 1] == 1 and cm[5, 0] == 1
    assert cm.sum() == 5
    with pytest.raises(ValueError, match="labels must lie"):
        zero_shot.evaluate(images, class_emb[:5], labels)


def test_class_embeddings_average_normalised_prompts_and_renormalise():
    table = {
        "a cat": np.array([10.0, 0.0, 0.0]),  # long vector: must be normalised first
        "the cat": np.array([0.0, 1.0, 0.0]),
        "a dog": np.array([0.0, 0.0, 3.0]),
        "the dog": np.array([0.0, 0.0, 1.0]),
        "a puppy": np.array([0.0, 2.0, 0.0]),
        "the puppy": np.array([0.0, 2.0, 0.0]),
    }
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return np.stack([table[t] for t in texts])

    templates = ["a {}", "the {}"]
    cls = zero_shot.class_embeddings(embed, ["cat", ["dog", "puppy"]], templates)
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(cls[0], [s, s, 0], atol=1e-6)  # mean of units, renormalised
    np.testing.assert_allclose(cls[1], [0, s, s], atol=1e-6)  # synonyms: 4 prompts averaged
    np.testing.assert_allclose(np.linalg.norm(cls, axis=1), 1.0, atol=1e-6)
    assert len(calls) == 1 and len(calls[0]) == 6  # one batched call


def test_class_embeddings_with_project_templates():
    from input_pipeline.templates import load_templates, prompts_for

    templates = load_templates("imagenet7")
    seen = []

    def embed(texts):
        seen.extend(texts)
        return np.ones((len(texts), 4))

    cls = zero_shot.class_embeddings(embed, ["cat", ["dog", "hound"]], templates, prompts_for)
    assert len(seen) == 7 * 3 and "itap of a cat." in seen
    np.testing.assert_allclose(cls, 0.5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# retrieval


def test_ranking_metrics_hand_computed():
    sims = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.1, 0.7]])
    relevant = np.array([[0, 1, 1, 0], [1, 0, 0, 0]], bool)
    hits, ap = retrieval.ranking_metrics(sims, relevant, ks=(1, 2, 3))
    # query 0 ranking: 0, 2, 3, 1 -> relevant at ranks 2 and 4: AP = (1/2 + 2/4) / 2
    # query 1 ranking: 1, 3, 0, 2 -> relevant at rank 3: AP = 1/3
    np.testing.assert_array_equal(hits[1], [False, False])
    np.testing.assert_array_equal(hits[2], [True, False])
    np.testing.assert_array_equal(hits[3], [True, True])
    np.testing.assert_allclose(ap, [0.5, 1 / 3])
    _, ap_none = retrieval.ranking_metrics(sims[:1], np.zeros((1, 4), bool))
    assert np.isnan(ap_none[0])


def test_retrieval_metrics_hand_computed():
    images = np.eye(3)
    texts = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0.6, 0.8], [0.8, 0, 0.6]])
    text_to_image = np.array([0, 0, 1, 2])
    m = retrieval.retrieval_metrics(
        images, texts, text_to_image, image_labels=np.array([0, 1, 0]), ks=(1, 5)
    )
    # image->text rankings: img0: t0 t3 t1 t2; img1: t1 t2 t0 t3; img2: t2 t3 t0 t1
    assert m["img2txt_R@1"] == pytest.approx(1 / 3)
    assert m["img2txt_R@5"] == 1.0
    # text->image top-1: t0->img0 (hit), t1->img1, t2->img2, t3->img0 (misses)
    assert m["txt2img_R@1"] == pytest.approx(1 / 4)
    assert m["txt2img_R@5"] == 1.0
    # class relevance (text classes 0 0 1 0): APs 1, 1/2, (1/2 + 2/3 + 3/4) / 3
    assert m["img2txt_class_R@1"] == pytest.approx(1 / 3)
    assert m["img2txt_mAP"] == pytest.approx((1 + 0.5 + (0.5 + 2 / 3 + 0.75) / 3) / 3)
    # t0: img0 img1 img2 (tie kept in index order) -> (1 + 2/3)/2; t1: img1 img0 img2 ->
    # (1/2 + 2/3)/2; t2: img2 img1 img0 -> 1/2; t3: img0 img2 img1 -> 1
    expected = ((1 + 2 / 3) / 2 + (0.5 + 2 / 3) / 2 + 0.5 + 1.0) / 4
    assert m["txt2img_mAP"] == pytest.approx(expected)
    assert m["txt2img_class_R@1"] == pytest.approx(2 / 4)


def test_retrieval_matches_sklearn_and_brute_force():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(40, 8))
    txt = rng.normal(size=(70, 8))
    t2i = np.concatenate([np.arange(40), rng.integers(0, 40, 30)])
    labels = rng.integers(0, 5, 40)
    m = retrieval.retrieval_metrics(img, txt, t2i, image_labels=labels, ks=(1, 5, 10), chunk=16)
    sims = encoder.l2_normalize(img) @ encoder.l2_normalize(txt).T
    rel_i2t = labels[:, None] == labels[t2i][None, :]
    ap_i2t = [average_precision_score(r, s) for r, s in zip(rel_i2t, sims, strict=True)]
    ap_t2i = [average_precision_score(r, s) for r, s in zip(rel_i2t.T, sims.T, strict=True)]
    assert m["img2txt_mAP"] == pytest.approx(np.mean(ap_i2t), abs=1e-9)
    assert m["txt2img_mAP"] == pytest.approx(np.mean(ap_t2i), abs=1e-9)
    for k in (1, 5, 10):
        top_t = np.argsort(-sims, axis=1)[:, :k]
        pair = np.mean([(t2i[top_t[i]] == i).any() for i in range(40)])
        cls = np.mean([(labels[t2i[top_t[i]]] == labels[i]).any() for i in range(40)])
        top_i = np.argsort(-sims.T, axis=1)[:, :k]
        back = np.mean([(top_i[j] == t2i[j]).any() for j in range(70)])
        assert m[f"img2txt_R@{k}"] == pytest.approx(pair)
        assert m[f"img2txt_class_R@{k}"] == pytest.approx(cls)
        assert m[f"txt2img_R@{k}"] == pytest.approx(back)


def test_retrieval_skips_images_without_captions_and_unlabelled():
    texts, owner = retrieval.flatten_captions([["a", "b"], [], "c"])
    assert texts == ["a", "b", "c"] and owner.tolist() == [0, 0, 2]
    img = np.eye(3)
    txt = np.array([[1, 0, 0], [1, 0.1, 0], [0, 0, 1.0]])
    m = retrieval.retrieval_metrics(img, txt, owner, image_labels=np.array([0, -1, 1]), ks=(1,))
    assert m["img2txt_R@1"] == 1.0  # image 1 has no caption: not a query
    assert m["img2txt_mAP"] == 1.0  # unlabelled image 1 neither relevant nor a query


# ----------------------------------------------------------------------------------------
# kNN


def test_knn_weighted_votes():
    deg = np.deg2rad
    train = np.array([[np.cos(deg(a)), np.sin(deg(a))] for a in (0, 37, 37, 90)])
    train_y = np.array([0, 1, 1, 1])
    test = np.array([[1.0, 0.0]])  # sim 1.0 to class 0, cos(37 deg) ~ 0.8 to two class-1 points
    # weighted votes, T=0.07: exp(1/T) vs 2 exp(0.8/T): class 0 wins; T=1: class 1 wins
    assert knn.knn_predict(train, train_y, test, k=3, temperature=0.07).tolist() == [0]
    assert knn.knn_predict(train, train_y, test, k=3, temperature=1.0).tolist() == [1]
    assert knn.knn_predict(train, train_y, test, k=1).tolist() == [0]
    # k larger than the training set uses all of it; features are L2-normalised first
    assert knn.knn_predict(5 * train, train_y, test, k=50, temperature=1.0).tolist() == [1]
    acc = knn.knn_accuracy(train, train_y, np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 0]))
    assert acc == {"top1": 0.5}


# ----------------------------------------------------------------------------------------
# linear probe and SVM mAP on load_digits


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(d.target))
    x, y = d.data[order].astype(np.float32), d.target[order]
    return x[:1000], y[:1000], x[1000:], y[1000:]


def test_linear_probe_beats_chance_and_equals_sklearn(digits):
    x_tr, y_tr, x_te, y_te = digits
    out = linear_probe.linear_probe(x_tr, y_tr, x_te, y_te, Cs=(1e-3, 1e-2, 1e-1, 1.0))
    assert out["top1"] > 0.9  # chance is 0.1
    assert out["C"] in (1e-3, 1e-2, 1e-1, 1.0) and 0 < out["val_top1"] <= 1
    direct = make_pipeline(StandardScaler(), LogisticRegression(C=out["C"], max_iter=1000))
    assert out["top1"] == direct.fit(x_tr, y_tr).score(x_te, y_te)
    single = linear_probe.linear_probe(x_tr, y_tr, x_te, y_te, Cs=(0.05,))
    direct = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=1000))
    assert single["top1"] == direct.fit(x_tr, y_tr).score(x_te, y_te)
    # the held-out selection: the chosen C scores best on the split
    best, scores = linear_probe.select_c(x_tr, y_tr, (1e-3, 1.0))
    assert scores[best] == max(scores.values())


def test_duplicate_and_constant_columns_merge_into_the_same_probe(digits):
    # Digits as a gray RGB image (each pixel three times; some border pixels constant over
    # train): the merged probe fits one column per varying pixel, and is sklearn's probe up
    # to L-BFGS's tolerance (same objective value; scores within 0.05 of about +-10).
    varying = int((np.ptp(digits[0], axis=0) > 0).sum())
    assert varying < 64
    x_tr, y_tr, x_te, y_te = (np.repeat(a, 3, axis=1) if a.ndim == 2 else a for a in digits)
    scaled = StandardScaler().fit(x_tr)
    merge = linear_probe.MergeDuplicateColumns().fit(scaled.transform(x_tr))
    assert merge.transform(scaled.transform(x_te)).shape == (len(x_te), varying)
    tight = dict(C=0.05, max_iter=5000, tol=1e-8)
    direct = make_pipeline(StandardScaler(), LogisticRegression(**tight)).fit(x_tr, y_tr)
    merged = linear_probe.make_probe(0.05)
    merged.set_params(logisticregression__max_iter=5000, logisticregression__tol=1e-8)
    merged.fit(x_tr, y_tr)
    np.testing.assert_allclose(
        merged.decision_function(x_te), direct.decision_function(x_te), atol=0.05
    )
    assert np.mean(merged.predict(x_te) == direct.predict(x_te)) > 0.995
    no_duplicates = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    passthrough = linear_probe.MergeDuplicateColumns().fit(no_duplicates)
    assert passthrough.transform(no_duplicates) is no_duplicates


def test_svm_map_matches_sklearn(digits):
    x_tr, y_tr, x_te, y_te = (a[:400] for a in digits)
    Cs = (0.01, 0.1)
    result = svm_map.svm_map(x_tr, y_tr, x_te, y_te, Cs=Cs, folds=3)
    scaler = StandardScaler().fit(x_tr)
    aps = []
    for c in range(10):
        search = GridSearchCV(
            LinearSVC(random_state=0, max_iter=2000),
            {"C": list(Cs)},
            scoring="average_precision",
            cv=StratifiedKFold(3, shuffle=True, random_state=0),
        ).fit(scaler.transform(x_tr), y_tr == c)
        scores = search.best_estimator_.decision_function(scaler.transform(x_te))
        aps.append(average_precision_score(y_te == c, scores))
        assert result.costs[c] == search.best_params_["C"]
    np.testing.assert_allclose(result.ap, aps, atol=1e-12)
    assert result.metrics["mAP"] == pytest.approx(np.mean(aps))
    assert result.metrics["mAP"] > 0.8 and result.metrics["num_classes"] == 10
    # a multi-label target matrix gives the same numbers as the single-label labels
    multi = svm_map.svm_map(x_tr, np.eye(10)[y_tr], x_te, np.eye(10)[y_te], Cs=Cs, folds=3)
    np.testing.assert_allclose(multi.ap, result.ap)


def test_svm_map_separable_and_skips_unscorable_classes():
    x_tr = np.array([[0.0, 1], [0.1, 1], [0.2, 1], [0.3, 1], [5, 1], [5.1, 1], [5.2, 1], [5.3, 1]])
    y_tr = np.array([[1, 0, 0]] * 4 + [[0, 1, 0]] * 4)  # class 2 never positive
    x_te = np.array([[0.05, 1], [5.05, 1], [0.15, 1]])
    y_te = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]])
    out = svm_map.svm_map(x_tr, y_tr, x_te, y_te, Cs=(1.0,))
    assert out.metrics == {"mAP": 1.0, "num_classes": 2.0}
    assert np.isnan(out.ap[2])


# ----------------------------------------------------------------------------------------
# encoders, report, plots


class RecordingEncoder:
    def __init__(self):
        self.shapes = []

    def image_features(self, images):
        self.shapes.append(images.shape)
        x = images.reshape(len(images), -1).astype(np.float32)
        return {"feature": x, "emb": encoder.l2_normalize(x + 1)}

    def text_embeddings(self, texts):
        self.shapes.append(len(texts))
        return encoder.l2_normalize(np.array([[len(t), 1.0] for t in texts]))


def test_encode_images_pads_the_last_batch_and_keeps_order():
    enc = RecordingEncoder()
    images = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    out = encoder.encode_images(enc, images, batch_size=4, progress=False)
    assert [s[0] for s in enc.shapes] == [4, 4, 4]  # one compiled shape
    np.testing.assert_array_equal(out["feature"], images.reshape(10, -1))
    out = encoder.encode_images(enc, images, batch_size=4, layers=["emb"], progress=False)
    assert list(out) == ["emb"] and out["emb"].shape == (10, 12)
    texts = [f"t{'x' * i}" for i in range(5)]
    emb = encoder.encode_texts(enc, texts, batch_size=2, progress=False)
    assert enc.shapes[-3:] == [2, 2, 2] and emb.shape == (5, 2)
    np.testing.assert_allclose(emb, encoder.l2_normalize([[i + 1, 1] for i in range(5)]))
    assert encoder.has_text(enc) and isinstance(enc, encoder.Encoder)


def test_raw_pixel_encoder():
    images = np.full((3, 8, 8, 3), 255, np.uint8)
    raw = encoder.RawPixelEncoder()
    f = raw.image_features(images)
    assert list(f) == ["feature"] and f["feature"].shape == (3, 192)
    np.testing.assert_allclose(f["feature"], 1.0)
    assert encoder.RawPixelEncoder(4).image_features(images)["feature"].shape == (3, 48)
    assert not encoder.has_text(raw)
    assert not baselines.applies("raw_pixels", runner.evaluator("zero_shot"), raw)
    assert baselines.applies("raw_pixels", runner.evaluator("linear_probe"), raw)
    assert not baselines.applies("raw_pixels", runner.evaluator("finetune"), raw)


def test_report_files(tmp_path):
    metrics = {"zs/top1": 0.5, "probe/emb/top1": 0.9, "probe/emb/C": 0.01}
    base = {
        "raw_pixels": {"probe/emb/top1": 0.8, "probe/emb/C": 0.1},
        "random_init": {"zs/top1": 0.1, "probe/emb/top1": 0.3, "probe/emb/C": 1.0},
    }
    paths = report.write_report(str(tmp_path), 12, metrics, base, plots=["plots/a.png"])
    for key in ("json", "md", "latest_md", "latest_json"):
        assert os.path.exists(paths[key])
    assert paths["json"].endswith(os.path.join("eval", "results_step_12.json"))
    data = json.load(open(paths["json"]))
    assert data["step"] == 12 and data["metrics"] == metrics
    row = next(r for r in data["rows"] if r["eval"] == "probe" and r["metric"] == "emb/top1")
    assert row == {
        "eval": "probe",
        "metric": "emb/top1",
        "value": 0.9,
        "raw_pixels": 0.8,
        "random_init": 0.3,
    }
    md = open(paths["md"]).read()
    assert "| probe | emb/top1 | 0.9 | 0.8 | 0.3 |" in md
    assert "| zs | top1 | 0.5 | - | 0.1 |" in md
    assert "![a](plots/a.png)" in md
    assert open(paths["latest_md"]).read() == md


def test_plots_are_pngs(tmp_path):
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 20, (4, 4))
    p = plots.plot_confusion_matrix(cm, ["a", ["b", "bb"], "c", "d" * 40], str(tmp_path / "cm.png"))
    assert_png(p)
    emb = np.concatenate([rng.normal(size=(30, 5)) + 4 * i for i in range(3)])
    labels = np.repeat(np.arange(3), 30)
    p = plots.plot_embedding_map(emb, labels, ["x", "y", "z"], str(tmp_path / "t" / "tsne.png"))
    assert_png(p)
    assert len(plots.subsample(5000, 1000)) == 1000
    jsonl = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1 / (s + 1), "lr": 0.1} for s in range(5)]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{torn")
    assert_png(plots.plot_curves(str(jsonl), str(tmp_path / "curves.png")))
    assert plots.plot_curves([{"step": 1}], str(tmp_path / "none.png")) is None


# ----------------------------------------------------------------------------------------
# runner on tiny real Fashion-MNIST shards

FMNIST = "/usr/share/datasets/fashion-mnist"
CLASSNAMES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]


def read_idx(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(f"{FMNIST}/{split}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(16 + n * 784)[16:], np.uint8).reshape(n, 28, 28)
    with gzip.open(f"{FMNIST}/{split}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(8 + n)[8:], np.uint8).astype(np.int64)
    return images, labels


def write_shard(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    from input_pipeline.records import encode_example
    from input_pipeline.tfrecord import TFRecordWriter

    with TFRecordWriter(path) as writer:
        for i, (img, y) in enumerate(zip(images, labels, strict=True)):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            caption = f"a photo of a {CLASSNAMES[y]}"
            writer.write(
                encode_example(image=buf.getvalue(), texts=[caption], label=int(y), id=str(i))
            )


class FakeEncoder:
    """Fixed random projections of pixels; text = the class centroid of the named class."""

    def __init__(self, centroids: np.ndarray | None, seed: int = 0):
        self.rng_seed, self.centroids, self.proj = seed, centroids, None

    def image_features(self, images):
        x = images.reshape(len(images), -1).astype(np.float32) / 255.0
        if self.proj is None:
            rng = np.random.default_rng(self.rng_seed)
            self.proj = [rng.normal(size=s).astype(np.float32) for s in [(x.shape[1], 32)] * 3]
            self.proj.append(rng.normal(size=(32, 16)).astype(np.float32))
        feature = x @ self.proj[0]
        return {
            "feature": feature,
            "emb": encoder.l2_normalize(feature @ self.proj[3]),
            "block_0": x @ self.proj[1],
            "block_1": x @ self.proj[2],
        }

    def text_embeddings(self, texts):
        rng = np.random.default_rng(self.rng_seed + 1)
        out = rng.normal(size=(len(texts), 16))  # random for texts naming no class
        for i, t in enumerate(texts):
            hits = [c for c, name in enumerate(CLASSNAMES) if name in t.split("photo of a ")[-1]]
            if self.centroids is not None and hits:
                out[i] = self.centroids[hits[-1]]
        return encoder.l2_normalize(out)


@pytest.fixture(scope="module")
def fmnist_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    images, labels = read_idx("train", 500)
    write_shard(str(root / "train-00000-of-00001.tfrecord"), images[:300], labels[:300])
    write_shard(str(root / "test-00000-of-00001.tfrecord"), images[300:], labels[300:])
    (root / "classnames.json").write_text(json.dumps(CLASSNAMES))
    return root


def evals_config(root, **extra):
    import ml_collections

    common = dict(image_size=16, batch_size=64, raw_pixel_size=8, tsne_points=80)
    train, test = f"{root}/train-*.tfrecord", f"{root}/test-*.tfrecord"
    probe = dict(train_shards=train, test_shards=test, classnames=f"{root}/classnames.json")
    cfg = {
        "fm_zs": dict(type="zero_shot", shards=test, classnames=f"{root}/classnames.json"),
        "fm_probe": dict(type="linear_probe", layers=("emb", "blocks"), Cs=(0.01, 0.1), **probe),
        "fm_knn": dict(type="knn", layers=("emb",), **probe),
        "fm_ret": dict(type="retrieval", shards=test),
        "fm_svm": dict(type="svm_map", layers=("emb",), Cs=(0.1,), **probe),
    }
    cfg = {k: {**common, **v, **extra} for k, v in cfg.items()}
    return ml_collections.ConfigDict(cfg)


def test_runner_end_to_end(fmnist_shards, tmp_path):
    root = fmnist_shards
    runner.clear_cache()
    from input_pipeline.pipeline import build_eval_arrays

    train = build_eval_arrays(f"{root}/train-*.tfrecord", image_size=16)
    assert train["image"].shape == (300, 16, 16, 3)
    probe_enc = FakeEncoder(None)
    emb = probe_enc.image_features(train["image"])["emb"]
    centroids = np.stack([emb[train["label"] == c].mean(0) for c in range(10)])
    trained = FakeEncoder(centroids)
    built = []

    def random_factory():
        built.append(1)
        return FakeEncoder(None, seed=5)

    workdir = str(tmp_path / "work")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 3.0 - s}) + "\n" for s in range(3))
    )
    cfg = evals_config(root)
    metrics = runner.run_evals(cfg, trained, workdir=workdir, step=7, random_encoder=random_factory)

    for key in (
        "fm_zs/top1",
        "fm_zs/top5",
        "fm_zs/mean_per_class",
        "fm_probe/emb/top1",
        "fm_probe/block_0/top1",
        "fm_probe/block_1/top1",
        "fm_knn/emb/top1",
        "fm_ret/img2txt_R@1",
        "fm_ret/txt2img_class_R@10",
        "fm_ret/img2txt_mAP",
        "fm_svm/emb/mAP",
    ):
        assert 0.0 <= metrics[key] <= 1.0, key
    # nearest-centroid zero-shot on random projections: well above chance (0.1)
    assert metrics["fm_zs/top1"] > 0.4
    assert metrics["fm_probe/block_0/top1"] > 0.5
    assert metrics["fm_ret/img2txt_mAP"] > 0.3
    assert built == [1]

    eval_dir = os.path.join(workdir, "eval")
    data = json.load(open(os.path.join(eval_dir, "results_step_7.json")))
    raw, rand = data["baselines"]["raw_pixels"], data["baselines"]["random_init"]
    assert "fm_zs/top1" not in raw and "fm_ret/img2txt_mAP" not in raw  # no text tower
    assert "fm_zs/top1" in rand and "fm_ret/img2txt_mAP" in rand
    # raw pixels have one layer: every probe row shows the same pixel probe
    assert raw["fm_probe/emb/top1"] == raw["fm_probe/block_1/top1"] > 0.5
    assert rand["fm_probe/block_0/top1"] > 0.3
    assert rand["fm_zs/top1"] < metrics["fm_zs/top1"]
    for name in ("results_step_7.md", "latest.md", "latest.json", "history.jsonl"):
        assert os.path.exists(os.path.join(eval_dir, name))
    md = open(os.path.join(eval_dir, "latest.md")).read()
    assert "| fm_probe | block_1/top1 |" in md
    for p in data["plots"]:
        assert_png(os.path.join(eval_dir, p))
        with Image.open(os.path.join(eval_dir, p)) as im:  # one screen, whatever the data
            assert max(im.size) <= plots.MAX_SIDE_PX, (p, im.size)
    made = {os.path.basename(p) for p in data["plots"]}
    assert {"fm_zs_confusion_step_7.png", "fm_zs_tsne_step_7.png", "eval_curves.png"} <= made
    assert {"fm_probe_tsne_step_7.png", "train_curves.png"} <= made

    # a second call reuses the cached baselines (presentation keys such as plots do not
    # change them): the random encoder is not built again
    cfg2 = evals_config(root, plots=False)
    del cfg2["fm_probe"], cfg2["fm_svm"], cfg2["fm_ret"]
    metrics2 = runner.run_evals(
        cfg2, trained, workdir=workdir, step=8, random_encoder=random_factory
    )
    assert built == [1]
    assert metrics2 == pytest.approx({k: v for k, v in metrics.items() if k in metrics2})
    assert set(metrics2) == {"fm_zs/top1", "fm_zs/top5", "fm_zs/mean_per_class", "fm_knn/emb/top1"}
    second = json.load(open(os.path.join(eval_dir, "results_step_8.json")))
    assert second["baselines"]["random_init"]["fm_zs/top1"] == rand["fm_zs/top1"]
    history = plots.read_jsonl(os.path.join(eval_dir, "history.jsonl"))
    assert [h["step"] for h in history] == [7, 8]


def test_runner_errors(fmnist_shards, tmp_path):
    import ml_collections

    missing = ml_collections.ConfigDict(
        {"x": dict(type="knn", train_shards="/nowhere/a-*.tfrecord", test_shards="/nowhere/b")}
    )
    with pytest.raises(FileNotFoundError, match=r"evals\.x\.train_shards.*nowhere.*make_shards"):
        runner.run_evals(missing, FakeEncoder(None), workdir=str(tmp_path), step=0)
    typo = ml_collections.ConfigDict({"x": dict(type="knn", train_shard="a", test_shards="b")})
    with pytest.raises(ValueError, match="unknown key"):
        runner.run_evals(typo, FakeEncoder(None), workdir=str(tmp_path), step=0)
    with pytest.raises(ValueError, match="type"):
        runner.normalize_config("x", {"type": "finetune"})
    with pytest.raises(ValueError, match="classnames"):
        runner.normalize_config("x", {"type": "zero_shot", "shards": "a"})
    # an image-only model skips the text evaluations instead of failing
    root = fmnist_shards
    cfg = evals_config(root, baselines=False, plots=False)
    del cfg["fm_probe"], cfg["fm_svm"]
    with pytest.raises(ValueError, match="none of layers"):  # raw pixels have no "emb"
        runner.run_evals(cfg, encoder.RawPixelEncoder(8), workdir=str(tmp_path), step=1)
    cfg.fm_knn.layers = ("emb", "feature")
    out = runner.run_evals(cfg, encoder.RawPixelEncoder(8), workdir=str(tmp_path), step=1)
    assert set(out) == {"fm_knn/feature/top1"}  # missing "emb" skipped, zs/ret skipped


# ----------------------------------------------------------------------------------------
# evaluations that cannot run on their data


def test_linear_probe_says_when_train_is_too_small_to_choose_c():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)), np.arange(40) % 10  # 4 per class: sklearn stratifies
    with pytest.raises(context.CannotEvaluateError, match=r"leaves 8 for validation.*at least"):
        linear_probe.linear_probe(x, y, x, y)
    out = linear_probe.linear_probe(x, y, x, y, Cs=(0.1,))  # no choice of C: no split
    assert 0.0 <= out["top1"] <= 1.0
    with pytest.raises(context.CannotEvaluateError, match="fewer than 2 classes"):
        linear_probe.linear_probe(x, np.zeros(40, int), x, y, Cs=(0.1,))
    half = linear_probe.linear_probe(x, y, x, y, Cs=(0.1, 1.0), val_fraction=0.5)  # 20 + 20
    assert half["C"] in (0.1, 1.0)


def test_which_errors_mean_cannot_run():
    from sklearn.model_selection import train_test_split

    with pytest.raises(ValueError) as raised:  # what the runner used to die on
        train_test_split(
            np.zeros((40, 2)), np.arange(40) % 10, test_size=0.2, stratify=np.arange(40) % 10
        )
    assert "scikit-learn" in runner.cannot_run("p", raised.value)
    assert runner.cannot_run("p", context.CannotEvaluateError("evals.p: too few")) == "too few"
    assert runner.cannot_run("p", ValueError("evals.p: unknown layer")) is None  # config error
    assert runner.cannot_run("p", TypeError("a bug")) is None


def test_an_evaluation_that_cannot_run_on_its_data_is_skipped(fmnist_shards, tmp_path, caplog):
    root = fmnist_shards
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    images, labels = read_idx("train", 60)
    train = [int(np.flatnonzero(labels == c)[0]) for c in range(10)] + [40, 41]  # 12, 10 classes
    test = [i for i in range(60) if i not in train]
    write_shard(str(tiny / "train-00000-of-00001.tfrecord"), images[train], labels[train])
    write_shard(str(tiny / "test-00000-of-00001.tfrecord"), images[test], labels[test])
    cfg = evals_config(root)
    del cfg["fm_ret"], cfg["fm_svm"], cfg["fm_probe"]
    cfg.tiny_probe = dict(cfg.fm_knn.to_dict(), type="linear_probe")
    cfg.tiny_probe.train_shards = f"{tiny}/train-*.tfrecord"
    cfg.tiny_probe.test_shards = f"{tiny}/test-*.tfrecord"
    runner.clear_cache()
    workdir = tmp_path / "work"
    with caplog.at_level("WARNING"):
        metrics = runner.run_evals(
            cfg,
            FakeEncoder(None),
            workdir=str(workdir),
            step=5,
            random_encoder=FakeEncoder(None, 5),
        )
    # the probe is skipped, with the reason; the other evaluations ran
    assert not any(k.startswith("tiny_probe/") for k in metrics)
    assert {"fm_zs/top1", "fm_knn/emb/top1"} <= set(metrics)
    reason = metrics.skipped["tiny_probe"]
    assert "12 labelled train records are too few to choose C" in reason
    assert any(
        "evals.tiny_probe (linear_probe) skipped: 12 labelled" in r.message for r in caplog.records
    )
    data = json.load(open(workdir / "eval" / "latest.json"))
    assert data["skipped"] == {"tiny_probe": reason}
    md = open(workdir / "eval" / "latest.md").read()
    assert f"| tiny_probe | skipped: {reason} | - | - | - |" in md
    assert "| fm_knn | emb/top1 |" in md


def test_a_bug_in_an_evaluation_still_stops_the_run(fmnist_shards, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    monkeypatch.setattr(knn, "knn_accuracy", broken)
    cfg = evals_config(fmnist_shards, baselines=False, plots=False)
    del cfg["fm_ret"], cfg["fm_svm"], cfg["fm_probe"], cfg["fm_zs"]
    with pytest.raises(AttributeError, match="no attribute"):
        runner.run_evals(cfg, FakeEncoder(None), workdir=str(tmp_path), step=1)
