"""The project's embedded default data set, built in one call from the offline Debian data.

    OUTPUT_DIR/emoji/emoji-{train,test}-00000-of-00001.tfrecord (+ .idx, stats, classnames,
                                                                 groups, bad_files)
    OUTPUT_DIR/fashion_mnist/fashion_mnist-train-0000K-of-00006.tfrecord, ...-test-...-of-00001
    OUTPUT_DIR/tokenizer/spm.model     sentencepiece on emoji train captions + fashion classes
    OUTPUT_DIR/manifest.json           what was built, from which inputs, with which counts

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

from input_pipeline.sources import emoji, fashion_mnist, shard_writer

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
    "tokenizer": ["tokenizers/spm.py", "sources/embedded.py"],
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


def _emoji_train_captions(output_dir: str, entry: dict) -> list[str]:
    from input_pipeline.records import decode_example
    from input_pipeline.tfrecord import TFRecordSource

    source = TFRecordSource(os.path.join(output_dir, entry["splits"]["train"]["pattern"]))
    return [t for i in range(len(source)) for t in decode_example(source[i])["texts"]]


def build_embedded(
    output_dir: str = "data",
    *,
    fashion_limit: int | None = None,
    emoji_limit: int | None = None,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Builds (or keeps, when up to date) every part of the embedded default; returns the
    manifest, which is also written to OUTPUT_DIR/manifest.json."""
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

    # Tokenizer on the emoji train captions and the Fashion-MNIST class names.
    train_files = sorted(
        os.path.join(output_dir, rel)
        for rel in parts["emoji"]["files"]
        if "-train-" in rel and rel.endswith(".tfrecord")
    )
    params = {"vocab_size": TOKENIZER_VOCAB_SIZE, "classes": fashion_mnist.CLASSNAMES}
    key, hashes = _key(train_files, _CODE["tokenizer"], params, relative_to=output_dir)
    if not up_to_date("tokenizer", key):
        from input_pipeline.tokenizers.spm import Tokenizer, train_sentencepiece

        texts = _emoji_train_captions(output_dir, parts["emoji"])
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

    manifest = {
        "version": MANIFEST_VERSION,
        "description": "mmssl_jax embedded default: emoji image-text pairs, Fashion-MNIST "
        "image-label data and a sentencepiece tokenizer (tools/make_shards.py embedded)",
        "parts": parts,
        "elapsed_s": round(time.perf_counter() - start, 2),
    }
    if manifest["parts"] != old.get("parts"):
        shard_writer.write_json(manifest_path, manifest)
    return manifest
