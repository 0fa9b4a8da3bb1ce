"""Text models that turn each record's captions into a target vector (`topics` feature).

TextTopicNet's idea: a text model embeds the caption paired with each image, and the image
network learns to predict that vector (mmssl_jax/objectives/topics.py). Three text models,
all fitted on the captions of a shard set (one document per record: its captions joined):

- "lda": LDA topic proportions (scikit-learn LatentDirichletAllocation, batch variational
  Bayes, over CountVectorizer counts). Each vector is a distribution over `dim` topics
  (non-negative, sums to 1): the target of the softmax/BCE losses.
- "lsa": TF-IDF (sublinear tf, l2) projected by TruncatedSVD to `dim` dimensions, then
  L2-normalised. Signed: use with MSE, triplet or contrastive losses.
- "word2vec": the mean of gensim Word2Vec (skip-gram) vectors of the document's words,
  L2-normalised. gensim is optional (`pip install gensim`); it is imported only here.

All use the same tokenizer (CountVectorizer's: lower case, words of >= 2 letters, English
stop words removed; words in fewer than `min_df` documents or more than `max_df` of them
dropped). A document with no known word maps to the uniform distribution (LDA) or to zeros.

Fitting is deterministic for a seed (LDA and SVD take `random_state`; Word2Vec runs with
one worker and a seed-stable hash). A fitted model is saved without pickle, as
`text_model.json` (kind, options, vocabulary in column order) and `text_model.npz` (arrays,
loaded with allow_pickle=False), and `TextModel.load(dir).transform(docs)` reproduces the
vectors it was fitted to give.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from input_pipeline import records, tfrecord

KINDS = ("lda", "lsa", "word2vec")
MODEL_JSON = "text_model.json"
MODEL_NPZ = "text_model.npz"
# CountVectorizer's default token pattern, restricted to letters (no bare numbers).
TOKEN_PATTERN = r"(?u)\b[^\W\d_][^\W\d_]+\b"


def record_text(example: Mapping[str, Any], classnames: Sequence | None = None) -> str:
    """One document per record: its captions joined by ". "; a record without captions
    uses its class name (all synonyms) when `classnames` is given, else ""."""
    texts = [t.strip() for t in example["texts"] if t.strip()]
    if texts:
        return ". ".join(texts)
    label = example["label"]
    if classnames is not None and 0 <= label < len(classnames):
        name = classnames[label]
        return name if isinstance(name, str) else ". ".join(name)
    return ""


def iter_examples(shards: str | Sequence[str]) -> Iterator[tuple[str, dict]]:
    """(shard path, decoded example) for every record of `shards`, in file order."""
    source = tfrecord.TFRecordSource(shards)
    for i in range(len(source)):
        path, offset = source.locate(i)
        yield path, records.decode_example(source[i], where=f"{path} @ byte {offset}")


def read_documents(shards: str | Sequence[str], classnames: Sequence | None = None) -> list[str]:
    """The documents of every record of `shards` (see `record_text`), in file order."""
    return [record_text(ex, classnames) for _, ex in iter_examples(shards)]


def _vectorizer(vocabulary: Sequence[str] | None = None, min_df: int = 2, max_df: float = 0.5):
    from sklearn.feature_extraction.text import CountVectorizer

    if vocabulary is not None:
        return CountVectorizer(
            token_pattern=TOKEN_PATTERN, stop_words="english", vocabulary=list(vocabulary)
        )
    return CountVectorizer(
        token_pattern=TOKEN_PATTERN, stop_words="english", min_df=min_df, max_df=max_df
    )


def _l2(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _tfidf(counts, idf: np.ndarray):
    """sklearn's TfidfTransformer(sublinear_tf=True, norm="l2") with a given idf."""
    from sklearn.preprocessing import normalize

    x = counts.astype(np.float64).tocsr(copy=True)
    x.data = np.log(x.data) + 1.0
    x = x.multiply(idf[None, :]).tocsr()
    return normalize(x, norm="l2")


def stable_hash(text: str) -> int:
    """A process-independent string hash (Python's `hash` is salted per process)."""
    return zlib.crc32(text.encode("utf-8"))


