"""tools/make_shards.py and input_pipeline/sources on the real offline data.

Each source runs end to end through the command line on a small subset and the shards are
read back with the project's reader: counts, captions, labels, image sizes and pixels,
splits, the bad-file list, determinism and the .idx.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from input_pipeline import tfrecord
from input_pipeline.records import decode_example
from input_pipeline.sources import emoji, fashion_mnist, shard_writer, tfds_source

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
import make_shards  # noqa: E402

FASHION = "/usr/share/datasets/fashion-mnist"


def _records(pattern: str) -> list[dict]:
    source = tfrecord.TFRecordSource(pattern)
    return [decode_example(source[i], where=f"{pattern}[{i}]") for i in range(len(source))]


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _idx_images(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST straight from the IDX bytes, independent of the source module."""
    stem = "train" if split == "train" else "t10k"
    with gzip.open(f"{FASHION}/{stem}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(f"{FASHION}/{stem}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def _base_name(name: str) -> str:
    """Emoji name without skin-tone qualifiers, written independently of the source."""
    if ": " not in name:
        return name
    head, tail = name.split(": ", 1)
    rest = [
        q
        for q in tail.split(", ")
        if not re.fullmatch(r"(\w+-)?(light|medium|dark) skin tone", q) and q != "person"
    ]
    return f"{head}: {', '.join(rest)}" if rest else head


def _bad_lines(prefix: str) -> list[list[str]]:
    with open(prefix + "-bad_files.txt", encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]


def test_emoji_subset(tmp_path):
    prefix = str(tmp_path / "emoji")
    summary = make_shards.main(
        ["emoji", "--output", prefix, "--limit", "200", "--image_size", "64"]
        + ["--workers", "1", "--quiet"]
    )
    classnames = json.load(open(prefix + "-classnames.json"))
    assert len(classnames) == 99 and classnames[0] == "face smiling"
    groups = json.load(open(prefix + "-groups.json"))
    assert len(groups["group_of_label"]) == 99 and groups["groups"][0] == "Smileys & Emotion"
    train, test = _records(prefix + "-train-*.tfrecord"), _records(prefix + "-test-*.tfrecord")
    assert len(train) + len(test) + len(_bad_lines(prefix)) == 200
    assert len(train) + len(test) == summary.num_records >= 195  # the font draws nearly all
    assert len(test) > 10 and len(train) > 100
    names = {}
    for split, recs in (("train", train), ("test", test)):
        for r in recs:
            assert r["texts"] and all(t.strip() for t in r["texts"])
            assert 0 <= r["label"] < len(classnames)
            assert _decode(r["image"]).shape == (64, 64, 3)
            group, subgroup, _ = r["id"].split("/")
            assert classnames[r["label"]] == subgroup.replace("-", " ")
            assert groups["groups"][groups["group_of_label"][r["label"]]] == group
            names[r["texts"][0]] = split
    # All six waving hands (base + five skin tones) exist and share one split.
    waving = [n for n in names if n.startswith("waving hand")]
    assert len(waving) == 6 and len({names[n] for n in waving}) == 1
    bases = {
        split: {_base_name(n) for n, s in names.items() if s == split} for split in names.values()
    }
    assert not bases["train"] & bases["test"]
    stats = json.load(open(prefix + "-train-stats.json"))
    assert stats["num_records"] == len(train) == sum(stats["shards"].values())
    assert sum(stats["per_class"].values()) == len(train)


def test_emoji_empty_glyph_is_bad():
    task = emoji.Task("x/y/0041", "A", ("A",), 0, 32, emoji.FONT)  # no colour glyph for "A"
    result = emoji.process(task, shard_writer.ImageOptions())
    assert isinstance(result, shard_writer.Bad) and "empty" in result.reason


def test_fashion_mnist_pixels_equal_idx(tmp_path):
    prefix = str(tmp_path / "fm")
    make_shards.main(["fashion_mnist", "--output", prefix, "--limit", "25", "--quiet"])
    assert json.load(open(prefix + "-classnames.json"))[0] == "T-shirt/top"
    for split in ("train", "test"):
        recs = _records(f"{prefix}-{split}-*.tfrecord")
        images, labels = _idx_images(split)
        assert len(recs) == 25
        # Shards are filled round-robin; one shard here, so record i is image i.
        for i in (0, 7, 24):
            assert recs[i]["id"] == f"fashion_mnist/{split}/{i:05d}"
            assert recs[i]["texts"] == [] and recs[i]["label"] == labels[i]
            np.testing.assert_array_equal(_decode(recs[i]["image"]), images[i])


def test_fashion_mnist_bad_magic(tmp_path):
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        shutil.copy(f"{FASHION}/{stem}.gz", tmp_path / f"{stem}.gz")
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:  # labels magic
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x01" + b"\x00" * 8)
    with pytest.raises(fashion_mnist.IdxFormatError, match="magic number 0x00000801"):
        fashion_mnist.plan(data_dir=str(tmp_path), splits=("train",))


def _image_dir(tmp_path) -> str:
    """Real images as files: Fashion-MNIST PNG/JPEG and a rendered emoji with alpha."""
    images, _ = _idx_images("test")
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(images[0]).save(root / "a.png")
    Image.fromarray(np.stack([images[1]] * 3, -1)).resize((300, 400)).save(root / "sub/b.jpg")
    Image.fromarray(images[2]).save(root / "c.png")
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    rgba.paste(emoji.render("\U0001f600", 30), (5, 5))
    rgba.save(root / "d.png")
    (root / "corrupt.png").write_bytes(open(root / "a.png", "rb").read()[:60])
    return str(root)


def test_folder_jsonl_and_csv(tmp_path):
    root = _image_dir(tmp_path)
    rows = [
        {"path": "a.png", "caption": "a shirt", "label": "shirt"},
        {"path": "sub/b.jpg", "caption": ["a trouser", "grey trousers"], "label": "trouser"},
        {"path": "c.png", "caption": "a sweater", "label": "pullover"},
        {"path": "a.png", "caption": "another caption of a", "label": "shirt"},
        {"path": "d.png", "caption": "a grinning face"},
        {"path": "missing.png", "caption": "gone", "label": "shirt"},
        {"path": "corrupt.png", "caption": "broken", "label": "shirt"},
    ]
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    prefix = str(tmp_path / "out" / "jsonl")
    make_shards.main(
        ["folder", "--images_dir", root, "--captions", str(jsonl), "--output", prefix, "--quiet"]
    )
    recs = {r["id"]: r for r in _records(prefix + "-0*.tfrecord")}
    assert sorted(recs) == ["a.png", "c.png", "d.png", "sub/b.jpg"]
    names = json.load(open(prefix + "-classnames.json"))
    assert names == ["pullover", "shirt", "trouser"]
    assert recs["a.png"]["texts"] == ["a shirt", "another caption of a"]
    assert recs["sub/b.jpg"]["texts"] == ["a trouser", "grey trousers"]
    assert names[recs["sub/b.jpg"]["label"]] == "trouser" and recs["d.png"]["label"] == -1
    assert _decode(recs["sub/b.jpg"]["image"]).shape[:2] == (341, 256)  # short side 300 -> 256
    d = _decode(recs["d.png"]["image"])
    assert d.shape == (40, 40, 3) and (d[0, 0] >= 240).all()  # alpha onto white (JPEG)
    bad = _bad_lines(prefix)
    assert len(bad) == 3
    reasons = {os.path.basename(b[2].split(":")[0]): b[3] for b in bad}
    assert "not found" in reasons["missing.png"]
    assert "cannot decode" in reasons["corrupt.png"]
    assert "not valid JSON" in reasons["caps.jsonl"]

    csv = tmp_path / "caps.csv"
    csv.write_text(
        'path,caption,label\na.png,"a shirt, white",0\nc.png,a sweater,2\n'
        "missing.png,gone,0\ncorrupt.png,broken,1\n"
    )
    prefix = str(tmp_path / "out" / "csv")
    make_shards.main(
        ["folder", "--images_dir", root, "--captions", str(csv), "--output", prefix]
        + ["--split", "train", "--format", "png", "--quiet"]
    )
    recs = _records(prefix + "-train-*.tfrecord")
    assert [(r["id"], r["texts"], r["label"]) for r in recs] == [
        ("a.png", ["a shirt, white"], 0),
        ("c.png", ["a sweater"], 2),
    ]
    np.testing.assert_array_equal(_decode(recs[0]["image"]), _idx_images("test")[0][0])
    assert not os.path.exists(prefix + "-classnames.json")  # integer labels: no names
    assert sorted(os.path.basename(b[2]) for b in _bad_lines(prefix)) == [
        "corrupt.png",
        "missing.png",
    ]


def _all_bad_folder(tmp_path) -> str:
    """An images directory whose two images are both unusable (cut short)."""
    images, _ = _idx_images("test")
    root = tmp_path / "all_bad"
    root.mkdir(parents=True)
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, format="PNG")
    for name in ("x.png", "y.png"):
        (root / name).write_bytes(buf.getvalue()[:60])
    return str(root)


