"""The whole embedded data (issue 15): every emoji text, OpenClipArt split by title on white,
the build without OpenClipArt, and the weighted emoji + OpenClipArt + Fashion-MNIST mixture."""

from __future__ import annotations

import io
import json
import os
import warnings
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from configs import common
from input_pipeline import pipeline, tfrecord
from input_pipeline.records import decode_example
from input_pipeline.sources import emoji, emoji_styles, openclipart, shard_writer
from input_pipeline.sources.embedded import build_embedded

OPENCLIPART = (openclipart.PNG_DIR, openclipart.SVG_DIR)
needs_openclipart = pytest.mark.skipif(
    not all(os.path.isdir(d) for d in OPENCLIPART),
    reason="OpenClipArt not installed: "
    "apt-get install --no-install-recommends openclipart-png openclipart-svg",
)


def _records(pattern: str) -> list[dict]:
    source = tfrecord.TFRecordSource(pattern)
    return [decode_example(source[i], where=f"{pattern}[{i}]") for i in range(len(source))]


# ----------------------------------------------------------------------------- emoji texts


def test_emoji_captions_name_first_each_keyword_dedup():
    e = emoji.Emoji((0x1F600,), "grinning face", "Smileys & Emotion", "face-smiling")
    texts = emoji.captions(e, ["face", "grin", "grinning face", "Face", " grin "])
    assert texts[0] == "grinning face"
    assert {"face", "grin", "an emoji of grinning face", "grinning face emoji"} <= set(texts)
    assert "face, grin, grinning face, Face, grin" in texts  # the joined list, CLDR order
    folded = [t.casefold() for t in texts]
    assert len(folded) == len(set(folded)), texts  # "grinning face", "Face", "grin" once
    assert emoji.captions(e, []) == (
        "grinning face",
        "an emoji of grinning face",
        "grinning face emoji",
    )


def test_emoji_records_carry_every_keyword_name_first(embedded_data):
    """Every built emoji record: texts[0] is its CLDR name, each keyword is a text."""
    by_hex = {e.hex: e for e in emoji.parse_emoji_test()}
    keywords = emoji.load_keywords()
    recs = _records(str(embedded_data / "emoji" / "emoji-*-0*.tfrecord"))
    assert len(recs) > 3000
    with_keywords = 0
    for r in recs:
        e = by_hex[r["id"].rsplit("/", 1)[1]]
        kw = keywords.get(e.text.replace(chr(emoji.VS16), ""), [])
        assert r["texts"][0] == e.name
        folded = {t.casefold() for t in r["texts"]}
        assert {k.casefold() for k in kw} <= folded, (r["id"], kw, r["texts"])
        assert len(folded) == len(r["texts"])
        with_keywords += bool(kw)
    assert with_keywords > 0.9 * len(recs)
    manifest = json.loads((embedded_data / "manifest.json").read_text())
    assert manifest["parts"]["emoji"]["texts_per_record"]["train"] > 5


# ----------------------------------------------------------------------------- OpenClipArt


def _task_ids(plan) -> dict[str, list[str]]:
    return {
        s: [t.id for t in ts if isinstance(t, openclipart.Task)] for s, ts in plan.splits.items()
    }


@needs_openclipart
def test_openclipart_split_by_title_deterministic_disjoint():
    plan = openclipart.plan(test_fraction=0.2)
    ids = _task_ids(plan)
    assert ids == _task_ids(openclipart.plan(test_fraction=0.2))  # deterministic
    assert set(ids) == {"train", "test"} and ids["train"] and ids["test"]
    assert not set(ids["train"]) & set(ids["test"])
    titles = {
        s: {openclipart.split_key(t.texts[0]) for t in ts if isinstance(t, openclipart.Task)}
        for s, ts in plan.splits.items()
    }
    assert not titles["train"] & titles["test"]  # one title never straddles the splits
    n_test, n = len(ids["test"]), len(ids["train"]) + len(ids["test"])
    assert n > 3000 and 0.12 < n_test / n < 0.28, (n_test, n)
    # By title, the test share of titles is close to the fraction asked.
    assert 0.15 < len(titles["test"]) / (len(titles["train"]) + len(titles["test"])) < 0.25
    # A prefix (limit) keeps each file's split.
    small = _task_ids(openclipart.plan(test_fraction=0.2, limit=200))
    assert set(small["train"]) <= set(ids["train"]) and set(small["test"]) <= set(ids["test"])


