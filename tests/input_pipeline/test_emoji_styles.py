"""The held-out emoji in other art styles (EmojiOne PNGs, the Symbola font), built from the
real Debian packages: the emoji test split only, emoji's labels, texts and class names, real
glyphs (not blank, not .notdef), every uncovered emoji listed with its reason, and the
coverage counts in the embedded manifest."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from input_pipeline import tfrecord
from input_pipeline.pipeline import build_eval_arrays
from input_pipeline.records import decode_example
from input_pipeline.sources import emoji, emoji_styles, shard_writer
from input_pipeline.sources.embedded import build_embedded

PATHS = {"emojione": emoji_styles.EMOJIONE_DIR, "symbola": emoji_styles.SYMBOLA_FONT}
MISSING = {s: emoji_styles.missing_reason(s, p) for s, p in PATHS.items()}
needs = {
    s: pytest.mark.skipif(bool(MISSING[s]), reason=f"{s} not installed: {MISSING[s]}")
    for s in PATHS
}
needs_both = pytest.mark.skipif(
    any(MISSING.values()),
    reason="emoji art styles not installed: "
    "apt-get install --no-install-recommends ruby-gemojione fonts-symbola",
)

# Held-out emoji (their base emoji hash into the test split), Emoji.hex -> (name, subgroup).
THUMB_RIGHT_MEDIUM = "1F449-1F3FD"  # a skin tone: EmojiOne only
THUMB_RIGHT_DARK = "1F449-1F3FF"
THINKING = "1F914"
MEDAL = "1F396-FE0F"  # FE0F: not in EmojiOne's file name, ignored by Symbola
KISS_MAN_MAN = "1F468-200D-2764-FE0F-200D-1F48B-200D-1F468"  # ZWJ: EmojiOne only
WOOZY = "1F974"  # Emoji 11.0: in neither style
KNOWN = {
    THUMB_RIGHT_MEDIUM: ("backhand index pointing right: medium skin tone", "hand-single-finger"),
    THUMB_RIGHT_DARK: ("backhand index pointing right: dark skin tone", "hand-single-finger"),
    THINKING: ("thinking face", "face-hand"),
    MEDAL: ("military medal", "award-medal"),
    KISS_MAN_MAN: ("kiss: man, man", "family"),
    WOOZY: ("woozy face", "face-unwell"),
}
COVERED = {
    "emojione": {THUMB_RIGHT_MEDIUM, THUMB_RIGHT_DARK, THINKING, MEDAL, KISS_MAN_MAN},
    "symbola": {THINKING, MEDAL},
}


@pytest.fixture(scope="module")
def truth():
    """Every fully-qualified emoji by hex, its split (recomputed here), keywords, classes."""
    all_emoji = emoji.parse_emoji_test()
    bases = emoji.base_groups(all_emoji)
    split = {e.hex: emoji.split_of(b, 0.2) for e, b in zip(all_emoji, bases, strict=True)}
    base_plan = emoji.plan(test_fraction=0.2, image_size=128)
    return {
        "emoji": {e.hex: e for e in all_emoji},
        "split": split,
        "test": {t.id.rsplit("/", 1)[1]: t for t in base_plan.splits["test"]},
        "plan": base_plan,
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Both styles over the whole held-out split (about 2 s on one core)."""
    out = tmp_path_factory.mktemp("styles")
    result = {}
    for style in emoji_styles.STYLES:
        if MISSING[style]:
            continue
        summary, counts = emoji_styles.write_style(
            style, str(out), workers=1, progress=False, log=lambda _: None
        )
        pattern = str(out / "emoji_styles" / f"{style}-test-*-of-*.tfrecord")
        source = tfrecord.TFRecordSource(pattern)
        records = [decode_example(source[i], where=f"{pattern}[{i}]") for i in range(len(source))]
        result[style] = {"summary": summary, "coverage": counts, "records": records}
    return out, result


def _image(record: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(record["image"])).convert("RGB"))


def _bad_lines(path: str) -> list[list[str]]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]


def test_known_emoji_are_in_the_test_split(truth):
    for hexes, (name, subgroup) in KNOWN.items():
        e = truth["emoji"][hexes]
        assert (e.name, e.subgroup) == (name, subgroup)
        assert truth["split"][hexes] == "test", hexes


@pytest.mark.parametrize("style", emoji_styles.STYLES)
def test_known_records_name_label_texts(style, built, truth):
    if MISSING[style]:
        pytest.skip(f"{style} not installed: {MISSING[style]}")
    _, result = built
    classnames = truth["plan"].classnames
    by_hex = {r["id"].rsplit("/", 1)[1]: r for r in result[style]["records"]}
    for hexes in COVERED[style]:
        r, (name, subgroup) = by_hex[hexes], KNOWN[hexes]
        e, task = truth["emoji"][hexes], truth["test"][hexes]
        assert r["id"] == task.id == f"{e.group}/{subgroup}/{hexes}"
        assert r["texts"][0] == name
        assert tuple(r["texts"]) == task.texts  # the Noto test record's texts, in order
        assert classnames[r["label"]] == emoji.readable(subgroup) and r["label"] == task.label
        assert _image(r).shape == (128, 128, 3)
    for hexes in set(KNOWN) - COVERED[style]:
        assert hexes not in by_hex, (style, hexes)
    if style == "emojione":  # two tones, two files
        medium, dark = (_image(by_hex[h]).mean() for h in (THUMB_RIGHT_MEDIUM, THUMB_RIGHT_DARK))
        assert dark < medium - 5


