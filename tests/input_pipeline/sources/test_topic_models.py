"""Text models for topic targets (input_pipeline/sources/topics.py) and tools/fit_topics.py on the
real embedded captions: LDA vectors are distributions, fits are deterministic for a seed,
saved models (no pickle) reproduce their vectors, and the written shards feed the pipeline."""

import json

import numpy as np
import pytest

from input_pipeline import pipeline, records, tfrecord
from input_pipeline.sources import topics
from tools import fit_topics


@pytest.fixture(scope="module")
def docs(embedded_data):
    all_docs = topics.read_documents(str(embedded_data / "emoji" / "emoji-train-*.tfrecord"))
    assert len(all_docs) > 2000 and all(all_docs)
    return all_docs[::4]  # ~720 documents: enough words, quick fits


def test_record_text_joins_captions_or_uses_class_name():
    ex = {"texts": ["grinning face", " face, grin "], "label": 3}
    assert topics.record_text(ex) == "grinning face. face, grin"
    ex = {"texts": [], "label": 1}
    assert topics.record_text(ex) == ""
    assert topics.record_text(ex, ["a", ["shirt", "top"]]) == "shirt. top"


def test_lda_vectors_are_distributions_and_deterministic(docs, tmp_path):
    fit = lambda seed: topics.fit_text_model(docs, "lda", dim=12, seed=seed, max_iter=8)
    model = fit(0)
    vectors = model.transform(docs)
    assert vectors.shape == (len(docs), 12) and vectors.dtype == np.float32
    assert np.all(vectors >= 0)
    np.testing.assert_allclose(vectors.sum(1), 1.0, rtol=1e-5)
    # Different documents get different topics (not all uniform).
    assert vectors.max(1).mean() > 2.0 / 12
    again = fit(0)
    np.testing.assert_array_equal(again.arrays["components"], model.arrays["components"])
    np.testing.assert_array_equal(again.transform(docs), vectors)
    assert not np.allclose(fit(1).arrays["components"], model.arrays["components"])
    # An empty document (no known word) is the uniform distribution.
    np.testing.assert_allclose(model.transform([""])[0], 1 / 12, rtol=1e-5)

    model.save(str(tmp_path))
    with open(tmp_path / topics.MODEL_JSON) as f:
        meta = json.load(f)
    assert meta["kind"] == "lda" and len(meta["vocabulary"]) == model.arrays["components"].shape[1]
    loaded = topics.TextModel.load(str(tmp_path))  # np.load(allow_pickle=False) inside
    np.testing.assert_array_equal(loaded.transform(docs), vectors)


def _unit_or_zero(model, docs, vectors):
    """Rows are unit vectors, or zeros for documents without a word of the vocabulary."""
    known = np.asarray(topics._vectorizer(model.vocabulary).transform(docs).sum(1))[:, 0] > 0
    assert known.mean() > 0.9
    norms = np.linalg.norm(vectors, axis=1)
    np.testing.assert_allclose(norms[known], 1.0, rtol=1e-5)
    np.testing.assert_array_equal(norms[~known], 0.0)


def test_lsa_unit_vectors_deterministic_and_reloadable(docs, tmp_path):
    model = topics.fit_text_model(docs, "lsa", dim=16, seed=3)
    vectors = model.transform(docs)
    assert vectors.shape == (len(docs), 16)
    _unit_or_zero(model, docs, vectors)
    assert vectors.min() < 0  # signed: not a target for softmax/BCE
    again = topics.fit_text_model(docs, "lsa", dim=16, seed=3)
    np.testing.assert_array_equal(again.transform(docs), vectors)
    model.save(str(tmp_path))
    np.testing.assert_array_equal(topics.TextModel.load(str(tmp_path)).transform(docs), vectors)
    # Our tf-idf equals scikit-learn's TfidfTransformer with the same settings.
    from sklearn.feature_extraction.text import TfidfTransformer

    counts = topics._vectorizer(model.vocabulary).transform(docs)
    ref = TfidfTransformer(sublinear_tf=True).fit(counts)
    np.testing.assert_allclose(
        topics._tfidf(counts, ref.idf_).toarray(), ref.transform(counts).toarray(), rtol=1e-12
    )


def test_word2vec_mean_vectors(docs, tmp_path):
    pytest.importorskip("gensim")
    model = topics.fit_text_model(docs, "word2vec", dim=8, seed=0, max_iter=3)
    vectors = model.transform(docs)
    _unit_or_zero(model, docs, vectors)
    again = topics.fit_text_model(docs, "word2vec", dim=8, seed=0, max_iter=3)
    np.testing.assert_array_equal(again.arrays["vectors"], model.arrays["vectors"])
    model.save(str(tmp_path))
    np.testing.assert_array_equal(topics.TextModel.load(str(tmp_path)).transform(docs), vectors)


def test_fit_topics_writes_same_records_with_topics(embedded_data, tmp_path):
    src = str(embedded_data / "emoji" / "emoji-test-*.tfrecord")
    out = tmp_path / "topics"
    summary = fit_topics.main(
        ["--fit", src, "--kind", "lda", "--dim", "6", "--max_iter", "5", "--output_dir", str(out)]
    )
    assert summary["records"] == len(tfrecord.TFRecordSource(src))
    assert (out / "text_model.json").exists() and (out / "emoji-classnames.json").exists()
    before = tfrecord.TFRecordSource(src)
    after = tfrecord.TFRecordSource(str(out / "emoji-test-*.tfrecord"))  # .idx written
    model = topics.TextModel.load(str(out))
    for i in range(0, len(before), 97):
        a, b = records.decode_example(before[i]), records.decode_example(after[i])
        assert a["topics"] is None and b["topics"].shape == (6,)
        assert {k: a[k] for k in ("image", "texts", "label", "id")} == {
            k: b[k] for k in ("image", "texts", "label", "id")
        }
        np.testing.assert_allclose(b["topics"], model.transform([topics.record_text(a)])[0])
        np.testing.assert_allclose(b["topics"].sum(), 1.0, rtol=1e-5)

    # The pipeline's `topics` batch key reads them; a record without topics is a bad record.
    cfg = pipeline.default_config()
    cfg.image_size = 16
    cfg.topic_dim = 6
    cfg.sources = {"emoji": pipeline.source_config(str(out / "emoji-test-*.tfrecord"))}
    it = pipeline.make_train_iterator(
        cfg, global_batch_size=8, needs={"topics", "rotated"}, process_index=0, process_count=1
    )
    batch = next(it)
    assert batch["topics"].shape == (8, 6) and batch["topics"].dtype == np.float32
    assert batch["rotated"].shape == (8, 16, 16, 3) and batch["rotated"].dtype == np.uint8
    cfg.sources = {"emoji": pipeline.source_config(src)}
    it = pipeline.make_train_iterator(
        cfg, global_batch_size=8, needs={"topics"}, process_index=0, process_count=1
    )
    with pytest.raises(pipeline.BadInputError, match="no 'topics' feature"):
        next(it)
