"""The project's embedded default data set, built in one call from the offline Debian data.

    OUTPUT_DIR/emoji/emoji-{train,test}-00000-of-00001.tfrecord (+ .idx, stats, classnames,
                                     groups, bad_files): every text of each emoji (CLDR name
                                     first, templates, each keyword, the keyword list)
    OUTPUT_DIR/fashion_mnist/fashion_mnist-train-0000K-of-00006.tfrecord, ...-test-...-of-00001
    OUTPUT_DIR/openclipart/openclipart-{train,test}-00000-of-00001.tfrecord (+ the same side
                                     files): OpenClipArt PNGs on white, 128 px squares, with
                                     their SVG captions, split by title
    OUTPUT_DIR/tokenizer/spm.model     sentencepiece on the emoji and OpenClipArt train captions
                                       + the fashion classes
    OUTPUT_DIR/emoji_styles/{emojione,symbola}-test-00000-of-00001.tfrecord (+ the emoji side
                                     files): the held-out emoji (emoji's test split, labels
                                     and texts) in other art styles, for evaluation; and
                                     emojione-train-*: the training emoji in EmojiOne's art,
                                     for recipes that train on two fonts (`emojione=W`)
    OUTPUT_DIR/manifest.json           what was built, from which inputs, with which counts

OpenClipArt (Debian openclipart-png, openclipart-svg) is optional: when it is not installed,
or disabled (`openclipart=False`, `--no_openclipart`), the build says so loudly and records
{"skipped": reason} as its manifest part, so machines without it still build the rest.
The emoji art styles (Debian ruby-gemojione, fonts-symbola) are optional the same way, per
style (`with_emoji_styles=False` leaves both out); their part records per style how many
held-out emoji it covers and why the others were skipped.

Each part records a key (hashes of its input files, of the code that builds it, and of its
parameters) in the manifest; a part whose key is unchanged and whose outputs are all still
there with the recorded sizes is not rebuilt, so a second run takes well under a second.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from input_pipeline.sources import emoji, emoji_styles, fashion_mnist, openclipart, shard_writer

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
TOKENIZER_VOCAB_SIZE = 4000
_PIPELINE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CODE = {
    "emoji": ["sources/emoji.py", "sources/shard_writer.py", "records.py", "tfrecord.py"],
    "fashion_mnist": [
        "sources/fashion_mnist.py",
        "sources/shard_writer.py",
        "records.py",
        "tfrecord.py",
    ],
    "openclipart": [
        "sources/openclipart.py",
        "sources/shard_writer.py",
        "records.py",
        "tfrecord.py",
    ],
    "tokenizer": ["tokenizers/spm.py", "sources/embedded.py"],
    "emoji_styles": [
        "sources/emoji_styles.py",
        "sources/emoji.py",
        "sources/shard_writer.py",
        "records.py",
        "tfrecord.py",
    ],
}
OPENCLIPART_PARAMS = {
    "test_fraction": 0.2,
    "image_size": 128,
    "format": "jpeg",
    "drop_categories": sorted(openclipart.DROP_CATEGORIES),
    "max_pixels": openclipart.MAX_PIXELS,
}
EMOJI_STYLES_PARAMS = {
    "test_fraction": 0.2,
    "image_size": 128,
    "format": "jpeg",
    "symbola_size": emoji_styles.SYMBOLA_SIZE,
    "train_styles": list(emoji_styles.TRAIN_STYLES),
}
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_hash(path: str) -> str:
    """sha256 of a file's bytes (cached per path, size and mtime within one process)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def _key(
    inputs: Sequence[str], code: Sequence[str], params: dict, relative_to: str | None = None
) -> tuple[str, dict]:
    """(key, {input: sha256}) for a part; `relative_to` names inputs relative to a directory
    (outputs of an earlier part), so moving the output directory does not change the key."""
    name = (lambda p: os.path.relpath(p, relative_to)) if relative_to else (lambda p: p)
    hashes = {name(p): file_hash(p) for p in inputs}
    hashes |= {f"code:{c}": file_hash(os.path.join(_PIPELINE_DIR, c)) for c in code}
    blob = json.dumps({"inputs": hashes, "params": params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest(), hashes


def _outputs_intact(output_dir: str, entry: dict) -> bool:
    for rel, size in entry.get("files", {}).items():
        path = os.path.join(output_dir, rel)
        if not os.path.exists(path) or os.path.getsize(path) != size:
            return False
    return bool(entry.get("files"))


def _file_sizes(output_dir: str, paths: Sequence[str]) -> dict[str, int]:
    return {os.path.relpath(p, output_dir): os.path.getsize(p) for p in sorted(paths)}


def _shard_entry(output_dir: str, summary: shard_writer.Summary, key: str, hashes: dict) -> dict:
    prefix = summary.prefix
    files = [p for s in summary.splits.values() for p in s.shards]
    files += [p + ".idx" for p in files]
    files += glob.glob(prefix + "-*.json") + [summary.bad_files_path]
    rel_prefix = os.path.relpath(prefix, output_dir)
    return {
        "key": key,
        "inputs": hashes,
        "prefix": rel_prefix,
        "splits": {
            split: {
                "pattern": f"{rel_prefix}-{split}-*-of-*.tfrecord",
                "num_records": s.num_records,
                "num_shards": len(s.shards),
                "num_bad": s.num_bad,
            }
            for split, s in summary.splits.items()
        },
        "classnames": os.path.relpath(summary.classnames_path, output_dir)
        if summary.classnames_path
        else None,
        "num_classes": len(_read_json(summary.classnames_path))
        if summary.classnames_path
        else None,
        "files": _file_sizes(output_dir, files),
    }


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _split_texts(output_dir: str, entry: dict, split: str) -> list[tuple[str, ...]]:
    """The texts of every record of one split of a built part, in file order."""
    from input_pipeline.records import decode_example
    from input_pipeline.tfrecord import TFRecordSource

    if not entry["splits"][split]["num_records"]:
        return []
    pattern = os.path.join(output_dir, entry["splits"][split]["pattern"])
    source = TFRecordSource(pattern)
    where = f"{pattern}[{{}}]"
    return [
        tuple(decode_example(source[i], where=where.format(i))["texts"]) for i in range(len(source))
    ]


def _texts_per_record(output_dir: str, entry: dict) -> dict[str, float]:
    """Mean number of texts per record, per split (what the caption sampler draws from)."""
    out = {}
    for split in entry["splits"]:
        texts = _split_texts(output_dir, entry, split)
        out[split] = round(sum(map(len, texts)) / len(texts), 3) if texts else 0.0
    return out


def listing_hash(directory: str) -> str:
    """sha256 over (relative path, size, mtime) of every file under `directory`: a cheap key
    for a package-managed tree too large to hash byte by byte at every run."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            rel = os.path.relpath(os.path.join(root, name), directory)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _openclipart_missing(png_dir: str, svg_dir: str) -> str | None:
    """Why OpenClipArt cannot be built here (with the command that fixes it), or None."""
    missing = [
        (d, pkg)
        for d, pkg in ((png_dir, "openclipart-png"), (svg_dir, "openclipart-svg"))
        if not os.path.isdir(d)
    ]
    if not missing:
        return None
    dirs = ", ".join(d for d, _ in missing)
    pkgs = " ".join(p for _, p in missing)
    return (
        f"{dirs} not found; install with: "
        f"sudo apt-get install --no-install-recommends {pkgs} (or run tools/install.sh)"
    )


def _emoji_styles_part(
    output_dir: str,
    old_entry: dict | None,
    *,
    limit: int | None,
    enabled: bool,
    paths: dict[str, str] | None,
    workers: int | None,
    progress: bool,
    log,
) -> dict:
    """The emoji_styles manifest part: per style a shard entry with its `coverage`, or
    {"skipped": reason} (logged loudly) when its package is missing; {"skipped": reason} for
    the whole part when disabled. Kept as it is when its key and outputs are unchanged."""
    if not enabled:
        reason = "disabled (with_emoji_styles=False)"
        log(f"emoji_styles: WARNING: SKIPPED, no emoji art-style evaluation shards: {reason}")
        return {"skipped": reason}
    paths = {
        "emojione": emoji_styles.EMOJIONE_DIR,
        "symbola": emoji_styles.SYMBOLA_FONT,
        **(paths or {}),
    }
    missing = {s: emoji_styles.missing_reason(s, paths[s]) for s in emoji_styles.STYLES}
    for style, reason in missing.items():
        if reason:
            log(f"emoji_styles/{style}: WARNING: SKIPPED, no {style} evaluation shards: {reason}")
    built = [s for s in emoji_styles.STYLES if not missing[s]]
    inputs = [emoji.EMOJI_TEST, *emoji.ANNOTATIONS]
    if "symbola" in built:
        inputs.append(paths["symbola"])
    params = {"limit": limit, **EMOJI_STYLES_PARAMS, "styles": {s: paths[s] for s in built}}
    key, hashes = _key(inputs, _CODE["emoji_styles"], params)
    if "emojione" in built:
        hashes["listing:emojione"] = listing_hash(paths["emojione"])
        key = hashlib.sha256(json.dumps([key, hashes], sort_keys=True).encode()).hexdigest()
    if (
        old_entry
        and old_entry.get("key") == key
        and built
        and _outputs_intact(output_dir, old_entry)
    ):
        log("emoji_styles: up to date, skipped")
        return old_entry
    styles: dict[str, dict] = {}
    for style in emoji_styles.STYLES:
        if missing[style]:
            styles[style] = {"skipped": missing[style]}
            continue
        try:
            summary, counts = emoji_styles.write_style(
                style,
                output_dir,
                workers=workers,
                progress=progress,
                log=log,
                limit=limit,
                test_fraction=EMOJI_STYLES_PARAMS["test_fraction"],
                image_size=EMOJI_STYLES_PARAMS["image_size"],
                splits=("test", "train")
                if style in EMOJI_STYLES_PARAMS["train_styles"]
                else ("test",),
                **{"emojione_dir" if style == "emojione" else "symbola_font": paths[style]},
            )
        except shard_writer.NoRecordsError as e:  # e.g. an emoji_limit with no test emoji
            log(f"emoji_styles/{style}: WARNING: SKIPPED, no records: {e}")
            styles[style] = {"skipped": f"no records: {e}"}
            continue
        entry = _shard_entry(output_dir, summary, key, hashes)
        del entry["key"], entry["inputs"]
        entry["coverage"] = counts
        styles[style] = entry
    if not built:
        return {"skipped": "; ".join(r for r in missing.values() if r), "styles": styles}
    files = {k: v for s in styles.values() for k, v in s.get("files", {}).items()}
    return {"key": key, "inputs": hashes, "styles": styles, "files": files}


def build_embedded(
    output_dir: str = "data",
    *,
    fashion_limit: int | None = None,
    emoji_limit: int | None = None,
    openclipart_limit: int | None = None,
    with_openclipart: bool = True,
    openclipart_dirs: tuple[str, str] = (openclipart.PNG_DIR, openclipart.SVG_DIR),
    with_emoji_styles: bool = True,
    emoji_styles_paths: dict[str, str] | None = None,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Builds (or keeps, when up to date) every part of the embedded default; returns the
    manifest, which is also written to OUTPUT_DIR/manifest.json.

    The *_limit arguments build a subset (tests); `with_openclipart=False` or a missing
    OpenClipArt install (`openclipart_dirs`: PNG and SVG roots) skips that part loudly; so
    do `with_emoji_styles=False` or a missing style (`emoji_styles_paths`: style -> the
    EmojiOne PNG directory or the Symbola .ttf), the latter per style.
    """
    start = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    manifest_path = os.path.join(output_dir, MANIFEST)
    old: dict = {}
    if os.path.exists(manifest_path) and not force:
        with open(manifest_path) as f:
            old = json.load(f)
        if old.get("version") != MANIFEST_VERSION:
            old = {}
    parts: dict[str, Any] = {}

    def up_to_date(name: str, key: str) -> bool:
        entry = old.get("parts", {}).get(name)
        if entry and entry.get("key") == key and _outputs_intact(output_dir, entry):
            parts[name] = entry
            log(f"{name}: up to date, skipped")
            return True
        return False

    # Emoji image-text pairs.
    params = {"limit": emoji_limit, "test_fraction": 0.2, "image_size": 128, "format": "jpeg"}
    inputs = [emoji.EMOJI_TEST, *emoji.ANNOTATIONS, emoji.FONT]
    key, hashes = _key(inputs, _CODE["emoji"], params)
    if not up_to_date("emoji", key):
        plan = emoji.plan(limit=emoji_limit, test_fraction=0.2, image_size=128)
        summary = shard_writer.write_plan(
            plan,
            os.path.join(output_dir, "emoji", "emoji"),
            num_shards=1,
            workers=workers,
            progress=progress,
        )
        log(summary.line())
        parts["emoji"] = _shard_entry(output_dir, summary, key, hashes)
        parts["emoji"]["texts_per_record"] = _texts_per_record(output_dir, parts["emoji"])
        log(f"emoji: texts per record {parts['emoji']['texts_per_record']}")

    # Fashion-MNIST image-label data.
    params = {"limit": fashion_limit, "format": "png"}
    inputs = sorted(
        os.path.join(fashion_mnist.DATA_DIR, f + ".gz")
        for pair in fashion_mnist.FILES.values()
        for f in pair
    )
    key, hashes = _key(inputs, _CODE["fashion_mnist"], params)
    if not up_to_date("fashion_mnist", key):
        plan = fashion_mnist.plan(limit=fashion_limit)
        summary = shard_writer.write_plan(
            plan,
            os.path.join(output_dir, "fashion_mnist", "fashion_mnist"),
            workers=workers,
            progress=progress,
        )
        log(summary.line())
        parts["fashion_mnist"] = _shard_entry(output_dir, summary, key, hashes)

    # OpenClipArt image-text pairs (optional: a logged skip when absent or disabled).
    png_dir, svg_dir = openclipart_dirs
    reason = (
        "disabled (with_openclipart=False, --no_openclipart)"
        if not with_openclipart
        else _openclipart_missing(png_dir, svg_dir)
    )
    if reason:
        log(f"openclipart: WARNING: SKIPPED, the embedded data has no OpenClipArt: {reason}")
        parts["openclipart"] = {"skipped": reason}
    else:
        params = {"limit": openclipart_limit, **OPENCLIPART_PARAMS}
        key, hashes = _key([], _CODE["openclipart"], params)
        hashes |= {"listing:png": listing_hash(png_dir), "listing:svg": listing_hash(svg_dir)}
        key = hashlib.sha256(json.dumps([key, hashes], sort_keys=True).encode()).hexdigest()
        if not up_to_date("openclipart", key):
            plan = openclipart.plan(
                png_dir=png_dir,
                svg_dir=svg_dir,
                limit=openclipart_limit,
                drop_categories=OPENCLIPART_PARAMS["drop_categories"],
                max_pixels=OPENCLIPART_PARAMS["max_pixels"],
                test_fraction=OPENCLIPART_PARAMS["test_fraction"],
                image_size=OPENCLIPART_PARAMS["image_size"],
            )
            summary = shard_writer.write_plan(
                plan,
                os.path.join(output_dir, "openclipart", "openclipart"),
                num_shards=1,
                workers=workers,
                progress=progress,
            )
            log(summary.line())
            entry = _shard_entry(output_dir, summary, key, hashes)
            entry["texts_per_record"] = _texts_per_record(output_dir, entry)
            log(f"openclipart: texts per record {entry['texts_per_record']}")
            parts["openclipart"] = entry

    # Tokenizer on the emoji (+ OpenClipArt) train captions and the Fashion-MNIST classes.
    caption_parts = [n for n in ("emoji", "openclipart") if "files" in parts.get(n, {})]
    train_files = sorted(
        os.path.join(output_dir, rel)
        for name in caption_parts
        for rel in parts[name]["files"]
        if "-train-" in rel and rel.endswith(".tfrecord")
    )
    params = {"vocab_size": TOKENIZER_VOCAB_SIZE, "classes": fashion_mnist.CLASSNAMES}
    key, hashes = _key(train_files, _CODE["tokenizer"], params, relative_to=output_dir)
    if not up_to_date("tokenizer", key):
        from input_pipeline.tokenizers.spm import Tokenizer, train_sentencepiece

        texts = [
            t
            for name in caption_parts
            for r in _split_texts(output_dir, parts[name], "train")
            for t in r
        ]
        texts += list(fashion_mnist.CLASSNAMES)
        model = train_sentencepiece(
            texts, os.path.join(output_dir, "tokenizer", "spm"), TOKENIZER_VOCAB_SIZE
        )
        vocab = Tokenizer(model).vocab_size
        log(f"tokenizer: {model}, vocab_size={vocab}, trained on {len(texts)} texts")
        parts["tokenizer"] = {
            "key": key,
            "inputs": hashes,
            "model": os.path.relpath(model, output_dir),
            "vocab_size": vocab,
            "num_texts": len(texts),
            "files": _file_sizes(output_dir, [model]),
        }

    # The held-out emoji in other art styles (evaluation only; optional, per style).
    parts["emoji_styles"] = _emoji_styles_part(
        output_dir,
        old.get("parts", {}).get("emoji_styles"),
        limit=emoji_limit,
        enabled=with_emoji_styles,
        paths=emoji_styles_paths,
        workers=workers,
        progress=progress,
        log=log,
    )

    manifest = {
        "version": MANIFEST_VERSION,
        "description": "mmssl_jax embedded default: emoji and OpenClipArt image-text pairs, "
        "Fashion-MNIST image-label data, a sentencepiece tokenizer and the held-out emoji in "
        "other art styles (tools/make_shards.py embedded)",
        "parts": parts,
        "elapsed_s": round(time.perf_counter() - start, 2),
    }
    if manifest["parts"] != old.get("parts"):
        shard_writer.write_json(manifest_path, manifest)
    return manifest