def test_all_inputs_bad_exits_nonzero_and_writes_no_shards(tmp_path):
    """`wrote 0 records; 2 bad` used to exit 0 and leave a zero-record shard set behind."""
    root = _all_bad_folder(tmp_path)
    out = tmp_path / "out"
    prefix = str(out / "bad")
    script = str(Path(__file__).resolve().parents[3] / "tools" / "make_shards.py")
    result = subprocess.run(
        [sys.executable, script, "folder", "--images_dir", root, "--output", prefix, "--quiet"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert "no shards were written" in message and "(2 bad, 0 skipped)" in message
    assert prefix + "-bad_files.txt" in message
    assert sorted(os.listdir(out)) == ["bad-bad_files.txt"]
    assert sorted(os.path.basename(b[2]) for b in _bad_lines(prefix)) == ["x.png", "y.png"]


def test_all_inputs_bad_leaves_an_earlier_shard_set_unchanged(tmp_path):
    prefix = str(tmp_path / "shards" / "fm")
    make_shards.main(["fashion_mnist", "--output", prefix, "--limit", "5", "--quiet"])
    before = _shard_set_bytes(prefix)
    root = _all_bad_folder(tmp_path)
    with pytest.raises(SystemExit, match="earlier run .* left as they were") as exc:
        make_shards.main(["folder", "--images_dir", root, "--output", prefix, "--quiet"])
    assert "all 2 inputs were bad" in str(exc.value)
    after = _shard_set_bytes(prefix)
    assert after.pop("fm-bad_files.txt") != before.pop("fm-bad_files.txt")
    assert after == before
    with pytest.raises(shard_writer.NoRecordsError, match="found no inputs"):
        shard_writer.write_plan(
            shard_writer.Plan("empty", {"train": []}, process=None),
            str(tmp_path / "empty" / "e"),
            progress=False,
        )
    assert os.listdir(tmp_path / "empty") == ["e-bad_files.txt"]


def _record_or_bad(task: str, options: shard_writer.ImageOptions):
    if task == "good":
        return shard_writer.Record("good", b"not decoded here", ("a caption",))
    return shard_writer.Bad("dir\\with\ttab/x.png", "cannot decode image (line one\nline two\r)")


def test_bad_files_list_escapes_newlines_one_line_per_input(tmp_path):
    """A reason holding a newline used to split its bad input over two lines."""
    prefix = str(tmp_path / "esc")
    plan = shard_writer.Plan("esc", {None: ["good", "bad"]}, process=_record_or_bad)
    summary = shard_writer.write_plan(plan, prefix, workers=1, progress=False)
    assert summary.num_records == 1
    with open(prefix + "-bad_files.txt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert len(lines) == 3 and lines[0].startswith("#") and lines[2] == ""
    fields = lines[1].split("\t")
    assert fields == [
        "-",
        "bad",
        "dir\\\\with\\ttab/x.png",
        "cannot decode image (line one\\nline two\\r)",
    ]


def _load_tfds_builder_module():
    """tests/tfds_tiny_builder.py imported as a top-level module: for a builder inside a
    package, tfds 4.9.10 locates its code through `importlib_resources`, a package it does
    not install when TensorFlow is absent."""
    name = "tfds_tiny_builder"
    if name not in sys.modules:
        path = str(Path(__file__).resolve().parents[2] / f"{name}.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_tfds_source(tmp_path, file_format):
    """Both tfds file formats; TFRecord (tfds' default) used to fail with tfds'
    NotImplementedError "Random access data source for file format FileFormat.TFRECORD"."""
    tfds_tiny_builder = _load_tfds_builder_module()
    data_dir = str(tmp_path / "tfds")
    builder = tfds_tiny_builder.TinyFashion(data_dir=data_dir, file_format=file_format)
    tfds_tiny_builder.prepare(builder)
    assert not any(n.endswith(".idx") for n in os.listdir(builder.data_dir))
    prefix = str(tmp_path / "tiny")
    make_shards.main(
        ["tfds", "--name", "tiny_fashion", "--data_dir", data_dir, "--split", "train,test"]
        + ["--text_key", "caption", "--format", "png", "--output", prefix, "--quiet"]
    )
    assert json.load(open(prefix + "-classnames.json")) == fashion_mnist.CLASSNAMES
    for split, n in tfds_tiny_builder.NUM.items():
        recs = _records(f"{prefix}-{split}-*.tfrecord")
        assert len(recs) == n
        images, labels = _idx_images(split)
        originals = {images[i].tobytes(): int(labels[i]) for i in range(n)}
        for r in recs:  # tfds shuffles: match each record to its source image by pixels
            pixels = _decode(r["image"])
            assert pixels.shape == (28, 28)
            label = originals[pixels.tobytes()]
            assert r["label"] == label
            assert r["texts"] == [f"a photo of a {fashion_mnist.CLASSNAMES[label]}"]
    assert not any(n.endswith(".idx") for n in os.listdir(builder.data_dir))  # read-only


def test_tfds_tfrecord_sub_split(tmp_path):
    """A sub-split of TFRecord files reads the records tfds' file instructions name."""
    tfds_tiny_builder = _load_tfds_builder_module()
    data_dir = str(tmp_path / "tfds")
    tfds_tiny_builder.prepare(
        tfds_tiny_builder.TinyFashion(data_dir=data_dir, file_format="tfrecord")
    )
    prefix = str(tmp_path / "sub")
    summary = make_shards.main(
        ["tfds", "--name", "tiny_fashion", "--data_dir", data_dir, "--split", "train[2:5]"]
        + ["--format", "png", "--output", prefix, "--quiet"]
    )
    full = make_shards.main(
        ["tfds", "--name", "tiny_fashion", "--data_dir", data_dir, "--split", "train"]
        + ["--format", "png", "--output", str(tmp_path / "full"), "--quiet"]
    )
    assert summary.num_records == 3 and full.num_records == 6
    # glob.escape: the split name "train[2:5]" goes into the shard names as it is
    sub = tfrecord.TFRecordSource([glob.escape(p) for p in summary.splits["train[2:5]"].shards])
    whole = tfrecord.TFRecordSource(full.splits["train"].shards)
    images = [decode_example(sub[i])["image"] for i in range(3)]
    assert images == [decode_example(whole[i])["image"] for i in range(2, 5)]


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_tfds_feature_needing_tensorflow_is_a_clear_error(tmp_path, file_format):
    """A used feature without NumPy decoding used to make every record bad (empty shards,
    exit 0); now the error names the dataset and the feature. Unused, it does not matter."""
    tfds_tiny_builder = _load_tfds_builder_module()
    data_dir = str(tmp_path / "tfds")
    builder = tfds_tiny_builder.TinyFashionTfOnlyCaption(data_dir=data_dir, file_format=file_format)
    tfds_tiny_builder.prepare(builder)
    prefix = str(tmp_path / "out" / "tf_only")
    args = ["tfds", "--name", builder.name, "--data_dir", data_dir, "--split", "train"]
    args += ["--output", prefix, "--quiet"]
    with pytest.raises(tfds_source.TensorFlowRequiredError) as exc:
        make_shards.main(args + ["--text_key", "caption"])
    message = str(exc.value)
    assert message.startswith("tiny_fashion_tf_only_caption: feature 'caption' (TfOnlyText)")
    assert "TensorFlow" in message and "--text_key" in message
    assert not os.path.exists(tmp_path / "out")
    assert make_shards.main(args).num_records == tfds_tiny_builder.NUM["train"]


def test_index_command_rebuilds_deleted_idx(tmp_path, capsys):
    prefix = str(tmp_path / "fm")
    make_shards.main(
        ["fashion_mnist", "--output", prefix, "--limit", "30"]
        + ["--split", "test", "--num_shards", "2", "--quiet"]
    )
    shard = prefix + "-test-00001-of-00002.tfrecord"
    with open(shard + ".idx") as f:
        original = f.read()
    os.remove(shard + ".idx")
    with pytest.raises(FileNotFoundError, match="make_shards.py index"):
        tfrecord.TFRecordSource(prefix + "-test-*.tfrecord")
    counts = make_shards.main(["index", prefix + "-test-00001-*.tfrecord"])
    assert counts == [(shard, 15)] and "15 records" in capsys.readouterr().out
    with open(shard + ".idx") as f:
        assert f.read() == original
    assert len(tfrecord.TFRecordSource(prefix + "-test-*.tfrecord")) == 30


def _shard_set_bytes(prefix: str) -> dict[str, bytes]:
    directory = os.path.dirname(prefix)
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


def test_deterministic_bytes_across_runs_and_workers(tmp_path):
    """Same input, same bytes: in-process vs a 2-process pool, and a rerun in place."""
    outputs = []
    for run, workers in enumerate(("1", "2")):
        prefix = str(tmp_path / f"run{run}" / "x")
        make_shards.main(
            ["emoji", "--output", prefix, "--limit", "70", "--image_size", "32"]
            + ["--workers", workers, "--quiet"]
        )
        make_shards.main(
            ["fashion_mnist", "--output", prefix + "fm", "--limit", "80"]
            + ["--split", "test", "--workers", workers, "--quiet"]
        )
        outputs.append(_shard_set_bytes(prefix))
    assert outputs[0] == outputs[1]
    assert any(name.endswith(".tfrecord") for name in outputs[0])


def test_stale_shards_removed_when_shard_count_changes(tmp_path):
    prefix = str(tmp_path / "fm")
    args = ["fashion_mnist", "--output", prefix, "--limit", "10", "--split", "test", "--quiet"]
    make_shards.main(args + ["--num_shards", "3"])
    make_shards.main(args + ["--num_shards", "1"])
    assert sorted(os.listdir(tmp_path)) == [
        "fm-bad_files.txt",
        "fm-classnames.json",
        "fm-test-00000-of-00001.tfrecord",
        "fm-test-00000-of-00001.tfrecord.idx",
        "fm-test-stats.json",
    ]


def test_image_size_limits(tmp_path):
    huge = tmp_path / "huge.png"  # the first 24 bytes of a 2-gigapixel PNG
    ihdr = (50_000).to_bytes(4, "big") + (40_000).to_bytes(4, "big") + b"\x08\x02\x00\x00\x00"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + ihdr)
    assert shard_writer.header_size(str(huge)) == (50_000, 40_000)
    big = tmp_path / "big.png"
    Image.new("L", (2100, 2000), 128).save(big)
    assert shard_writer.header_size(str(big)) == (2100, 2000)
    with pytest.raises(shard_writer.BadImageError, match="more than 4000000 pixels"):
        shard_writer.open_image(str(big), max_pixels=4_000_000)
    assert shard_writer.open_image(str(big), max_pixels=None).size == (2100, 2000)


def test_embedded_default_skips_when_up_to_date(tmp_path):
    out = str(tmp_path / "data")
    args = ["embedded", "--output_dir", out, "--fashion_limit", "40", "--emoji_limit", "60"]
    args += ["--no_openclipart"]  # built in tests/input_pipeline/sources/test_embedded_data.py
    first = make_shards.main(args + ["--workers", "1", "--quiet"])
    parts = first["parts"]
    assert parts["fashion_mnist"]["splits"]["train"]["num_records"] == 40
    assert parts["emoji"]["num_classes"] == 99
    model = os.path.join(out, "tokenizer", "spm.model")
    assert parts["tokenizer"]["model"] == "tokenizer/spm.model" and os.path.exists(model)
    from input_pipeline.tokenizers.spm import Tokenizer

    tokens = Tokenizer(model).encode(["an emoji of grinning face", "ankle boot"], 16)
    assert tokens.shape == (2, 16) and (tokens[:, 0] > 3).all()
    shard = os.path.join(out, "emoji", "emoji-train-00000-of-00001.tfrecord")
    mtime = os.stat(shard).st_mtime_ns
    from input_pipeline.sources.embedded import build_embedded

    lines = []
    kw = dict(with_openclipart=False, progress=False, log=lines.append)
    second = build_embedded(out, fashion_limit=40, emoji_limit=60, **kw)
    skip = "openclipart: WARNING: SKIPPED, the embedded data has no OpenClipArt: disabled"
    assert [line.split(" (")[0] for line in lines] == [
        "emoji: up to date, skipped",
        "fashion_mnist: up to date, skipped",
        skip,
        "tokenizer: up to date, skipped",
        "emoji_styles: up to date, skipped",
    ]
    assert second["parts"] == parts and os.stat(shard).st_mtime_ns == mtime
    # A changed parameter rebuilds that part only (the tokenizer's inputs did not change).
    lines.clear()
    third = build_embedded(out, fashion_limit=20, emoji_limit=60, **kw)
    assert lines[0] == "emoji: up to date, skipped" and "wrote 20 train + 20 test" in lines[1]
    assert lines[2].startswith(skip) and lines[3] == "tokenizer: up to date, skipped"
    assert third["parts"]["fashion_mnist"]["splits"]["test"]["num_records"] == 20
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["parts"] == third["parts"]


OPENCLIPART = ("/usr/share/openclipart/png", "/usr/share/openclipart/svg")


@pytest.mark.skipif(
    not all(os.path.isdir(d) for d in OPENCLIPART),
    reason="OpenClipArt not installed (optional, too large for CI): "
    "apt-get install --no-install-recommends openclipart-png openclipart-svg",
)
def test_openclipart_subset(tmp_path):
    prefix = str(tmp_path / "oc")
    make_shards.main(
        ["openclipart", "--output", prefix, "--limit", "12", "--workers", "1", "--quiet"]
        + ["--test_fraction", "0"]
    )
    names = json.load(open(prefix + "-classnames.json"))
    assert len(names) == 18 and "computer" not in names and "signs and symbols" in names
    recs = _records(prefix + "-0*.tfrecord")
    assert len(recs) + len(_bad_lines(prefix)) == 12 and len(recs) >= 10
    for r in recs:
        assert r["texts"] and all(t.strip() for t in r["texts"])
        assert names[r["label"]] == r["id"].split("/")[0] == "animals"
        assert min(_decode(r["image"]).shape[:2]) <= 256
    dropped = json.load(open(prefix + "-dropped_categories.json"))
    assert set(dropped) == {"computer", "shapes", "special", "unsorted"}


def test_max_side_caps_the_long_side(tmp_path):
    """--max_side N: the long side is at most N (aspect kept, never upscaled), JPEGs are
    drafted no smaller than the target, and the cap is recorded in the stats."""
    images, _ = _idx_images("test")
    root = tmp_path / "imgs"
    root.mkdir()
    sizes = {"land.jpg": (640, 480), "port.jpg": (300, 500), "small.png": (100, 80)}
    for i, (name, size) in enumerate(sizes.items()):
        Image.fromarray(np.stack([images[i]] * 3, -1)).resize(size, Image.BICUBIC).save(root / name)
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"path": n, "caption": n}) + "\n" for n in sizes))
    cap = 256
    prefix = str(tmp_path / "out" / "ms")
    make_shards.main(
        ["folder", "--images_dir", str(root), "--captions", str(caps), "--output", prefix]
        + ["--max_side", str(cap), "--max_short_side", "0", "--quiet"]
    )
    recs = {r["id"]: r for r in _records(prefix + "-0*.tfrecord")}
    for name, (w, h) in sizes.items():
        got_h, got_w = _decode(recs[name]["image"]).shape[:2]
        scale = min(1.0, cap / max(w, h))
        assert (got_w, got_h) == (round(w * scale), round(h * scale)), name
        assert max(got_w, got_h) <= cap
    stats = json.load(open(prefix + "-stats.json"))
    assert stats["max_side"] == cap and stats["max_short_side"] is None
    # Both caps: the smaller scale wins.
    both = shard_writer.ImageOptions(max_short_side=100, max_side=cap)
    img = shard_writer.open_image(str(root / "land.jpg"), max_short_side=100, max_side=cap)
    assert img.size[0] >= 134 and img.size[1] >= 100  # drafted, still >= the target
    out = Image.open(io.BytesIO(shard_writer.encode_image(img, both)))
    assert out.size == (133, 100)
    with pytest.raises(ValueError, match="max_side"):
        shard_writer.ImageOptions(max_side=0)