@dataclasses.dataclass
class TextModel:
    """A fitted text model: `transform(docs) -> float32 [n, dim]`; save/load without pickle."""

    kind: str
    options: dict[str, Any]
    vocabulary: list[str]
    arrays: dict[str, np.ndarray]

    @property
    def dim(self) -> int:
        return int(self.options["dim"])

    def transform(self, docs: Sequence[str]) -> np.ndarray:
        counts = _vectorizer(self.vocabulary).transform(docs)
        if self.kind == "lda":
            return self._lda().transform(counts).astype(np.float32)
        if self.kind == "lsa":
            tfidf = _tfidf(counts, self.arrays["idf"])
            return _l2(np.asarray(tfidf @ self.arrays["components"].T)).astype(np.float32)
        if self.kind == "word2vec":
            # Mean over the word occurrences of in-vocabulary words = counts @ vectors / n.
            n = np.asarray(counts.sum(axis=1), np.float64)
            mean = np.asarray(counts @ self.arrays["vectors"].astype(np.float64))
            mean = mean / np.where(n > 0, n, 1.0)
            return _l2(mean).astype(np.float32)
        raise ValueError(f"unknown text model kind {self.kind!r}; valid: {KINDS}")

    def _lda(self):
        """A scikit-learn LDA with the saved variational parameters (transform only)."""
        from sklearn.decomposition import LatentDirichletAllocation

        o = self.options
        lda = LatentDirichletAllocation(
            n_components=o["dim"],
            doc_topic_prior=o["doc_topic_prior"],
            topic_word_prior=o["topic_word_prior"],
            max_doc_update_iter=o["max_doc_update_iter"],
            mean_change_tol=o["mean_change_tol"],
            random_state=o["seed"],
        )
        lda.components_ = self.arrays["components"]
        lda.exp_dirichlet_component_ = self.arrays["exp_dirichlet_component"]
        lda.doc_topic_prior_ = o["doc_topic_prior"]
        lda.topic_word_prior_ = o["topic_word_prior"]
        lda.n_features_in_ = len(self.vocabulary)
        return lda

    def save(self, directory: str) -> tuple[str, str]:
        """Writes `text_model.json` and `text_model.npz` in `directory`; returns the paths."""
        os.makedirs(directory, exist_ok=True)
        json_path = os.path.join(directory, MODEL_JSON)
        npz_path = os.path.join(directory, MODEL_NPZ)
        meta = {"kind": self.kind, "options": self.options, "vocabulary": self.vocabulary}
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False, indent=1)
        np.savez(npz_path, **self.arrays)
        return json_path, npz_path

    @classmethod
    def load(cls, directory: str) -> TextModel:
        with open(os.path.join(directory, MODEL_JSON), encoding="utf-8") as f:
            meta = json.load(f)
        with np.load(os.path.join(directory, MODEL_NPZ), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return cls(meta["kind"], meta["options"], list(meta["vocabulary"]), arrays)


def _vocabulary(vectorizer) -> list[str]:
    return [str(w) for w in vectorizer.get_feature_names_out()]


def fit_text_model(
    docs: Sequence[str],
    kind: str = "lda",
    *,
    dim: int = 40,
    seed: int = 0,
    min_df: int = 2,
    max_df: float = 0.5,
    max_iter: int = 50,
) -> TextModel:
    """Fits a text model of `kind` (see module docstring) with `dim` outputs on `docs`.

    max_iter: LDA passes over the corpus, SVD power iterations, or Word2Vec epochs.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown text model kind {kind!r}; valid: {KINDS}")
    vectorizer = _vectorizer(min_df=min_df, max_df=max_df)
    counts = vectorizer.fit_transform(docs)
    vocab = _vocabulary(vectorizer)
    options: dict[str, Any] = dict(dim=int(dim), seed=int(seed), min_df=min_df, max_df=max_df)
    options["max_iter"] = int(max_iter)
    if kind == "lda":
        from sklearn.decomposition import LatentDirichletAllocation

        lda = LatentDirichletAllocation(
            n_components=dim, learning_method="batch", max_iter=max_iter, random_state=seed
        ).fit(counts)
        options.update(
            doc_topic_prior=float(lda.doc_topic_prior_),
            topic_word_prior=float(lda.topic_word_prior_),
            max_doc_update_iter=int(lda.max_doc_update_iter),
            mean_change_tol=float(lda.mean_change_tol),
        )
        arrays = {
            "components": lda.components_,
            "exp_dirichlet_component": lda.exp_dirichlet_component_,
        }
    elif kind == "lsa":
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfTransformer

        idf = TfidfTransformer(sublinear_tf=True).fit(counts).idf_
        svd = TruncatedSVD(n_components=dim, n_iter=max(5, min(max_iter, 20)), random_state=seed)
        svd.fit(_tfidf(counts, idf))
        arrays = {"idf": idf, "components": svd.components_}
    else:
        arrays = {"vectors": _word2vec(docs, vectorizer, vocab, dim, seed, max_iter)}
    return TextModel(kind, options, vocab, {k: np.asarray(v) for k, v in arrays.items()})


def _word2vec(
    docs: Sequence[str], vectorizer, vocab: list[str], dim: int, seed: int, epochs: int
) -> np.ndarray:
    """Skip-gram vectors [len(vocab), dim] for the vectorizer's vocabulary (rows in order)."""
    try:
        from gensim.models import Word2Vec
    except ImportError as e:
        raise ImportError("text model 'word2vec' needs gensim: pip install gensim") from e
    analyze = vectorizer.build_analyzer()
    known = set(vocab)
    sentences = [[w for w in analyze(d) if w in known] for d in docs]
    model = Word2Vec(
        sentences=[s for s in sentences if s],
        vector_size=dim,
        window=5,
        min_count=1,
        sg=1,
        seed=seed,
        workers=1,  # one worker: the only deterministic setting
        epochs=epochs,
        hashfxn=stable_hash,
    )
    vectors = np.zeros((len(vocab), dim), np.float32)
    for i, word in enumerate(vocab):
        if word in model.wv:
            vectors[i] = model.wv[word]
    return vectors


def write_with_topics(
    shards: str | Sequence[str],
    output_dir: str,
    vectors_for: Any,
    *,
    classnames: Sequence | None = None,
    batch: int = 1024,
) -> list[tuple[str, int]]:
    """Copies every shard of `shards` to `output_dir` (same file names, same records in the
    same order) with each record's `topics` set to `vectors_for(docs)` of its document.
    Returns (output path, record count) per shard; each gets its .idx sidecar."""
    from input_pipeline.tfrecord import TFRecordWriter

    os.makedirs(output_dir, exist_ok=True)
    out = []
    for path in tfrecord.expand_paths(shards):
        target = os.path.join(output_dir, os.path.basename(path))
        if os.path.abspath(target) == os.path.abspath(path):
            raise ValueError(f"output {target} would overwrite its input shard")
        examples = [ex for _, ex in iter_examples([path])]
        docs = [record_text(ex, classnames) for ex in examples]
        vectors = np.concatenate(
            [vectors_for(docs[i : i + batch]) for i in range(0, len(docs), batch)]
            or [np.zeros((0, 0), np.float32)]
        )
        with TFRecordWriter(target) as writer:
            for ex, vec in zip(examples, vectors, strict=True):
                writer.write(
                    records.encode_example(
                        image=ex["image"],
                        texts=ex["texts"],
                        label=ex["label"],
                        topics=vec,
                        id=ex["id"],
                    )
                )
        out.append((target, len(examples)))
    return out


def top_words(model: TextModel, n: int = 8) -> list[list[str]]:
    """The `n` highest-weight words of each LDA topic / LSA component (for a quick look)."""
    if "components" not in model.arrays:  # word2vec, or an encoder's embeddings (bert)
        return []
    order = np.argsort(-model.arrays["components"], axis=1)[:, :n]
    return [[model.vocabulary[j] for j in row] for row in order]


def expand(patterns: Iterable[str]) -> list[str]:
    """Shard paths of several globs (each may be comma-separated), in order, deduplicated."""
    seen: dict[str, None] = {}
    for pattern in patterns:
        for path in tfrecord.expand_paths(pattern):
            seen.setdefault(path, None)
    return list(seen)
