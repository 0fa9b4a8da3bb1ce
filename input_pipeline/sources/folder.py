"""Images in a directory, with captions and labels from a JSONL or CSV file.

Captions file (paths relative to the images directory, or absolute):
- JSONL: one object per line, {"path": ..., "caption": str or [str, ...], "label": ...}
- CSV: a header row `path,caption[,label]`, one caption per row.
Several rows naming the same path merge into one record with all their captions (COCO-style
"five captions per image" files work as they are). `label` is optional: integers are used as
they are; strings are class names, mapped to indices in sorted order (PREFIX-classnames.json).
Without a captions file, every image under the directory is used, labelled by its top-level
subdirectory (ImageFolder style; images directly in the directory get no label).

Rows that cannot be parsed, and image files that are missing or do not decode, are reported
as bad with the line or path that caused them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterator

from input_pipeline.sources.shard_writer import (
    Bad,
    BadImageError,
    ImageOptions,
    Plan,
    Record,
    encode_image,
    open_image,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Row:
    where: str  # "captions.jsonl:12"
    path: str
    captions: tuple[str, ...]
    label: object = None  # int, str or None


@dataclasses.dataclass(frozen=True)
class Task:
    id: str
    path: str
    texts: tuple[str, ...]
    label: int
    max_pixels: int | None


def process(task: Task, options: ImageOptions) -> Record | Bad:
    try:
        img = open_image(
            task.path,
            max_pixels=task.max_pixels,
            max_short_side=options.max_short_side,
            max_side=options.max_side,
        )
    except BadImageError as e:
        return Bad(task.path, str(e))
    return Record(task.id, encode_image(img, options), task.texts, task.label)


def _caption_list(value: object) -> tuple[str, ...] | None:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(v for v in value if v.strip())
    return None


def read_jsonl(path: str) -> Iterator[Row | Bad]:
    """Rows of a JSONL captions file; a bad line becomes a Bad naming file:line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            where = f"{path}:{n}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield Bad(where, f"not valid JSON ({e})")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("path"), str):
                yield Bad(where, 'needs an object with a string "path"')
                continue
            caps = _caption_list(obj.get("caption"))
            if caps is None:
                yield Bad(where, '"caption" must be a string or a list of strings')
                continue
            label = obj.get("label")
            if label is not None and (isinstance(label, bool) or not isinstance(label, int | str)):
                yield Bad(where, '"label" must be an integer or a string')
                continue
            yield Row(where, obj["path"], caps, label)


def read_csv(path: str) -> Iterator[Row | Bad]:
    """Rows of a CSV captions file with header path,caption[,label]."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if "path" not in fields or "caption" not in fields:
            raise ValueError(f"{path}: the CSV header must name path,caption[,label]; got {fields}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row.get("path"):
                yield Bad(where, "empty path")
                continue
            label = row.get("label")
            caps = _caption_list(row.get("caption"))
            yield Row(where, row["path"], caps or (), label if label not in (None, "") else None)


def read_captions(path: str) -> Iterator[Row | Bad]:
    """JSONL or CSV by extension (.csv is CSV, anything else JSON lines)."""
    return read_csv(path) if path.lower().endswith(".csv") else read_jsonl(path)


def scan_directory(images_dir: str) -> list[Row]:
    """Every image file under images_dir (sorted), labelled by its top-level subdirectory."""
    rows = []
    for root, dirs, files in os.walk(images_dir):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                rel = os.path.relpath(os.path.join(root, name), images_dir)
                label = rel.split(os.sep, 1)[0] if os.sep in rel else None
                rows.append(Row(rel, rel, (), label))
    return rows


def _label_map(labels: list[object]) -> tuple[dict[object, int], list[str] | None]:
    """Integers (or CSV strings that all parse as integers) map to themselves, without class
    names; otherwise every label is a class name and indices follow sorted order."""
    present = [v for v in labels if v is not None]
    if not present:
        return {}, None
    ints = all(isinstance(v, int) for v in present) or all(
        isinstance(v, str) and v.strip().lstrip("-").isdigit() for v in present
    )
    if ints:
        return {v: int(v) for v in present}, None
    names = sorted({str(v) for v in present})
    index = {n: i for i, n in enumerate(names)}
    return {v: index[str(v)] for v in present}, names


def plan(
    *,
    images_dir: str,
    captions: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    max_pixels: int | None = 89_478_485,
) -> Plan:
    """Tasks for one split (or none) of the images listed in `captions` (or found on disk)."""
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"--images_dir {images_dir}: not a directory")
    items = list(read_captions(captions)) if captions else list(scan_directory(images_dir))
    merged: dict[str, Row] = {}
    tasks_or_bad: list[Row | Bad] = []
    for item in items:
        if isinstance(item, Bad):
            tasks_or_bad.append(item)
            continue
        key = os.path.normpath(item.path)
        first = merged.get(key)
        if first is None:
            merged[key] = item
            tasks_or_bad.append(item)
        elif item.label is not None and first.label is not None and item.label != first.label:
            reason = f"label {item.label!r} conflicts with {first.label!r} at {first.where}"
            tasks_or_bad.append(Bad(item.where, reason))
        else:
            merged[key] = dataclasses.replace(
                first,
                captions=tuple(dict.fromkeys(first.captions + item.captions)),
                label=first.label if first.label is not None else item.label,
            )
    label_index, classnames = _label_map([r.label for r in merged.values()])
    tasks: list[Task | Bad] = []
    for item in tasks_or_bad:
        if limit and len(tasks) >= limit:
            break
        if isinstance(item, Bad):
            tasks.append(item)
            continue
        row = merged[os.path.normpath(item.path)]
        path = row.path if os.path.isabs(row.path) else os.path.join(images_dir, row.path)
        label = label_index[row.label] if row.label is not None else -1
        if label < -1:
            tasks.append(Bad(row.where, f"label {label} is negative"))
            continue
        tasks.append(Task(row.path, path, row.captions, label, max_pixels))
    return Plan(
        name="folder",
        splits={split: tasks},
        process=process,
        classnames=classnames,
        default_format="jpeg",
    )
