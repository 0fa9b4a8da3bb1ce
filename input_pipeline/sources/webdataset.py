"""WebDataset tar shards as open_clip trains on (img2dataset's output format).

A sample is every tar member sharing a key (the member path up to the first dot of its base
name): `000123.jpg|jpeg|png|webp` is the image, `000123.txt` the caption, and optionally
`000123.json` (its `caption` field, or the one named by `json_caption_key`, adds captions)
and `000123.cls` (an integer class label). Other extensions are ignored. Shards are given as
paths, globs or open_clip's brace ranges (`shards-{00000..00031}.tar`), several joined by
`::`.

Uncompressed tars are scanned once for headers and captions; workers read each image by its
byte offset, so a large shard set never sits in memory. Compressed tars (.tar.gz, ...) have
no offsets: their images travel with the task.

Bad samples are listed with `tar:key`: no image, no caption and no label, an image that
does not decode or is cut short, a label that is not an integer, a key seen before. A tar
that cannot be read (to the end) is listed too, with the samples read before the error kept.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import tarfile
from collections.abc import Sequence

from input_pipeline.sources.shard_writer import (
    Bad,
    BadImageError,
    ImageOptions,
    Plan,
    Record,
    encode_image,
    open_image,
)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("txt", "json", "cls")


@dataclasses.dataclass(frozen=True)
class Task:
    id: str
    tar: str
    member: str
    offset: int  # byte offset of the image data in an uncompressed tar; -1: `data` holds it
    size: int
    data: bytes | None
    texts: tuple[str, ...]
    label: int
    max_pixels: int | None


def process(task: Task, options: ImageOptions) -> Record | Bad:
    where = f"{task.tar}:{task.member}"
    data = task.data
    if data is None:
        with open(task.tar, "rb") as f:
            f.seek(task.offset)
            data = f.read(task.size)
        if len(data) < task.size:
            return Bad(where, f"image cut short: {len(data)} of {task.size} bytes in the tar")
    try:
        img = open_image(
            data,
            max_pixels=task.max_pixels,
            max_short_side=options.max_short_side,
            max_side=options.max_side,
        )
    except BadImageError as e:
        # Pillow names an in-memory file by its repr (an address): name the member instead.
        return Bad(where, re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", task.member, str(e)))
    return Record(task.id, encode_image(img, options), task.texts, task.label)


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept); `{x,y}`
    lists too; several groups multiply out (as open_clip's braceexpand)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [x for item in items for x in expand_braces(head + item + tail)]


def expand_shards(specs: Sequence[str]) -> list[str]:
    """Every tar named by `specs` (paths, globs, brace ranges, `::`-joined), in order; a
    spec that names no existing file is an error, not an empty set."""
    out: list[str] = []
    for spec in specs:
        for part in filter(None, spec.split("::")):
            for pattern in expand_braces(part):
                matched = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
                matched = [p for p in matched if os.path.isfile(p)]
                if not matched:
                    raise FileNotFoundError(f"no tar file matches {pattern!r}")
                out += matched
    return list(dict.fromkeys(out))


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's convention: key = path up to the first dot of the base name."""
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(directory, stem) if directory else stem), ext.lower() if dot else ""


def _open_tar(path: str) -> tuple[tarfile.TarFile, bool]:
    """(tar, seekable): plain tars open with offsets; compressed ones stream their bytes."""
    try:
        return tarfile.open(path, "r:"), True
    except tarfile.ReadError:
        return tarfile.open(path, "r:*"), False


def _has_trailing_data(path: str, offset: int) -> bool:
    """Non-zero bytes after the last header tarfile could read (a tar ends in zero blocks)."""
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 20):
            if chunk.strip(b"\0"):
                return True
    return False