def _transparent_pngs() -> dict[str, str]:
    """A real OpenClipArt PNG of each alpha kind (RGBA, LA, palette + tRNS) whose top-left
    pixel is transparent and holds a dark colour (what dropping alpha would show)."""
    found: dict[str, str] = {}
    for rel in openclipart.list_pngs(openclipart.PNG_DIR):
        path = os.path.join(openclipart.PNG_DIR, rel)
        width, height = shard_writer.header_size(path)
        if width * height > 2_000_000:
            continue
        with Image.open(path) as img:
            kind = img.mode + ("+tRNS" if "transparency" in img.info else "")
            if kind not in ("RGBA", "LA", "P+tRNS") or kind in found:
                continue
            rgba = img.convert("RGBA")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow: palette transparency as bytes
                naive = img.convert("RGB")
        if rgba.getpixel((0, 0))[3] == 0 and max(naive.getpixel((0, 0))) < 64:
            found[kind] = rel
        if len(found) == 3:
            break
    return found


@needs_openclipart
def test_openclipart_transparent_background_becomes_white():
    found = _transparent_pngs()
    assert set(found) == {"RGBA", "LA", "P+tRNS"}, found
    for kind, rel in found.items():
        task = openclipart.Task(rel, os.path.join(openclipart.PNG_DIR, rel), ("x",), 0, 128)
        record = openclipart.process(task, shard_writer.ImageOptions(format="jpeg"))
        assert isinstance(record, shard_writer.Record), record
        img = np.asarray(Image.open(io.BytesIO(record.image)))
        assert img.shape == (128, 128, 3)
        assert img[0, 0].min() > 240 and img[-1, -1].min() > 240, (kind, rel, img[0, 0])


@needs_openclipart
def test_embedded_openclipart_part(embedded_data):
    manifest = json.loads((embedded_data / "manifest.json").read_text())
    part = manifest["parts"]["openclipart"]
    splits = part["splits"]
    assert splits["train"]["num_records"] + splits["test"]["num_records"] >= 290
    assert splits["test"]["num_records"] > 0
    train = _records(str(embedded_data / part["splits"]["train"]["pattern"]))
    test = _records(str(embedded_data / part["splits"]["test"]["pattern"]))
    titles = {
        s: {openclipart.split_key(r["texts"][0]) for r in rs}
        for s, rs in (("train", train), ("test", test))
    }
    assert not titles["train"] & titles["test"]
    for r in train[:50]:
        assert np.asarray(Image.open(io.BytesIO(r["image"]))).shape == (128, 128, 3)
    # The tokenizer saw the OpenClipArt train captions.
    inputs = manifest["parts"]["tokenizer"]["inputs"]
    assert any(k.startswith("openclipart/openclipart-train-") for k in inputs), inputs


