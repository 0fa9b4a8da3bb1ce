"""The grain pipeline on real records: emoji art with captions and Fashion-MNIST with labels.

Shards are made here (small) from Noto Color Emoji glyphs and the Debian Fashion-MNIST
files, with a sentencepiece tokenizer trained on their captions and prompts.
"""

import gzip
import io
import json
import logging
import os
import unicodedata
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from tensorflow_datasets.proto import tf_example_pb2

from input_pipeline import pipeline, records, tfrecord
from input_pipeline import templates as templates_lib
from input_pipeline.tokenizers.spm import Tokenizer, train_sentencepiece

EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FMNIST = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
# 20 faces and 20 animals.
EMOJI = [chr(c) for c in range(0x1F600, 0x1F614)] + [chr(c) for c in range(0x1F400, 0x1F414)]
SIZE = 16  # training crop side
TEXT_LEN = 12


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _render_emoji(font, ch: str, size: int = 40) -> Image.Image:
    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), ch, font=font, embedded_color=True)
    glyph = canvas.crop(canvas.getbbox())
    side = max(glyph.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2), glyph)
    return square.resize((size, size), Image.Resampling.BILINEAR)


def _read_idx(path: str, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=header)


def _write_shards(directory, name: str, payloads: list[bytes], num_shards: int) -> str:
    os.makedirs(directory, exist_ok=True)
    per = -(-len(payloads) // num_shards)
    for s in range(num_shards):
        path = os.path.join(directory, f"{name}-{s:05d}-of-{num_shards:05d}.tfrecord")
        with tfrecord.TFRecordWriter(path) as w:
            for p in payloads[s * per : (s + 1) * per]:
                w.write(p)
    return os.path.join(directory, f"{name}-*.tfrecord")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two real shard sets (40 emoji captions, 48 Fashion-MNIST labels) and a tokenizer."""
    root = tmp_path_factory.mktemp("data")
    font = ImageFont.truetype(EMOJI_FONT, 109)
    emoji, captions = [], {}
    for ch in EMOJI:
        name = unicodedata.name(ch).lower()
        texts = [name, f"an emoji of a {name}"]
        sid = f"emoji-{ord(ch):x}"
        captions[sid] = texts
        emoji.append(
            records.encode_example(image=_jpeg(_render_emoji(font, ch)), texts=texts, id=sid)
        )
    images = _read_idx(f"{FMNIST}/train-images-idx3-ubyte.gz", 16)[: 48 * 784].reshape(48, 28, 28)
    labels = _read_idx(f"{FMNIST}/train-labels-idx1-ubyte.gz", 8)[:48]
    fmnist = [
        records.encode_example(image=_jpeg(Image.fromarray(im)), label=int(y), id=f"fmnist-{i}")
        for i, (im, y) in enumerate(zip(images, labels, strict=True))
    ]
    classnames = str(root / "fmnist_classes.json")
    with open(classnames, "w") as f:
        json.dump(FMNIST_CLASSES, f)
    corpus = [t for ts in captions.values() for t in ts]
    corpus += [
        t.format(c) for t in templates_lib.load_templates("imagenet80") for c in FMNIST_CLASSES
    ]
    tokenizer = train_sentencepiece(corpus, str(root / "spm"), vocab_size=400)
    return {
        "emoji": _write_shards(root / "emoji", "emoji", emoji, 2),
        "fmnist": _write_shards(root / "fmnist", "fmnist", fmnist, 2),
        "classnames": classnames,
        "tokenizer": tokenizer,
        "captions": captions,
        "fmnist_labels": labels,
        "emoji_records": emoji,
        "fmnist_records": fmnist,
        "root": root,
    }


def _config(data, *, emoji=1.0, fmnist=0.0, templates="imagenet7", **overrides):
    cfg = pipeline.default_config()
    cfg.tokenizer = data["tokenizer"]
    cfg.image_size = SIZE
    cfg.text_length = TEXT_LEN
    cfg.num_threads = 2
    if emoji:
        cfg.sources.emoji = pipeline.source_config(data["emoji"], weight=emoji)
    if fmnist:
        cfg.sources.fmnist = pipeline.source_config(
            data["fmnist"],
            weight=fmnist,
            classnames=data["classnames"],
            use_labels=True,
            prompt_templates=templates,
        )
    cfg.update(overrides)
    return cfg


def _take(cfg, n, *, batch=4, needs=("image", "tokens"), **kw):
    it = pipeline.make_train_iterator(cfg, global_batch_size=batch, needs=set(needs), **kw)
    try:
        return [next(it) for _ in range(n)]
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def _cat(batches, key):
    return np.concatenate([b[key] for b in batches])


# ----------------------------------------------------------------------------------------
# Shapes, determinism, resume


@pytest.mark.parametrize(
    "needs",
    [
        {"image", "tokens"},  # CLIP
        {"view_a", "view_b"},  # SimCLR
        {"image", "tokens", "view_a", "view_b"},  # SLIP
        {"image", "tokens", "label"},  # UniCL
    ],
    ids=["clip", "simclr", "slip", "unicl"],
)
def test_batch_keys_shapes_and_dtypes(data, needs):
    (batch,) = _take(_config(data, fmnist=1.0), 1, batch=8, needs=needs)
    assert set(batch) == needs | {"index", "skipped"}
    for key in {"image", "view_a", "view_b"} & needs:
        assert batch[key].shape == (8, SIZE, SIZE, 3) and batch[key].dtype == np.uint8
        assert batch[key].std() > 10  # real pixels, not a constant fill
    if "tokens" in needs:
        tokens = batch["tokens"]
        assert tokens.shape == (8, TEXT_LEN) and tokens.dtype == np.int32
        last = (tokens != 0).sum(-1) - 1  # EOS right after the text (tokenizer contract)
        assert (tokens[np.arange(8), last] == Tokenizer(data["tokenizer"]).eos_id).all()
    if "label" in needs:
        assert batch["label"].dtype == np.int32 and batch["label"].shape == (8,)
        assert set(batch["label"].tolist()) - {-1} <= set(range(10))
        assert (batch["label"] == -1).any() and (batch["label"] >= 0).any()
    assert batch["index"].dtype == np.int64 and batch["index"].tolist() == list(range(8))
    assert batch["skipped"].dtype == np.int32 and batch["skipped"].sum() == 0


def test_ssl_views_differ_and_clip_crop_is_not_flipped_copy(data):
    (batch,) = _take(_config(data), 1, batch=8, needs={"image", "view_a", "view_b"})
    assert not np.array_equal(batch["view_a"], batch["view_b"])
    assert not np.array_equal(batch["image"], batch["view_a"])


def test_same_batches_for_any_worker_count(data):
    needs = {"image", "tokens", "view_a", "view_b", "label"}
    cfg = _config(data, fmnist=1.0)
    in_process = _take(cfg, 2, needs=needs)
    cfg.num_workers = 2
    workers = _take(cfg, 2, needs=needs)
    for a, b in zip(in_process, workers, strict=True):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    cfg.num_workers, cfg.seed = 0, 1
    other_seed = _take(cfg, 1, needs=needs)[0]
    assert not np.array_equal(other_seed["image"], in_process[0]["image"])


def test_save_restore_mid_epoch_gives_the_next_batch(data, tmp_path):
    cfg = _config(data, fmnist=1.0)
    needs = {"image", "tokens", "label"}
    it = pipeline.make_train_iterator(cfg, global_batch_size=4, needs=needs)
    for _ in range(5):  # 20 of 88 samples: mid-epoch
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it), next(it)]
    fresh = pipeline.make_train_iterator(cfg, global_batch_size=4, needs=needs)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert expected[0]["index"][0] == 20

    # Through orbax, as the trainer's checkpoint does.
    import grain
    import orbax.checkpoint as ocp

    it = pipeline.make_train_iterator(cfg, global_batch_size=4, needs=needs)
    next(it), next(it)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        want = next(it)
        fresh = pipeline.make_train_iterator(cfg, global_batch_size=4, needs=needs)
        mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    got = next(fresh)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_epochs_cover_every_record_and_reshuffle(data):
    batches = _take(_config(data), 20, batch=4, needs={"id_hash"})  # 2 epochs of 40
    ids = _cat(batches, "id_hash")
    first, second = ids[:40], ids[40:]
    assert len(set(first.tolist())) == 40 and set(first.tolist()) == set(second.tolist())
    assert not np.array_equal(first, second)  # reshuffled each epoch


def test_mixture_weights_are_respected(data):
    batches = _take(_config(data, emoji=3.0, fmnist=1.0), 16, batch=8, needs={"label"})
    labelled = (_cat(batches, "label") >= 0).mean()
    assert abs(labelled - 0.25) < 0.05, labelled


def test_process_slices_are_disjoint(data):
    cfg = _config(data)
    per_process = []
    for pi in range(2):
        batches = _take(
            cfg, 5, batch=8, needs={"id_hash"}, process_index=pi, process_count=2
        )  # 5 x 4 local samples = one epoch of this process's 20 records
        ids = _cat(batches, "id_hash")
        assert len(batches[0]["id_hash"]) == 4 and len(set(ids.tolist())) == 20
        per_process.append(set(ids.tolist()))
        index = _cat(batches, "index")
        assert index[:4].tolist() == [4 * pi + j for j in range(4)]  # global positions
    assert not per_process[0] & per_process[1]
    assert len(per_process[0] | per_process[1]) == 40


@pytest.mark.parametrize("captions, drawn", [(0, {0, 1}), (1, {0}), (5, {0, 1})])
def test_captions_are_chosen_at_random_among_a_records_texts(data, captions, drawn):
    # `captions` keeps a record's first texts (0 or more than it has: all of them).
    tok = Tokenizer(data["tokenizer"])
    cfg = _config(data, text_length=32)
    cfg.sources.emoji.captions = captions
    batches = _take(cfg, 20, batch=4, needs={"tokens", "id_hash"})
    by_hash = {zlib.crc32(sid.encode()) & 0x7FFFFFFF: t for sid, t in data["captions"].items()}
    seen_variants = set()
    for b in batches:
        for h, text in zip(b["id_hash"].tolist(), tok.decode(b["tokens"]), strict=True):
            texts = by_hash[h]
            assert text in texts
            seen_variants.add(texts.index(text))
    assert seen_variants == drawn


def test_negative_captions_is_an_error_naming_the_source(data):
    cfg = _config(data)
    cfg.sources.emoji.captions = -1
    with pytest.raises(ValueError, match=r"data\.sources\.emoji\.captions"):
        _take(cfg, 1)


def test_image_label_records_get_prompts(data):
    tok = Tokenizer(data["tokenizer"])
    templates = templates_lib.load_templates("imagenet7")
    batches = _take(_config(data, emoji=0, fmnist=1.0), 6, batch=8, needs={"tokens", "label"})
    used = set()
    for b in batches:
        for label, text in zip(b["label"].tolist(), tok.decode(b["tokens"]), strict=True):
            prompts = templates_lib.prompts_for(FMNIST_CLASSES[label], templates)
            assert text in prompts, (label, text)
            used.add(prompts.index(text))
    assert len(used) >= 4  # templates drawn at random


def test_labels_of_separate_label_spaces_do_not_collide(data, tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps(["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]))
    cfg = _config(data, emoji=0, fmnist=1.0)
    cfg.sources.zz = pipeline.source_config(data["fmnist"], classnames=str(other), use_labels=True)
    labels = _cat(_take(cfg, 4, batch=8, needs={"label"}), "label")
    assert (labels < 10).any() and (labels >= 10).any() and labels.max() < 20


# ----------------------------------------------------------------------------------------
# Bad input


def _example(**features) -> bytes:
    ex = tf_example_pb2.Example()
    for key, value in features.items():
        if isinstance(value, int):
            ex.features.feature[key].int64_list.value.append(value)
        else:
            ex.features.feature[key].bytes_list.value.extend(value)
    return ex.SerializeToString()


BAD = 3  # the bad record's position in its 8-record shard
PER_RECORD = ["crc", "bad_image", "empty_caption", "non_utf8", "label_range", "missing_key"]
SHARD_LEVEL = ["truncated", "missing_index", "stale_index"]


def _bad_source(data, tmp_path, kind):
    """One shard of 8 real records with one kind of damage; returns (cfg, shard path)."""
    labelled = kind == "label_range"
    good = data["fmnist_records" if labelled else "emoji_records"][:8]
    payloads = list(good)
    image = records.decode_example(good[BAD])["image"]
    if kind == "bad_image":
        payloads[BAD] = records.encode_example(image=b"\xff\xd8 not a jpeg", texts=["x"], id="b")
    elif kind == "empty_caption":
        payloads[BAD] = records.encode_example(image=image, texts=["ok", "  "], id="b")
    elif kind == "non_utf8":
        payloads[BAD] = _example(image=[image], texts=[b"caf\xe9"], label=-1, id=[b"b"])
    elif kind == "label_range":
        payloads[BAD] = records.encode_example(image=image, label=10, id="b")
    elif kind == "missing_key":
        payloads[BAD] = _example(image=[image], texts=[b"no label"], id=[b"b"])
    path = str(tmp_path / "bad-00000-of-00001.tfrecord")
    with tfrecord.TFRecordWriter(path) as w:
        for p in payloads:
            w.write(p)
    offsets = tfrecord.read_index(path)
    if kind == "crc":
        with open(path, "r+b") as f:
            f.seek(int(offsets[BAD]) + 12 + 20)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x55]))
    elif kind == "truncated":
        os.truncate(path, os.path.getsize(path) - 7)
    elif kind == "missing_index":
        os.remove(tfrecord.index_path(path))
    elif kind == "stale_index":
        with open(path, "ab") as f:  # the shard grew after its index was written
            f.write(tfrecord.frame(good[0]))
    cfg = pipeline.default_config()
    cfg.tokenizer = data["tokenizer"]
    cfg.image_size, cfg.text_length, cfg.shuffle, cfg.num_threads = SIZE, TEXT_LEN, False, 1
    cfg.sources.bad = pipeline.source_config(
        path, classnames=data["classnames"] if labelled else "", use_labels=labelled
    )
    return cfg, path


@pytest.mark.parametrize("kind", PER_RECORD)
def test_bad_record_is_an_error_naming_shard_and_record(data, tmp_path, kind):
    cfg, path = _bad_source(data, tmp_path, kind)
    offset = int(tfrecord.read_index(path)[BAD])
    with pytest.raises(pipeline.BadInputError) as info:
        _take(cfg, 2, needs={"image", "tokens", "label"})
    message = str(info.value)
    assert path in message and f"byte {offset}" in message and f"record {BAD}" in message


@pytest.mark.parametrize("kind", SHARD_LEVEL)
def test_bad_shard_is_an_error_naming_it(data, tmp_path, kind):
    cfg, path = _bad_source(data, tmp_path, kind)
    with pytest.raises((FileNotFoundError, tfrecord.RecordError), match=path):
        pipeline.build_train_dataset(cfg, global_batch_size=4, needs={"image"})


@pytest.mark.parametrize("kind", PER_RECORD + SHARD_LEVEL)
def test_skip_bad_records_replaces_counts_and_warns(data, tmp_path, kind, caplog):
    cfg, path = _bad_source(data, tmp_path, kind)
    cfg.skip_bad_records = True
    with caplog.at_level(logging.WARNING):
        batches = _take(cfg, 2, needs={"image", "tokens", "label", "id_hash"})  # one epoch
    skipped = int(_cat(batches, "skipped").sum())
    if kind in ("missing_index", "stale_index"):
        # The shard itself is fine: its index is rebuilt by a scan and nothing is lost.
        assert skipped == 0
        assert "rebuilding its index" in caplog.text and path in caplog.text
        assert len(set(_cat(batches, "id_hash").tolist())) == 8
    else:
        assert skipped == 1
        assert "skipping bad record" in caplog.text and path in caplog.text
        assert _cat(batches, "skipped").tolist().index(1) == (7 if kind == "truncated" else BAD)
    for b in batches:
        assert b["image"].shape == (4, SIZE, SIZE, 3)


# ----------------------------------------------------------------------------------------
# Evaluation arrays and templates


def test_build_eval_arrays_reads_all_records_in_order(data):
    tok = Tokenizer(data["tokenizer"])
    arrays = pipeline.build_eval_arrays(
        data["emoji"], image_size=24, tokenizer=tok, text_length=TEXT_LEN, batch_size=16
    )
    assert arrays["image"].shape == (40, 24, 24, 3) and arrays["image"].dtype == np.uint8
    assert arrays["id"] == [f"emoji-{ord(ch):x}" for ch in EMOJI]
    assert (arrays["label"] == -1).all()
    assert tok.decode(arrays["tokens"]) == [data["captions"][i][0] for i in arrays["id"]]
    assert arrays["caption_tokens"].shape == (80, TEXT_LEN)
    assert arrays["caption_image"].tolist() == [i for i in range(40) for _ in range(2)]
    again = pipeline.build_eval_arrays(data["emoji"], image_size=24, limit=5, batch_size=2)
    np.testing.assert_array_equal(again["image"], arrays["image"][:5])  # deterministic

    labelled = pipeline.build_eval_arrays(
        data["fmnist"], image_size=20, classnames=data["classnames"]
    )
    np.testing.assert_array_equal(labelled["label"], data["fmnist_labels"])


def test_eval_bad_record_is_an_error(data, tmp_path):
    _, path = _bad_source(data, tmp_path, "bad_image")
    with pytest.raises(pipeline.BadInputError, match=f"record {BAD}"):
        pipeline.build_eval_arrays(path, image_size=16)


def test_templates():
    t80 = templates_lib.load_templates("imagenet80")
    t7 = templates_lib.load_templates("imagenet7")
    assert len(t80) == 80 == len(set(t80)) and t80[0] == "a bad photo of a {}."
    assert len(t7) == 7 and set(t7) <= set(t80) and "itap of a {}." in t7
    assert templates_lib.load_templates("simple") == ["a photo of a {}."]
    assert templates_lib.prompts_for("cat", ["a {}.", "the {}!"]) == ["a cat.", "the cat!"]
    assert templates_lib.prompts_for(["cat", "kitty"], ["a {}."]) == ["a cat.", "a kitty."]
    with pytest.raises(ValueError, match="unknown"):
        templates_lib.load_templates("nope")