def _caption_list(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def scan_tar(path: str, json_caption_key: str | None, max_pixels: int | None) -> list[Task | Bad]:
    """One task per sample of the tar (in first-member order), or a Bad saying why not."""
    parts: dict[str, dict[str, object]] = {}
    bad_tar: Bad | None = None
    try:
        tar, seekable = _open_tar(path)
    except (tarfile.TarError, OSError) as e:
        return [Bad(path, f"cannot open the tar ({e})")]
    with tar:
        count = 0
        try:
            for member in tar:
                if not member.isfile():
                    continue
                count += 1
                key, ext = split_key(member.name)
                sample = parts.setdefault(key, {})
                if ext in IMAGE_EXTENSIONS and "image" not in sample:
                    sample["image"] = member.name
                    if seekable:
                        sample["offset"], sample["size"] = member.offset_data, member.size
                    else:
                        sample["data"] = tar.extractfile(member).read()
                elif ext in TEXT_EXTENSIONS:
                    sample[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            bad_tar = Bad(path, f"cannot read the tar after {count} members ({e})")
        if bad_tar is None and seekable and _has_trailing_data(path, tar.offset):
            # tarfile ends quietly at a header cut short: what follows is lost, so say so.
            reason = f"damaged or truncated after {count} members (offset {tar.offset})"
            bad_tar = Bad(path, reason)
    out: list[Task | Bad] = []
    for key, sample in parts.items():
        where = f"{path}:{key}"
        if "image" not in sample:
            out.append(Bad(where, f"no image (has: {', '.join(sorted(sample)) or 'nothing'})"))
            continue
        texts: list[str] = []
        try:
            if "txt" in sample:
                texts.append(sample["txt"].decode("utf-8"))
            if "json" in sample and json_caption_key:
                meta = json.loads(sample["json"].decode("utf-8"))
                if isinstance(meta, dict):
                    texts += _caption_list(meta.get(json_caption_key))
            label = -1
            if "cls" in sample:
                label = int(sample["cls"].decode("utf-8").strip())
        except UnicodeDecodeError:
            out.append(Bad(where, "caption, json or cls is not UTF-8"))
            continue
        except json.JSONDecodeError as e:
            out.append(Bad(where, f"json is not valid JSON ({e})"))
            continue
        except ValueError:
            out.append(Bad(where, f"cls {sample['cls'][:40]!r} is not an integer"))
            continue
        texts = list(dict.fromkeys(" ".join(t.split()) for t in texts if t.strip()))
        if not texts and label < 0:
            out.append(Bad(where, "no caption and no label"))
            continue
        out.append(
            Task(
                id=key,
                tar=path,
                member=str(sample["image"]),
                offset=int(sample.get("offset", -1)),
                size=int(sample.get("size", 0)),
                data=sample.get("data"),
                texts=tuple(texts),
                label=label,
                max_pixels=max_pixels,
            )
        )
    if bad_tar is not None:
        out.append(bad_tar)
    return out


def plan(
    *,
    shards: Sequence[str],
    split: str | None = None,
    json_caption_key: str | None = "caption",
    classnames: str | None = None,
    limit: int | None = None,
    max_pixels: int | None = 89_478_485,
) -> Plan:
    """Tasks for every sample of every tar in `shards`; ids are the WebDataset keys.

    classnames: optional JSON list of class names for `.cls` labels (written beside the
    shards, and labels are checked against it).
    """
    names = None
    if classnames:
        with open(classnames, encoding="utf-8") as f:
            names = json.load(f)
        if not isinstance(names, list) or not names:
            raise ValueError(f"{classnames}: expected a non-empty JSON list of class names")
    seen: dict[str, str] = {}
    tasks: list[Task | Bad] = []
    num_tasks = 0
    for tar in expand_shards(shards):
        for item in scan_tar(tar, json_caption_key, max_pixels):
            if isinstance(item, Task):
                if item.id in seen:
                    item = Bad(f"{tar}:{item.id}", f"duplicate key (first in {seen[item.id]})")
                else:
                    seen[item.id] = tar
            if isinstance(item, Task):
                if limit and num_tasks >= limit:
                    continue
                num_tasks += 1
            tasks.append(item)
        if limit and num_tasks >= limit:
            break
    return Plan(
        name="webdataset",
        splits={split: tasks},
        process=process,
        classnames=names,
        default_format="jpeg",
    )