def test_embedded_without_openclipart_is_a_logged_skip(tmp_path):
    out = str(tmp_path / "data")
    lines: list[str] = []
    manifest = build_embedded(
        out,
        fashion_limit=20,
        emoji_limit=30,
        openclipart_dirs=(str(tmp_path / "no_png"), str(tmp_path / "no_svg")),
        workers=1,
        progress=False,
        log=lines.append,
    )
    reason = manifest["parts"]["openclipart"]["skipped"]
    assert "apt-get install" in reason and "openclipart-png openclipart-svg" in reason
    assert any("openclipart: WARNING: SKIPPED" in line and reason in line for line in lines)
    assert manifest["parts"]["emoji"]["splits"]["train"]["num_records"] > 0
    assert manifest["parts"]["fashion_mnist"]["splits"]["train"]["num_records"] == 20
    assert not any("openclipart" in k for k in manifest["parts"]["tokenizer"]["inputs"])
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["parts"]["openclipart"] == {"skipped": reason}
    # A source weighted in the mixture whose shards were not built is a clear error.
    cfg = pipeline.default_config()
    cfg.sources = common.embedded_sources(out, openclipart_weight=1.0)
    with pytest.raises(FileNotFoundError, match="no shard matches") as e:
        pipeline.build_train_dataset(cfg, global_batch_size=4, needs={"id_hash"})
    notes = "".join(getattr(e.value, "__notes__", []))
    assert "openclipart" in notes and "data.sources.openclipart.weight=0" in notes
    cfg.sources.openclipart.weight = 0.0  # the fix the note names: the rest still trains
    ds = pipeline.build_train_dataset(cfg, global_batch_size=4, needs={"id_hash"})
    assert next(iter(ds))["id_hash"].shape == (4,)


# ----------------------------------------------------------------------------- mixture


def _owners(root, sources: dict) -> tuple[dict[int, str], set[int]]:
    """id_hash -> source name over the train shards, and the id hashes of the test shards."""
    train, test = {}, set()
    for name, src in sources.items():
        for r in _records(src["shards"]):
            train[zlib.crc32(r["id"].encode()) & 0x7FFFFFFF] = name
        for r in _records(src["shards"].replace("-train-", "-test-")):
            test.add(zlib.crc32(r["id"].encode()) & 0x7FFFFFFF)
    return train, test


@needs_openclipart
def test_mixture_of_the_three_sources_follows_the_weights(embedded_data):
    config = common.recipe("clip", "tiny", f"data={embedded_data},fashion=1.0,openclipart=2.0")
    cfg = config.data
    assert set(cfg.sources) == {"emoji", "fashion_mnist", "openclipart"}
    cfg.num_threads = 2
    cfg.image_size = 16
    train, test = _owners(embedded_data, cfg.sources.to_dict())
    assert len(train) > 5000 and not set(train) & test
    it = pipeline.make_train_iterator(cfg, global_batch_size=64, needs={"id_hash", "label"})
    hashes = np.concatenate([next(it)["id_hash"] for _ in range(25)])  # 1,600 samples
    assert all(int(h) in train for h in hashes)  # train splits only
    share = Counter(train[int(h)] for h in hashes)
    total = sum(share.values())
    for name, expected in (("emoji", 0.25), ("fashion_mnist", 0.25), ("openclipart", 0.5)):
        assert abs(share[name] / total - expected) < 0.04, share


@pytest.mark.skipif(
    bool(emoji_styles.missing_reason("emojione", emoji_styles.EMOJIONE_DIR)),
    reason="EmojiOne not installed: apt-get install ruby-gemojione",
)
def test_the_emojione_source_draws_training_emoji_in_another_font(embedded_data):
    """`emojione=W`: the training emoji in EmojiOne's art, a source of their own; never a
    held-out emoji, and each with the texts of its Noto record."""
    config = common.recipe("clip", "tiny", f"data={embedded_data},emojione=1.0")
    cfg = config.data
    assert set(cfg.sources) == {"emoji", "emojione"}
    noto_train = {r["id"]: r for r in _records(cfg.sources.emoji.shards)}
    noto_test = {r["id"] for r in _records(cfg.sources.emoji.shards.replace("-train-", "-test-"))}
    styled = _records(cfg.sources.emojione.shards)
    assert len(styled) > 100
    for r in styled:
        assert r["id"] in noto_train and r["id"] not in noto_test
        assert (
            r["texts"] == noto_train[r["id"]]["texts"]
            and r["image"] != noto_train[r["id"]]["image"]
        )
    del cfg.sources["emoji"]  # draw from the EmojiOne source alone
    cfg.image_size = 16
    it = pipeline.make_train_iterator(cfg, global_batch_size=32, needs={"image", "tokens"})
    assert next(it)["image"].shape == (32, 16, 16, 3)