@needs_both
def test_only_held_out_emoji_and_nothing_dropped_silently(built, truth):
    out, result = built
    test_ids = {t.id for t in truth["plan"].splits["test"]}
    assert len(test_ids) > 700
    for style, res in result.items():
        ids = [r["id"] for r in res["records"]]
        assert len(ids) == len(set(ids))
        for r in res["records"]:
            hexes = r["id"].rsplit("/", 1)[1]
            assert truth["split"][hexes] == "test", (style, r["id"])
            assert r["texts"][0] == truth["emoji"][hexes].name
        # Every held-out emoji is a record or a listed skip, with its reason.
        lines = _bad_lines(res["summary"].bad_files_path)
        listed = {line[2]: line[3] for line in lines if line[1] == "skipped"}
        assert not [line for line in lines if line[1] != "skipped"], lines[:3]
        assert set(ids) | set(listed) == test_ids and not set(ids) & set(listed)
        c = res["coverage"]
        assert c["test_emoji"] == len(test_ids)
        assert c["covered"] == len(ids) and c["skipped"] == len(listed) and c["bad"] == 0
        assert sum(c["skipped_by_reason"].values()) == c["skipped"]
        with open(out / "emoji_styles" / f"{style}-test-stats.json") as f:
            assert json.load(f)["num_records"] == len(ids)
    emojione, symbola = result["emojione"]["coverage"], result["symbola"]["coverage"]
    assert emojione["covered"] > 300 and set(emojione["skipped_by_reason"]) == {"no EmojiOne PNG"}
    assert symbola["covered"] > 200
    kiss = truth["test"][KISS_MAN_MAN].id
    reasons = {line[2]: line[3] for line in _bad_lines(result["symbola"]["summary"].bad_files_path)}
    assert reasons[kiss].startswith("ZWJ sequence: not one Symbola glyph")
    assert reasons[truth["test"][THUMB_RIGHT_MEDIUM].id].startswith("skin tone modifier")
    woozy = "not in Symbola: renders as its .notdef box (emoji E11.0)"
    assert reasons[truth["test"][WOOZY].id] == woozy
    assert sum(symbola["skipped_by_emoji_version"].values()) == symbola["skipped"]
    assert sum(emojione["skipped_by_emoji_version"].values()) == emojione["skipped"]
    for kind in ("ZWJ sequence", "skin tone modifier sequence", "regional indicator flag"):
        assert symbola["skipped_by_reason"][f"{kind}: not one Symbola glyph"] > 0


@needs_both
def test_side_files_equal_emojis_and_the_evaluators_read_them(built, truth):
    out, _ = built
    plan = truth["plan"]
    for style in emoji_styles.STYLES:
        prefix = out / "emoji_styles" / style
        assert json.loads((prefix.parent / f"{style}-classnames.json").read_text()) == (
            plan.classnames
        )
        groups = json.loads((prefix.parent / f"{style}-groups.json").read_text())
        assert groups == plan.side_files["groups.json"]
        shard = prefix.parent / f"{style}-test-00000-of-00001.tfrecord"
        assert shard.exists() and (prefix.parent / f"{shard.name}.idx").exists()
        # As the zero-shot / retrieval evaluators load the emoji test shards.
        arrays = build_eval_arrays(
            str(prefix) + "-test-*.tfrecord",
            image_size=32,
            classnames=str(prefix) + "-classnames.json",
            num_threads=1,
        )
        assert arrays["image"].shape[1:] == (32, 32, 3) and len(arrays["id"]) > 200
        assert int(arrays["label"].max()) < len(plan.classnames)


@needs["symbola"]
def test_symbola_images_are_real_glyphs(built):
    _, result = built
    font = emoji_styles.SYMBOLA_FONT
    with pytest.raises(LookupError, match="notdef"):
        emoji_styles.render_symbola(emoji_styles.UNASSIGNED, 128, font)
    with pytest.raises(LookupError, match="notdef"):
        emoji_styles.render_symbola(chr(0x1F974), 128, font)  # woozy face, Emoji 11.0
    # The .notdef box as it would look if it slipped through, processed like a record.
    coverage = emoji_styles.draw_glyph(emoji_styles.UNASSIGNED, font)
    box = Image.new("RGBA", coverage.size, (0, 0, 0, 0))
    box.putalpha(coverage)
    notdef = np.asarray(emoji_styles.crop_to_square(box, 128), np.float32)
    images = [_image(r).astype(np.float32) for r in result["symbola"]["records"]]
    assert len(images) > 200
    seen = set()
    for r, img in zip(result["symbola"]["records"], images, strict=True):
        ink = (img.mean(axis=2) < 128).mean()
        assert ink > 0.02 and img.max() > 240, (r["id"], ink)  # black on white, not blank
        assert np.abs(img[..., 0] - img[..., 2]).max() < 16, r["id"]  # monochrome
        assert np.abs(img - notdef).mean() > 5, r["id"]
        seen.add(np.round(img / 64).astype(np.uint8).tobytes())
    assert len(seen) > 0.95 * len(images)  # distinct glyphs, not one fallback drawing


