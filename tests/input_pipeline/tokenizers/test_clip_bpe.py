"""CLIP's BPE tokenizer (input_pipeline/tokenizers/clip_bpe.py) against open_clip's own
tokenizer, and its use by exports of converted weights (`convert_torch --bpe`, `load_pretrained`).

The merges file and the reference `open_clip/tokenizer.py` are read from the open_clip_torch
wheel that tools/install.sh downloads into the cache (tests/open_clip_wheel.py; the wheel is
never installed: it would pull torchvision). The reference is loaded as a standalone module by
file path.
"""

import gzip
import hashlib
import importlib.util
import json
import pickle
from pathlib import Path

import jax
import numpy as np
import pytest

from input_pipeline.tokenizers import clip_bpe
from input_pipeline.tokenizers.clip_bpe import ClipBpeTokenizer
from tests.open_clip_wheel import MERGES, extract

SOT, EOT = 49406, 49407

TEXTS = [
    "a photo of a cat.",
    "",
    "  Hello,   WORLD!!  ",
    "It's 2024: 3.14159 & 1,000,000 — ok?",
    "Café naïve résumé Ærøskøbing",
    "😀🐱 emoji 👍🏽 ❤️ 🇫🇷",
    "&amp;lt;b&amp;gt; &quot;q&quot; &#39;x&#39; &eacute;",
    "日本語のテキスト 中文 한국어 Ελληνικά",
    "don't we'll they're I'd YOU'VE",
    "\t tabs\nnewlines\r\n and\u00a0nbsp",
    "wow !$ deal, a_b-c/d\\e",
    "schÃ¶n mojibake",
    "ﬁ ligature ½ ² ①",
    "<start_of_text> literal specials <end_of_text>",
    "x" * 300,
    " ".join(f"word{i}" for i in range(60)),
]


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory) -> Path:
    """open_clip's tokenizer.py and merges file, extracted from the cached wheel."""
    return extract(tmp_path_factory.mktemp("open_clip"), [MERGES, "open_clip/tokenizer.py"])


@pytest.fixture(scope="module")
def merges_path(wheel_dir) -> Path:
    return wheel_dir / Path(MERGES).name


@pytest.fixture(scope="module")
def tok(merges_path) -> ClipBpeTokenizer:
    return ClipBpeTokenizer(merges_path)


@pytest.fixture(scope="module")
def reference(wheel_dir):
    """open_clip's SimpleTokenizer (imports torch, ftfy and regex)."""
    for name in ("torch", "ftfy", "regex"):
        pytest.importorskip(name, reason=f"open_clip's reference tokenizer needs {name}")
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", wheel_dir / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # builds its default tokenizer from the merges beside it
    return module.SimpleTokenizer(str(wheel_dir / Path(MERGES).name))


