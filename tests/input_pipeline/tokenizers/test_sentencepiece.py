"""Tests for input_pipeline/tokenizers/spm.py and tools/train_tokenizer.py."""

import pickle
import random

import numpy as np
import pytest

from input_pipeline.tokenizers.spm import EOS_ID, PAD_ID, Tokenizer, train_sentencepiece
from tools import train_tokenizer

WORD_TEXT = (
    "a the photo picture of cat dog bird red blue green small large old young running "
    "sitting on under near tree car house beach mountain sky water person child woman "
    "man playing with ball street city night sunset snow river boat flower garden"
)
WORDS = WORD_TEXT.split()


def make_corpus(n: int = 200, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus():
    return make_corpus()


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    path = train_sentencepiece(corpus, str(tmp_path_factory.mktemp("spm") / "m"), vocab_size=150)
    return Tokenizer(path)


def test_special_ids(tok):
    assert tok.pad_id == PAD_ID == 0
    assert tok.eos_id == EOS_ID == 3
    assert 50 < tok.vocab_size <= 150


def test_round_trip(tok, corpus):
    tokens = tok.encode(corpus[:20], 64)
    assert tok.decode(tokens) == corpus[:20]
    assert tok.decode(tokens[0]) == corpus[0]


def test_lowercases_like_clip(tok):
    np.testing.assert_array_equal(
        tok.encode(["A PHOTO of a Cat"], 16), tok.encode(["a photo of a cat"], 16)
    )
    assert tok.decode(tok.encode(["A  PHOTO of a Cat"], 16))[0] == "a photo of a cat"


def test_fixed_length_and_eos_position(tok, corpus):
    tokens = tok.encode(corpus[:50] + [""], 24)
    assert tokens.shape == (51, 24) and tokens.dtype == np.int32
    lengths = (tokens != 0).sum(-1)
    rows = np.arange(len(tokens))
    np.testing.assert_array_equal(tokens[rows, lengths - 1], EOS_ID)
    # Text ids are never pad; everything after EOS is pad; EOS occurs once.
    for row, n in zip(tokens, lengths, strict=True):
        assert (row[:n] != 0).all() and (row[n:] == 0).all()
        assert (row == EOS_ID).sum() == 1


def test_truncation_keeps_eos(tok):
    long = " ".join(WORDS)
    full = tok.encode([long], 256)[0]
    n_full = int((full != 0).sum())
    assert n_full > 10
    cut = tok.encode([long], 8)[0]
    assert cut[7] == EOS_ID and (cut != 0).all()
    np.testing.assert_array_equal(cut[:7], full[:7])
    # Exactly fitting: no truncation.
    exact = tok.encode([long], n_full)[0]
    np.testing.assert_array_equal(exact, full[:n_full])


def test_empty_caption_is_just_eos(tok):
    tokens = tok.encode(["", "   "], 5)
    np.testing.assert_array_equal(tokens, [[EOS_ID, 0, 0, 0, 0]] * 2)
    assert tok.encode([], 5).shape == (0, 5)
    assert tok.encode(["cat"], 1)[0].tolist() == [EOS_ID]


def test_encode_rejects_bad_arguments(tok):
    with pytest.raises(TypeError):
        tok.encode("a single string", 8)
    with pytest.raises(ValueError):
        tok.encode(["cat"], 0)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_training_is_deterministic(corpus, tmp_path, model_type):
    a = train_sentencepiece(corpus, str(tmp_path / "a"), vocab_size=100, model_type=model_type)
    b = train_sentencepiece(corpus, str(tmp_path / "b"), vocab_size=100, model_type=model_type)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()


def test_soft_vocab_limit(tmp_path):
    path = train_sentencepiece(["tiny corpus", "tiny words"], str(tmp_path / "m"), vocab_size=8000)
    assert Tokenizer(path).vocab_size < 8000


def test_bytes_and_pickle(tok, corpus):
    expected = tok.encode(corpus[:5], 32)
    again = Tokenizer.from_bytes(tok.model_proto)
    np.testing.assert_array_equal(again.encode(corpus[:5], 32), expected)
    unpickled = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(unpickled.encode(corpus[:5], 32), expected)


def test_missing_and_corrupt_model_name_the_path(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(str(missing))
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="corrupt.model"):
        Tokenizer(str(corrupt))


def test_train_tokenizer_cli_text_file(corpus, tmp_path):
    text = tmp_path / "captions.txt"
    text.write_text("\n".join(corpus + ["", "  "]) + "\n", encoding="utf-8")
    out = str(tmp_path / "out" / "spm")
    path = train_tokenizer.main(["--text_file", str(text), "--output", out, "--vocab_size", "120"])
    assert path == out + ".model"
    tok = Tokenizer(path)
    assert tok.decode(tok.encode(corpus[:3], 48)) == corpus[:3]


def test_train_tokenizer_cli_shards(corpus, tmp_path):
    from input_pipeline.records import encode_example
    from input_pipeline.tfrecord import TFRecordWriter

    for shard in range(2):
        with TFRecordWriter(str(tmp_path / f"caps-{shard:05d}-of-00002.tfrecord")) as writer:
            for i in range(shard * 100, shard * 100 + 100):
                texts = [corpus[i]] if i % 10 else []  # some image-label records
                writer.write(encode_example(image=b"\xff\xd8", texts=texts, label=i % 3))
    out = str(tmp_path / "spm")
    pattern = str(tmp_path / "caps-*.tfrecord")
    path = train_tokenizer.main(["--shards", pattern, "--output", out, "--vocab_size", "120"])
    tok = Tokenizer(path)
    assert tok.decode(tok.encode(corpus[1:4], 48)) == corpus[1:4]
