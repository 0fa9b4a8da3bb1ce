"""Export round trip: train tiny -> tools/export.py -> load_pretrained / jax.export artifacts.

The reference embeddings come from the training-time model (the trainer's final state through
the evaluation encoder); the export is read back in fresh processes, one of which never
imports mmssl_jax (it runs the jax.export artifacts with jax + safetensors only).
"""

import glob
import importlib
import importlib.util
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from input_pipeline import transforms
from input_pipeline.records import decode_example
from input_pipeline.tfrecord import TFRecordSource
from input_pipeline.tokenizers.spm import Tokenizer
from mmssl_jax import export, load_pretrained
from mmssl_jax.evaluation.model_encoder import ModelEncoder
from mmssl_jax.training.checkpoint import CheckpointMismatchError
from mmssl_jax.training.trainer import Trainer
from tests.conftest import ROOT

ATOL = 1e-5


def _export_tool():
    spec = importlib.util.spec_from_file_location("export_tool", ROOT / "tools" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(code: str, cwd) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def run(embedded_data, tmp_path_factory):
    """A tiny SLIP trained for 3 steps, its config.json, and reference embeddings."""
    root = tmp_path_factory.mktemp("export")
    config = importlib.import_module("configs.tiny_slip").get_config(f"data={embedded_data}")
    config.train.update(
        dict(batch_size=32, total_steps=3, log_every=1, num_devices=1, progress=False)
    )
    config.optim.warmup_steps = 1
    config.evals = {}
    workdir = root / "run"
    workdir.mkdir()
    with open(workdir / "config.json", "w") as f:  # as mmssl_jax.main writes it
        json.dump(config.to_dict(), f, indent=2, default=str)
    trainer = Trainer(config, str(workdir))
    trainer.run()

    source = TFRecordSource(sorted(glob.glob(f"{embedded_data}/emoji/emoji-test-*.tfrecord")))
    examples = [decode_example(source[i]) for i in range(6)]
    originals = [transforms.decode_image(e["image"]) for e in examples]  # 128 x 128
    originals[1] = originals[1][:, 20:100]  # one non-square image
    images = np.stack([transforms.resize_center_crop(im, 32) for im in originals])
    texts = [e["texts"][0] for e in examples]

    variables = {"params": jax.device_get(trainer.state.params)}
    tokenizer = Tokenizer(config.data.tokenizer)
    encoder = ModelEncoder(trainer.model, variables, tokenizer, text_length=32, batch_size=8)
    np.save(root / "images.npy", images)
    np.save(root / "tokens.npy", tokenizer.encode(texts, 32))
    return dict(
        root=root,
        workdir=workdir,
        originals=originals,
        images=images,
        texts=texts,
        image_emb=encoder.image_features(images)["emb"],
        text_emb=encoder.text_embeddings(texts),
        logit_scale=float(np.exp(variables["params"]["logit_scale"])),
        params=variables["params"],
    )


@pytest.fixture(scope="module")
def exported(run):
    out = run["root"] / "export"
    assert _export_tool().main(["--workdir", str(run["workdir"]), "--output", str(out)]) == 0
    return out


def test_export_layout(exported, run):
    names = sorted(os.listdir(exported))
    assert names == sorted(
        [
            "manifest.json",
            "model.json",
            "preprocess.json",
            "params.safetensors",
            "tokenizer.model",
            "encode_images.jax",
            "encode_texts.jax",
        ]
    )
    manifest = json.loads((exported / "manifest.json").read_text())
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    flat = load_file(exported / "params.safetensors")
    assert "params/image_encoder/blocks_0/attn/qkv/kernel" in flat
    np.testing.assert_array_equal(
        flat["params/image_encoder/pos_embed"], run["params"]["image_encoder"]["pos_embed"]
    )
    meta = json.loads((exported / "model.json").read_text())
    assert meta["source"]["step"] == 3 and meta["text_length"] == 32
    assert meta["model"]["vocab_size"] > 0  # resolved from the tokenizer
    assert meta["artifacts"]["encode_images.jax"]["batch"] == "symbolic"
    assert meta["logit_scale"] == pytest.approx(run["logit_scale"], rel=1e-6)
    spec = json.loads((exported / "preprocess.json").read_text())
    assert spec["image_size"] == 32 and spec["mean"] == [0.485, 0.456, 0.406]


def test_load_pretrained_in_fresh_process_matches_training(exported, run):
    root = run["root"]
    _run(
        f"""
        import numpy as np, pickle
        pickle.loads = pickle.load = None  # nothing may be unpickled on the way
        from mmssl_jax import load_pretrained
        m = load_pretrained({str(exported)!r})
        images = np.load({str(root / "images.npy")!r})
        np.savez({str(root / "fresh.npz")!r}, img=m.encode_images(images),
                 txt=m.encode_texts({run["texts"]!r}), scale=m.logit_scale)
        """,
        cwd=ROOT,
    )
    fresh = np.load(root / "fresh.npz")
    np.testing.assert_allclose(fresh["img"], run["image_emb"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(fresh["txt"], run["text_emb"], atol=ATOL, rtol=0)
    assert float(fresh["scale"]) == pytest.approx(run["logit_scale"], rel=1e-6)


# Runs in a process with neither mmssl_jax nor flax importable: jax, numpy, safetensors only.
STANDALONE = """
import sys
import jax, numpy as np
from safetensors.numpy import load_file
export, images, tokens, out = sys.argv[1:]
params = load_file(export + "/params.safetensors")
result = {}
for name, x in (("images", np.load(images)), ("texts", np.load(tokens))):
    with open(f"{export}/encode_{name}.jax", "rb") as f:
        fn = jax.export.deserialize(f.read())
    # The batch is symbolic: two batch sizes through one artifact.
    parts = [np.asarray(fn.call(params, x[:4])), np.asarray(fn.call(params, x[4:]))]
    result[name] = np.concatenate(parts)
loaded = [m for m in sys.modules if m.split(".")[0] in ("mmssl_jax", "input_pipeline", "flax")]
assert not loaded, loaded
np.savez(out, **result)
"""


def test_stablehlo_artifacts_run_without_mmssl_jax(exported, run, tmp_path):
    root, out = run["root"], tmp_path / "hlo.npz"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = [str(exported), str(root / "images.npy"), str(root / "tokens.npy"), str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", STANDALONE, *args],
        cwd=tmp_path,  # not the repository: mmssl_jax cannot even be found
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    hlo = np.load(out)
    np.testing.assert_allclose(hlo["images"], run["image_emb"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(hlo["texts"], run["text_emb"], atol=ATOL, rtol=0)


# The README's StableHLO example: the indented code block between these two comments.
README_SNIPPET = re.compile(
    r"<!-- stablehlo-snippet:[^\n]*-->\n(.*?)\n<!-- /stablehlo-snippet -->", re.DOTALL
)


def readme_stablehlo_snippet() -> str:
    """The code of README.md's StableHLO snippet, dedented."""
    found = README_SNIPPET.findall((ROOT / "README.md").read_text())
    assert len(found) == 1, "README.md needs exactly one <!-- stablehlo-snippet: ... --> block"
    block = found[0].strip("\n")
    lines = block.splitlines()
    assert all(not line or line.startswith("    ") for line in lines), "not an indented block"
    return textwrap.dedent(block)


def test_readme_stablehlo_snippet_matches_load_pretrained(exported, tmp_path):
    """The README's snippet, run as a user would (a fresh process, no mmssl_jax, the export
    at the path it names), gives load_pretrained's embeddings of the same images."""
    code = readme_stablehlo_snippet()
    assert "mmssl_jax" not in code
    (path,) = re.findall(r'^export = "([^"]+)"$', code, re.MULTILINE)
    (tmp_path / path).parent.mkdir(parents=True)
    (tmp_path / path).symlink_to(exported)
    check = """
import sys
loaded = [m for m in sys.modules if m.split(".")[0] in ("mmssl_jax", "input_pipeline", "flax")]
assert not loaded, loaded
np.savez("snippet.npz", images=images, embeddings=embeddings)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code + check],
        cwd=tmp_path,  # not the repository
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(tmp_path / "snippet.npz")
    assert out["images"].dtype == np.uint8 and len(out["images"]) > 1
    want = load_pretrained(str(exported)).encode_images(out["images"])
    np.testing.assert_allclose(out["embeddings"], want, atol=ATOL, rtol=0)


def test_any_size_images_batching_and_zero_shot(exported, run):
    model = load_pretrained(str(exported), batch_size=4)
    # Any size: resized + centre-cropped exactly as the evaluation pipeline does.
    np.testing.assert_allclose(
        model.encode_images(run["originals"]), run["image_emb"], atol=ATOL, rtol=0
    )
    square = np.stack([im for im in run["originals"] if im.shape == (128, 128, 3)])
    assert model.encode_images(square).shape == (len(square), model.embed_dim)
    # Batches of 4 padded to buckets equal one big batch.
    full = model.encode_images(run["images"], batch_size=64)
    np.testing.assert_allclose(model.encode_images(run["images"]), full, atol=1e-6, rtol=0)
    assert model.encode_images(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 128)
    with pytest.raises(TypeError, match="uint8"):
        model.encode_images(run["images"].astype(np.float32))

    texts = model.encode_texts(run["texts"])
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-6)
    templates = ["a photo of a {}.", "an emoji of {}."]
    classes = ["grinning face", ["red heart", "heart"]]
    zs = model.zero_shot_classifier(classes, templates)
    prompts = model.encode_texts(
        [t.format(c) for c in ("grinning face", "red heart", "heart") for t in templates]
    )
    want = np.stack([prompts[:2].mean(0), prompts[2:].mean(0)])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert zs.shape == (2, 128)
    np.testing.assert_allclose(zs, want, atol=1e-6)
    assert model.zero_shot_classifier(["cat"], "simple").shape == (1, 128)


def test_encode_images_accepts_pil_images_and_arrays(exported, run):
    """One picture, one embedding, whichever form it comes in: a PIL image (any mode), a list
    of them, one [H, W, 3] array, a [B, H, W, 3] array, a list of differently sized arrays."""
    from PIL import Image

    model = load_pretrained(str(exported))
    originals, want = run["originals"], run["image_emb"]  # 128 x 128 and one 128 x 80
    pils = [Image.fromarray(im) for im in originals]

    def same(images, rows):
        np.testing.assert_allclose(model.encode_images(images), want[rows], atol=ATOL, rtol=0)

    same(pils, slice(None))  # a list of PIL images
    same(originals, slice(None))  # a list of differently sized arrays
    same([pils[0], originals[1], pils[2]], slice(0, 3))  # mixed
    for i in (0, 1):
        same(pils[i], [i])  # one PIL image
        same(originals[i], [i])  # one [H, W, 3] array
        same(originals[i][None], [i])  # a batch of one
    same(np.stack([originals[0], originals[2]]), [0, 2])  # [B, H, W, 3], resized
    same(tuple(pils[2:4]), slice(2, 4))

    # Greyscale and RGBA pictures become RGB (grey replicated, alpha dropped).
    grey = pils[0].convert("L")
    grey_rgb = np.repeat(np.asarray(grey)[..., None], 3, axis=-1)
    np.testing.assert_allclose(
        model.encode_images([grey, grey.convert("LA")]),
        model.encode_images([grey_rgb, grey_rgb]),
        atol=ATOL,
        rtol=0,
    )
    rgba = pils[3].copy()
    rgba.putalpha(100)
    same(rgba, [3])

    with pytest.raises(TypeError, match="PIL image.*open files first"):
        model.encode_images("picture.png")
    with pytest.raises(TypeError, match=r"images\[1\]: expected a PIL image .* got str"):
        model.encode_images([pils[0], "picture.png"])
    with pytest.raises(ValueError, match=r"images: expected one .* got shape \(128, 128\).*PIL"):
        model.encode_images(np.asarray(grey))  # a greyscale array: [H, W] is not a picture
    with pytest.raises(ValueError, match=r"images\[0\]: expected one uint8 image.*PIL"):
        model.encode_images([np.asarray(grey)])
    with pytest.raises(ValueError, match=r"image: expected \[H, W, 3\] RGB, .* \(128, 128, 4\)"):
        model.encode_images(np.asarray(rgba))
    with pytest.raises(TypeError, match=r"images\[1\]: expected uint8"):
        model.encode_images([originals[0], originals[1].astype(np.float32)])


def _copy(exported, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(exported, out)
    return out


def test_tampered_file_is_named(exported, tmp_path):
    out = _copy(exported, tmp_path)
    data = bytearray((out / "params.safetensors").read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    (out / "params.safetensors").write_bytes(bytes(data))
    with pytest.raises(export.ExportError, match=r"params\.safetensors: sha256 .* modified"):
        load_pretrained(str(out))

    out = _copy(exported, tmp_path / "b")
    meta = json.loads((out / "model.json").read_text())
    meta["model"]["embed_dim"] = 64
    (out / "model.json").write_text(json.dumps(meta))
    with pytest.raises(export.ExportError, match=r"model\.json: size"):
        load_pretrained(str(out))

    out = _copy(exported, tmp_path / "c")
    os.remove(out / "tokenizer.model")
    with pytest.raises(export.ExportError, match=r"tokenizer\.model is listed .* missing"):
        load_pretrained(str(out))


def test_wrong_shape_or_missing_param_is_named(exported, tmp_path):
    out = _copy(exported, tmp_path)
    flat = load_file(out / "params.safetensors")
    flat["params/image_encoder/pos_embed"] = flat["params/image_encoder/pos_embed"][:, :-1]
    save_file(flat, out / "params.safetensors")
    export.write_manifest(str(out))  # a consistent manifest: the shape check must catch it
    with pytest.raises(export.ExportError, match=r"params/image_encoder/pos_embed has shape"):
        load_pretrained(str(out))

    del flat["params/image_encoder/pos_embed"]
    save_file(flat, out / "params.safetensors")
    export.write_manifest(str(out))
    with pytest.raises(export.ExportError, match=r"params/image_encoder/pos_embed is missing"):
        load_pretrained(str(out))

    (out / "params.safetensors").write_bytes(pickle.dumps({"x": np.zeros(3)}))
    export.write_manifest(str(out))
    with pytest.raises(export.ExportError, match="not a readable safetensors file"):
        load_pretrained(str(out))


def test_export_tool_errors(exported, run, tmp_path):
    tool = _export_tool()
    with pytest.raises(FileExistsError, match="overwrite"):
        tool.main(["--workdir", str(run["workdir"]), "--output", str(exported)])
    with pytest.raises(ValueError, match=r"no checkpoint for step 7 .* have \[3\]"):
        tool.main(["--workdir", str(run["workdir"]), "--output", str(tmp_path / "x"), "--step=7"])
    config = export.load_config(str(run["workdir"]))
    config.model.embed_dim = 64  # not the model that was trained
    with pytest.raises(CheckpointMismatchError, match=r"\(128, 64\).*\(128, 128\)"):
        export.export_checkpoint(str(run["workdir"]), str(tmp_path / "z"), config=config)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        tool.main(["--workdir", str(empty), "--output", str(tmp_path / "y")])
    assert not any((tmp_path / name).exists() for name in "xyz")
    with pytest.raises(export.ExportError, match="manifest.json is missing"):
        load_pretrained(str(empty))