def test_matches_open_clip(tok, reference):
    assert clip_bpe._fix_text is not None  # ftfy is importable here, as for the reference
    for length in (77, 8):
        ours = tok.encode(TEXTS, length)
        ref = reference(TEXTS, context_length=length).numpy()
        assert ours.dtype == np.int32 and ours.shape == (len(TEXTS), length)
        for text, a, b in zip(TEXTS, ours, ref, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{text!r} at length {length}")
    ours = tok.encode(TEXTS, 77)
    long = ours[TEXTS.index("x" * 300)]
    assert long[-1] == EOT and (long != 0).all()  # the truncation case is exercised
    assert 0 in ours[TEXTS.index("wow !$ deal, a_b-c/d\\e")][1:3]  # id 0 is "!", not only pad
    for text, row in zip(TEXTS, ours, strict=True):
        if "_of_text>" in text:  # a literal <end_of_text> ends our decoding there
            continue
        n = min(len(tok.encode_ids(text)), 75)
        assert tok.decode(row) == reference.decode(row[1 : 1 + n].tolist()).strip(), text


def test_known_ids_and_conventions(tok, monkeypatch):
    assert (tok.vocab_size, tok.sot_id, tok.eos_id, tok.pad_id) == (49408, SOT, EOT, 0)
    cat = [SOT, 320, 1125, 539, 320, 2368, 269, EOT]
    hello = [SOT, 3306, 267, 1002, 256, EOT]
    out = tok.encode(["a photo of a cat.", "Hello, World!", ""], 10)
    np.testing.assert_array_equal(out[0], cat + [0, 0])
    np.testing.assert_array_equal(out[1], hello + [0] * 4)
    np.testing.assert_array_equal(out[2], [SOT, EOT] + [0] * 8)
    np.testing.assert_array_equal(
        tok.encode(["a photo of a cat."], 5)[0], [SOT, 320, 1125, 539, EOT]
    )
    assert (np.argmax(out, -1) == [7, 5, 1]).all()  # what pool="argmax" reads
    monkeypatch.setattr(clip_bpe, "_fix_text", None)  # without ftfy: the same on clean text
    np.testing.assert_array_equal(tok.encode(["a photo of a cat."], 10)[0], cat + [0, 0])
    with pytest.raises(TypeError, match="not one string"):
        tok.encode("a cat", 77)
    with pytest.raises(ValueError, match="length must be >= 2"):
        tok.encode(["a cat"], 1)


def test_round_trip_and_bad_files(tok, merges_path, tmp_path):
    plain = ["a photo of a cat", "naïve café 😀 日本語", "two  spaces\tand TABS"]
    assert tok.decode(tok.encode(plain, 77)) == [" ".join(t.lower().split()) for t in plain]
    for text in TEXTS[:-3]:  # decode(encode(t)) re-encodes to the same ids
        row = tok.encode([text], 77)
        np.testing.assert_array_equal(tok.encode([tok.decode(row[0])], 77), row, err_msg=text)
    # The same merges uncompressed, or from bytes, give the same tokenizer.
    text_file = tmp_path / "merges.txt"
    text_file.write_bytes(gzip.decompress(merges_path.read_bytes()))
    same = ClipBpeTokenizer(text_file)
    np.testing.assert_array_equal(same.encode(TEXTS, 77), tok.encode(TEXTS, 77))
    assert ClipBpeTokenizer.from_bytes(tok.merges_data).vocab_size == 49408
    short = tmp_path / "short.txt"
    short.write_text("#version: 0.2\nh e\n")
    with pytest.raises(ValueError, match="1 merges, CLIP's BPE needs 48894"):
        ClipBpeTokenizer(short)
    with pytest.raises(FileNotFoundError):
        ClipBpeTokenizer(tmp_path / "missing.txt.gz")


def test_converted_export_tokenizes_with_bpe(tok, merges_path, tmp_path):
    """convert_torch --bpe: the merges travel in the export (sha256 in the manifest) and
    load_pretrained's encode_texts matches the PyTorch text tower on the same BPE ids."""
    torch = pytest.importorskip("torch", reason="the converted checkpoint is a torch file")
    from mmssl_jax.export import ExportError, convert_torch, load_pretrained, write_export
    from tests.export.test_convert_torch import SMALL, Clip, QuickGELU, _tool, randomize

    ref = randomize(Clip(**dict(SMALL, vocab=49408, twidth=64, theads=1), act=QuickGELU), seed=4)
    checkpoint = tmp_path / "clip.pt"
    torch.save(ref.state_dict(), checkpoint)
    out = tmp_path / "export"
    argv = [f"--checkpoint={checkpoint}", f"--output={out}", f"--bpe={merges_path}"]
    assert _tool("convert_torch").main([*argv, "--no_stablehlo"]) == 0

    manifest = json.loads((out / "manifest.json").read_text())
    digest = hashlib.sha256(merges_path.read_bytes()).hexdigest()
    assert manifest["files"]["bpe_merges.txt.gz"]["sha256"] == digest
    assert "tokenizer.model" not in manifest["files"]
    model = load_pretrained(str(out))
    assert model.config["tokenizer"] == "clip_bpe" and model.text_length == 16
    assert model.config["tokenizer_truncation"] == "keep_eot" == model.tokenizer.truncate
    texts = ["a photo of a cat.", "wow !$ deal", "x" * 100]
    tokens = tok.encode(texts, 16)
    np.testing.assert_array_equal(model.tokenizer.encode(texts, 16), tokens)
    with torch.no_grad():
        ref_txt = ref.encode_text(torch.from_numpy(tokens).long()).numpy()
    ref_txt /= np.linalg.norm(ref_txt, axis=-1, keepdims=True)
    np.testing.assert_allclose(model.encode_texts(texts), ref_txt, atol=1e-4, rtol=0)
    classifier = model.zero_shot_classifier(["cat", "dog"], ["a photo of a {}."])
    np.testing.assert_allclose(
        classifier, model.encode_texts(["a photo of a cat.", "a photo of a dog."]), atol=1e-5
    )

    # A text tower that pools at the last non-zero id would misread BPE rows: refused.
    cfg, variables, spec = convert_torch.convert_state_dict(
        {k: v.numpy() for k, v in ref.state_dict().items()}, "openai"
    )
    cfg["text_overrides"]["pool"] = "eos"
    with pytest.raises(ExportError, match="pool='argmax'"):
        write_export(str(tmp_path / "bad"), model_cfg=cfg, variables=variables, preprocess=spec,
                     text_length=16, bpe_merges=tok.merges_data, stablehlo=False)  # fmt: skip
    assert not (tmp_path / "bad").exists()


LONG = " ".join(f"word{i}" for i in range(60))  # far more than 76 BPE tokens


def test_truncate_modes(tok, merges_path):
    """Over-long captions: "keep_eot" (open_clip, the default) keeps EOT at 76, "cut" (SLIP)
    is plain truncation of [SOT] + ids + [EOT], no EOT in the row. Captions that fit agree."""
    full = [SOT, *tok.encode_ids(LONG), EOT]
    assert len(full) > 77
    cut = ClipBpeTokenizer(merges_path, truncate="cut")
    texts = [LONG, "a photo of a cat."]
    rows, kept = cut.encode(texts, 77), tok.encode(texts, 77)
    assert tok.truncate == "keep_eot" and cut.truncate == "cut"
    np.testing.assert_array_equal(rows[0], full[:77])
    assert EOT not in rows[0] and np.argmax(rows[0]) == 0  # argmax pooling reads SOT
    np.testing.assert_array_equal(kept[0], [*full[:76], EOT])
    np.testing.assert_array_equal(rows[1], kept[1])  # fits: no difference
    np.testing.assert_array_equal(cut.encode(texts, 8)[0], full[:8])
    # The mode travels with the bytes and through pickling (grain workers).
    same = ClipBpeTokenizer.from_bytes(tok.merges_data, truncate="cut")
    np.testing.assert_array_equal(same.encode(texts, 77), rows)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(cut)).encode(texts, 77), rows)
    with pytest.raises(ValueError, match=r"truncate must be one of \('keep_eot', 'cut'\).*'drop'"):
        ClipBpeTokenizer(merges_path, truncate="drop")


