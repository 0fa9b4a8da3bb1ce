"""make_shards converters for other codebases' data: webdataset, csv, coco, cc3m.

Each test writes small real inputs in the foreign format (Fashion-MNIST images and rendered
Noto emoji, tars written with tarfile, CSV/TSV/JSON written by hand), runs the command line,
and reads the shards back: record counts, captions, labels, ids, exact pixels (stored as
PNG), and every bad input listed with its reason.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from input_pipeline import tfrecord
from input_pipeline.records import decode_example

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
import make_shards  # noqa: E402

FASHION = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
PNG_OUT = ["--format", "png", "--max_short_side", "0", "--workers", "1", "--quiet"]


def fashion(n: int) -> list[np.ndarray]:
    """The first n Fashion-MNIST test images (28x28 uint8)."""
    with gzip.open(FASHION) as f:
        pix = np.frombuffer(f.read(), np.uint8, offset=16)[: n * 784]
    return list(pix.reshape(n, 28, 28))


def emoji(char: str) -> Image.Image:
    """A Noto emoji rendered as Pillow draws it (size 109, colour, on RGBA)."""
    font = ImageFont.truetype(EMOJI_FONT, 109)
    img = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((0, 0), char, font=font, embedded_color=True)
    return img


def encode(img: Image.Image | np.ndarray, fmt: str) -> bytes:
    img = Image.fromarray(img) if isinstance(img, np.ndarray) else img
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def records(pattern: str) -> dict[str, dict]:
    source = tfrecord.TFRecordSource(pattern)
    out = [decode_example(source[i], where=f"{pattern}[{i}]") for i in range(len(source))]
    return {r["id"]: r for r in out}


def bad_lines(prefix: str) -> list[tuple[str, str, str]]:
    """(kind, input, reason) per line of PREFIX-bad_files.txt."""
    with open(prefix + "-bad_files.txt", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]
    return [(kind, where, reason) for _, kind, where, reason in rows]


def add(tar: tarfile.TarFile, name: str, data: bytes | str) -> None:
    data = data.encode("utf-8") if isinstance(data, str) else data
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# ----------------------------------------------------------------------------- webdataset


def test_webdataset_tars(tmp_path):
    imgs = fashion(6)
    smile = emoji("\U0001f600")
    with tarfile.open(tmp_path / "wds-0.tar", "w") as tar:
        add(tar, "s/000.png", encode(imgs[0], "PNG"))
        add(tar, "s/000.txt", "  a  grey\nshoe ")
        add(tar, "s/000.json", json.dumps({"caption": "a shoe", "url": "x"}))
        add(tar, "s/001.png", encode(imgs[1], "PNG"))
        add(tar, "s/001.cls", "7\n")
        add(tar, "s/002.webp", encode(smile, "WEBP"))
        add(tar, "s/002.txt", "grinning face")
        add(tar, "s/003.txt", "a caption without an image")
        add(tar, "s/004.jpg", b"\xff\xd8 not really a jpeg")
        add(tar, "s/004.txt", "broken image")
        add(tar, "s/005.png", encode(imgs[2], "PNG"))  # neither caption nor label
        add(tar, "s/006.png", encode(imgs[3], "PNG"))
        add(tar, "s/006.cls", "seven")
    # A compressed shard (no offsets: bytes travel with the task) repeating a key.
    with tarfile.open(tmp_path / "wds-1.tar", "w:gz") as tar:
        add(tar, "t/100.png", encode(imgs[4], "PNG"))
        add(tar, "t/100.txt", "a bag")
        add(tar, "s/000.png", encode(imgs[5], "PNG"))
        add(tar, "s/000.txt", "duplicate key")
    prefix = str(tmp_path / "out" / "wds")
    summary = make_shards.main(
        ["webdataset", str(tmp_path / "wds-{0..1}.tar"), "--output", prefix] + PNG_OUT
    )
    recs = records(prefix + "-*.tfrecord")
    assert summary.num_records == len(recs) == 4
    assert sorted(recs) == ["s/000", "s/001", "s/002", "t/100"]
    assert recs["s/000"]["texts"] == ["a grey shoe", "a shoe"]  # txt + json caption
    assert recs["s/001"]["texts"] == [] and recs["s/001"]["label"] == 7
    assert recs["s/002"]["texts"] == ["grinning face"] and recs["s/002"]["label"] == -1
    np.testing.assert_array_equal(pixels(recs["s/000"]["image"]), imgs[0])
    np.testing.assert_array_equal(pixels(recs["s/001"]["image"]), imgs[1])
    np.testing.assert_array_equal(pixels(recs["t/100"]["image"]), imgs[4])
    rgb = pixels(recs["s/002"]["image"])
    assert rgb.shape == (128, 136, 3) and rgb[0, 0].tolist() == [255, 255, 255]  # on white
    assert rgb.reshape(-1, 3).std(0).max() > 30  # the drawing survived

    bad = {where.split(":")[-1]: (kind, reason) for kind, where, reason in bad_lines(prefix)}
    assert set(bad) == {"s/003", "s/004.jpg", "s/005", "s/006", "s/000"}
    assert bad["s/003"][1].startswith("no image (has: txt)")
    assert "cannot decode image" in bad["s/004.jpg"][1] and "0x" not in bad["s/004.jpg"][1]
    assert bad["s/005"][1] == "no caption and no label"
    assert "not an integer" in bad["s/006"][1]
    assert "duplicate key" in bad["s/000"][1]
    assert all(kind == "bad" for kind, _ in bad.values())
    assert "5 bad" in summary.line()


def test_webdataset_truncated_tars_and_missing_shard(tmp_path):
    imgs = fashion(3)
    path = tmp_path / "whole.tar"
    with tarfile.open(path, "w") as tar:
        for i, img in enumerate(imgs):
            add(tar, f"{i:03d}.txt", f"image {i}")
            add(tar, f"{i:03d}.png", encode(img, "PNG"))
    data = path.read_bytes()
    last_png = data.rfind(b"002.png")
    cases = {
        # the last image's header survives, its bytes do not
        "data": (
            last_png + 512 + 40,
            {"002.png": "image cut short: 40 of", "": "cannot read the tar after 6 members"},
        ),
        # cut inside the last image's header: tarfile stops quietly; we do not
        "header": (last_png + 100, {"002": "no image (has: txt)", "": "damaged or truncated"}),
    }
    for name, (cut, expected) in cases.items():
        (tmp_path / f"{name}.tar").write_bytes(data[:cut])
        prefix = str(tmp_path / name)
        args = ["webdataset", str(tmp_path / f"{name}.tar"), "--output", prefix]
        summary = make_shards.main(args + PNG_OUT)
        assert summary.num_records == 2
        assert sorted(records(prefix + "-*.tfrecord")) == ["000", "001"]
        bad = {w.split(".tar")[1].lstrip(":"): r for _, w, r in bad_lines(prefix)}
        assert sorted(bad) == sorted(expected), bad
        for key, reason in expected.items():
            assert bad[key].startswith(reason), (name, bad)
    with pytest.raises(FileNotFoundError, match="no tar file matches"):
        make_shards.main(["webdataset", str(tmp_path / "none-{0..3}.tar"), "--output", prefix])


# ----------------------------------------------------------------------------- csv


def test_open_clip_csv(tmp_path):
    imgs = fashion(4)
    (tmp_path / "img").mkdir()
    for i, img in enumerate(imgs):
        Image.fromarray(img).save(tmp_path / "img" / f"{i}.png")
    emoji("\U0001f431").save(tmp_path / "img" / "cat.png")
    rows = [
        ("filepath", "title"),
        ("0.png", "a t-shirt"),
        ("1.png", "trousers"),
        ("0.png", "a top"),  # same image: merged, both captions kept
        (str(tmp_path / "img" / "2.png"), "an absolute path"),
        ("missing.png", "no such file"),
        ("3.png", "   "),  # empty caption
        ("cat.png", "cat face"),
    ]
    table = tmp_path / "train.tsv"
    table.write_text("\n".join("\t".join(r) for r in rows) + "\n", encoding="utf-8")
    prefix = str(tmp_path / "csv")
    args = ["csv", str(table), "--images_dir", str(tmp_path / "img"), "--output", prefix]
    summary = make_shards.main(args + PNG_OUT)
    recs = records(prefix + "-*.tfrecord")
    assert summary.num_records == 4
    assert recs["0.png"]["texts"] == ["a t-shirt", "a top"]
    assert recs["1.png"]["texts"] == ["trousers"] and recs["1.png"]["label"] == -1
    np.testing.assert_array_equal(pixels(recs["1.png"]["image"]), imgs[1])
    np.testing.assert_array_equal(pixels(recs[str(tmp_path / "img" / "2.png")]["image"]), imgs[2])
    assert recs["cat.png"]["texts"] == ["cat face"]
    assert [(w, r) for _, w, r in bad_lines(prefix)] == [  # file:line, as for a row
        (f"{table}:6", f"{tmp_path / 'img' / 'missing.png'}: file not found"),
        (f"{table}:7", "empty caption"),
    ]

    # A comma-separated file with other column names; a wrong column name is a clear error.
    csv_path = tmp_path / "other.csv"
    csv_path.write_text('image,caption\n1.png,"trousers, blue"\n', encoding="utf-8")
    prefix2 = str(tmp_path / "csv2")
    args = ["csv", str(csv_path), "--separator", ",", "--images_dir", str(tmp_path / "img")]
    args += ["--path_column", "image", "--caption_column", "caption", "--output", prefix2]
    make_shards.main(args + PNG_OUT)
    assert records(prefix2 + "-*.tfrecord")["1.png"]["texts"] == ["trousers, blue"]
    with pytest.raises(ValueError, match="no column 'filepath'"):
        make_shards.main(["csv", str(csv_path), "--separator", ",", "--output", prefix2])


# ----------------------------------------------------------------------------- coco


def test_coco_captions(tmp_path):
    imgs = fashion(3)
    (tmp_path / "coco" / "val2017").mkdir(parents=True)
    for i, img in enumerate(imgs):
        Image.fromarray(img).convert("RGB").save(tmp_path / "coco" / "val2017" / f"{i:012d}.png")
    images = [{"id": 10 + i, "file_name": f"{i:012d}.png"} for i in range(3)]
    images += [
        {"id": 13, "file_name": "000000000003.png"},  # has captions, no file
        {"id": 14, "file_name": "000000000004.png"},  # no captions
    ]
    anns = [
        {"id": 9, "image_id": 10, "caption": "A shoe on white."},
        {"id": 2, "image_id": 10, "caption": "a  sneaker\n"},
        {"id": 100, "image_id": 10, "caption": "Footwear."},
        {"id": 4, "image_id": 11, "caption": "a dress"},
        {"id": 5, "image_id": 12, "caption": "a bag"},
        {"id": 6, "image_id": 12, "caption": ""},
        {"id": 7, "image_id": 13, "caption": "lost image"},
        {"id": 8, "image_id": 99, "caption": "orphan"},
    ]
    ann_path = tmp_path / "captions_val2017.json"
    ann_path.write_text(json.dumps({"images": images, "annotations": anns}), encoding="utf-8")
    prefix = str(tmp_path / "out" / "coco")
    args = ["coco", str(ann_path), "--images_dir", str(tmp_path / "coco"), "--output", prefix]
    summary = make_shards.main(args + PNG_OUT)
    assert list(summary.splits) == ["val2017"]
    assert os.path.exists(prefix + "-val2017-00000-of-00001.tfrecord")
    recs = records(prefix + "-val2017-*.tfrecord")
    assert summary.num_records == len(recs) == 3
    # all captions of an image in one record, in annotation-id order, whitespace tidied
    assert recs["000000000000.png"]["texts"] == ["a sneaker", "A shoe on white.", "Footwear."]
    assert recs["000000000002.png"]["texts"] == ["a bag"]
    rgb = pixels(recs["000000000001.png"]["image"])
    np.testing.assert_array_equal(rgb[..., 0], imgs[1])
    folder = tmp_path / "coco" / "val2017"
    assert sorted((w, r) for _, w, r in bad_lines(prefix)) == [
        (f"{ann_path}:annotations[5]", "empty or missing caption"),
        (f"{ann_path}:annotations[7]", "image_id 99 names no image"),
        (f"{ann_path}:images[3]", f"{folder / '000000000003.png'}: file not found"),
        (f"{ann_path}:images[4]", f"{folder / '000000000004.png'}: image has no captions"),
    ]


# ----------------------------------------------------------------------------- cc3m


def test_cc3m_tsv_with_images_on_disk(tmp_path):
    imgs = fashion(5)
    urls = [f"http://example.com/pics/{i}.jpg?x=1" for i in range(5)]
    lines = [f"caption number {i}\t{u}" for i, u in enumerate(urls)]
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "dl").mkdir()
    for i in (0, 2, 3):  # rows 1 and 4 failed to download
        Image.fromarray(imgs[i]).save(tmp_path / "dl" / f"{i:05d}.png")
    (tmp_path / "dl" / "00003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    prefix = str(tmp_path / "cc3m")
    args = ["cc3m", str(tsv), "--images_dir", str(tmp_path / "dl"), "--output", prefix]
    summary = make_shards.main(args + ["--filename", "{index:05d}"] + PNG_OUT)
    recs = records(prefix + "-*.tfrecord")
    assert summary.num_records == 2 and sorted(recs) == ["00000", "00002"]
    assert recs["00002"]["texts"] == ["caption number 2"]
    np.testing.assert_array_equal(pixels(recs["00000"]["image"]), imgs[0])
    dl = tmp_path / "dl"
    assert [(w, r.split(" (")[0]) for _, w, r in bad_lines(prefix)] == [  # TSV line, image
        (f"{tsv}:2", f"{dl / '00001'}: file not found"),
        (f"{tsv}:4", f"{dl / '00003.png'}: cannot decode image"),
        (f"{tsv}:5", f"{dl / '00004'}: file not found"),
    ]

    # Files named by the sha1 of the URL, a header row; URLs without --filename are bad.
    for i in range(5):
        name = hashlib.sha1(urls[i].encode()).hexdigest() + ".png"
        Image.fromarray(imgs[i]).save(tmp_path / "dl" / name)
    tsv2 = tmp_path / "with_header.tsv"
    tsv2.write_text("caption\turl\n" + "\n".join(lines) + "\n", encoding="utf-8")
    prefix2 = str(tmp_path / "cc3m_sha")
    args = ["cc3m", str(tsv2), "--images_dir", str(tmp_path / "dl"), "--output", prefix2]
    assert make_shards.main(args + ["--filename", "{sha1}.png"] + PNG_OUT).num_records == 5
    with pytest.raises(SystemExit, match=r"all 5 inputs were bad \(5 bad, 0 skipped\)"):
        make_shards.main(args + ["--filename", "{value}"] + PNG_OUT)
    assert all("is a URL" in r for _, _, r in bad_lines(prefix2)) and len(bad_lines(prefix2)) == 5


# ----------------------------------------------------------------------------- ImageNet assets


def test_imagenet_zero_shot_assets_and_folder_label_order(tmp_path):
    """CLIP's 1,000 cleaned class names in the standard (sorted WordNet id) label order, the
    80/7 templates, and the zero-shot config: it rejects a folder whose classes are not the
    1,000 ids in order (labels would name the wrong classes)."""
    from configs import zeroshot_imagenet as zs
    from input_pipeline import templates

    names = json.load(open(zs.IMAGENET_CLASSNAMES, encoding="utf-8"))
    wnids = json.load(open(zs.IMAGENET_WNIDS, encoding="utf-8"))
    assert len(names) == len(wnids) == 1000 and wnids == sorted(wnids)
    assert (names[0], names[1], names[207], names[999]) == (
        "tench",
        "goldfish",
        "Golden Retriever",
        "toilet paper",
    )
    assert (wnids[0], wnids[207]) == ("n01440764", "n02099601")
    assert len(templates.load_templates("imagenet80")) == 80
    assert len(templates.load_templates("imagenet7")) == 7
    assert "classnames" not in templates.available_templates()

    # An ImageFolder with only 3 of the 1,000 classes: make_shards folder labels them 0..2.
    for wnid, img in zip((wnids[0], wnids[1], wnids[207]), fashion(3), strict=True):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        Image.fromarray(img).save(tmp_path / "val" / wnid / "ILSVRC2012_val_00000001.png")
    prefix = str(tmp_path / "imagenet" / "imagenet")
    args = ["folder", "--images_dir", str(tmp_path / "val"), "--split", "val", "--output", prefix]
    make_shards.main(args + PNG_OUT)
    val = prefix + "-val-*.tfrecord"
    assert sorted(r["label"] for r in records(val).values()) == [0, 1, 2]
    with pytest.raises(ValueError, match="not the 1,000 ImageNet WordNet ids"):
        zs.get_config(f"method=clip,size=vitb,val={val}")
    # All 1,000 in order: accepted, and the eval reads CLIP's names with the 80 templates.
    json.dump(wnids, open(prefix + "-classnames.json", "w"))
    config = zs.get_config(f"method=clip,size=vitb,val={val},limit=10")
    ev = config.evals.imagenet_zero_shot
    assert (ev.type, ev.shards, ev.templates, ev.limit) == ("zero_shot", val, "imagenet80", 10)
    assert ev.classnames == zs.IMAGENET_CLASSNAMES and config.model.image_encoder == "vit_b16"