def test_only_selects_held_out_emoji(truth):
    if MISSING["emojione"]:
        pytest.skip(f"emojione not installed: {MISSING['emojione']}")
    plan = emoji_styles.plan("emojione", only=[THINKING, WOOZY, "1F600"])  # 1F600: train
    tasks = plan.splits["test"]
    assert [type(t) for t in tasks] == [emoji_styles.Task, shard_writer.Bad]
    assert tasks[0].id == truth["test"][THINKING].id
    assert tasks[1].skipped and tasks[1].reason == "no EmojiOne PNG (1F974.png; emoji E11.0)"


@needs_both
def test_embedded_part_records_coverage_and_is_cached(tmp_path):
    out = str(tmp_path / "data")
    lines: list[str] = []
    kw = dict(
        fashion_limit=20,
        emoji_limit=60,
        with_openclipart=False,
        workers=1,
        progress=False,
        log=lines.append,
    )
    manifest = build_embedded(out, **kw)
    part = manifest["parts"]["emoji_styles"]
    emoji_part = manifest["parts"]["emoji"]
    n_test = emoji_part["splits"]["test"]["num_records"]
    assert n_test > 0
    for style in emoji_styles.STYLES:
        entry = part["styles"][style]
        c = entry["coverage"]
        assert c["test_emoji"] == n_test  # the emoji part's held-out emoji, same limit
        assert c["covered"] == entry["splits"]["test"]["num_records"] > 0
        assert c["covered"] + c["skipped"] + c["bad"] == n_test
        assert entry["splits"]["test"]["pattern"] == f"emoji_styles/{style}-test-*-of-*.tfrecord"
        names = os.path.join(out, entry["classnames"])
        with open(names, "rb") as a, open(os.path.join(out, emoji_part["classnames"]), "rb") as b:
            assert a.read() == b.read()
        assert any(f"emoji_styles/{style}: covers {c['covered']} of {n_test}" in x for x in lines)
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["parts"]["emoji_styles"] == part
    shard = os.path.join(out, "emoji_styles", "symbola-test-00000-of-00001.tfrecord")
    mtime = os.stat(shard).st_mtime_ns
    # A second run keeps it; a missing package is a loud, recorded skip of that style.
    lines.clear()
    again = build_embedded(out, **kw)
    assert "emoji_styles: up to date, skipped" in lines
    assert again["parts"]["emoji_styles"] == part and os.stat(shard).st_mtime_ns == mtime
    lines.clear()
    no_font = str(tmp_path / "no" / "Symbola.ttf")
    third = build_embedded(out, emoji_styles_paths={"symbola": no_font}, **kw)
    styles = third["parts"]["emoji_styles"]["styles"]
    reason = styles["symbola"]["skipped"]
    assert styles["symbola"] == {"skipped": reason} and "fonts-symbola" in reason
    assert any("emoji_styles/symbola: WARNING: SKIPPED" in x and reason in x for x in lines)
    assert styles["emojione"]["coverage"] == part["styles"]["emojione"]["coverage"]


@pytest.mark.skipif(bool(MISSING["emojione"]), reason=f"emojione: {MISSING['emojione']}")
def test_a_train_split_holds_the_training_emoji_only(tmp_path):
    """EmojiOne's train split (for training on two fonts): each record is a training emoji
    of `emoji.plan` with its label and texts, no held-out emoji, every skip counted."""
    summary, counts = emoji_styles.write_style(
        "emojione",
        str(tmp_path),
        workers=1,
        progress=False,
        log=lambda _: None,
        limit=400,
        splits=("test", "train"),
    )
    base = emoji.plan(limit=400, test_fraction=0.2, image_size=128)
    want = {t.id: t for t in base.splits["train"]}
    held_out = {t.id for t in base.splits["test"]}
    pattern = str(tmp_path / "emoji_styles" / "emojione-train-*-of-*.tfrecord")
    source = tfrecord.TFRecordSource(pattern)
    records = [decode_example(source[i], where=f"{pattern}[{i}]") for i in range(len(source))]
    assert records and not {r["id"] for r in records} & held_out
    for r in records:
        assert r["label"] == want[r["id"]].label and tuple(r["texts"]) == want[r["id"]].texts
    train = counts["train"]
    assert train["train_emoji"] == len(want) == train["covered"] + train["skipped"] + train["bad"]
    assert train["covered"] == len(records) == summary.splits["train"].num_records
    assert counts["test_emoji"] == len(held_out)  # the held-out split's counts, as before