def test_converted_slip_export_cuts_long_captions(tok, merges_path, tmp_path):
    """A SLIP checkpoint converts with `tokenizer_truncation: "cut"` in model.json, and the
    export's encode_texts tokenizes long captions as SLIP did (matching the PyTorch tower on
    SLIP's rows); an export without the key (older ones) keeps EOT; a bad value is named."""
    torch = pytest.importorskip("torch", reason="the converted checkpoint is a torch file")
    from mmssl_jax.export import ExportError, load_pretrained, write_export, write_manifest
    from tests.export.test_convert_torch import SMALL, Slip, _tool, randomize

    dims = dict(SMALL, vwidth=96, vheads=3, mlp_dim=64, ssl_dim=32, vocab=49408, context=77,
                twidth=64, theads=1)  # fmt: skip
    ref = randomize(Slip(**dims), seed=5)
    checkpoint = tmp_path / "checkpoint_best.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, checkpoint)
    out = tmp_path / "export"
    argv = [f"--checkpoint={checkpoint}", f"--output={out}", f"--bpe={merges_path}"]
    assert _tool("convert_torch").main([*argv, "--vision_heads=3", "--no_stablehlo"]) == 0

    meta = json.loads((out / "model.json").read_text())
    assert meta["source"]["arch"] == "slip" and meta["tokenizer_truncation"] == "cut"
    model = load_pretrained(str(out))
    assert model.tokenizer.truncate == "cut"
    texts = [LONG, "a photo of a cat."]
    slip_rows = ClipBpeTokenizer(merges_path, truncate="cut").encode(texts, 77)
    np.testing.assert_array_equal(model.tokenizer.encode(texts, 77), slip_rows)
    with torch.no_grad():
        ref_txt = ref.encode_text(torch.from_numpy(slip_rows).long()).numpy()
    ref_txt /= np.linalg.norm(ref_txt, axis=-1, keepdims=True)
    cut_emb = model.encode_texts(texts)
    np.testing.assert_allclose(cut_emb, ref_txt, atol=1e-4, rtol=0)
    kept_emb = model.encode_tokens(tok.encode(texts, 77))  # open_clip's rows: another vector
    assert np.abs(kept_emb[0] - cut_emb[0]).max() > 1e-2
    np.testing.assert_allclose(kept_emb[1], cut_emb[1], atol=1e-6)

    # An export written before the key existed loads as it did: EOT kept.
    del meta["tokenizer_truncation"]
    (out / "model.json").write_text(json.dumps(meta))
    write_manifest(str(out))
    old = load_pretrained(str(out))
    assert old.tokenizer.truncate == "keep_eot"
    np.testing.assert_allclose(old.encode_texts(texts), kept_emb, atol=1e-6, rtol=0)
    meta["tokenizer_truncation"] = "drop"
    (out / "model.json").write_text(json.dumps(meta))
    write_manifest(str(out))
    with pytest.raises(ExportError, match=r"model\.json: tokenizer_truncation must be one of"):
        load_pretrained(str(out))

    # write_export checks the mode before writing anything.
    cfg, variables = model.config["model"], jax.device_get(model.variables)
    for kwargs, match in [
        (dict(tokenizer_truncation="drop"), "truncate must be one of"),
        (dict(tokenizer_truncation="cut", tokenizer_proto=b"spm"), "is a CLIP BPE mode"),
    ]:
        with pytest.raises(ValueError, match=match):
            write_export(str(tmp_path / "bad"), model_cfg=cfg, variables=variables,
                         preprocess=model.preprocess, text_length=77, stablehlo=False,
                         **kwargs)  # fmt: skip
    assert not (tmp_path / "bad").exists()
