"""COCO Captions: `annotations/captions_<split>.json` + the image folder.

One record per image with ALL its captions in `texts` (COCO has five per image; the
pipeline draws one per step, retrieval evaluation uses them all). The split name comes from
the file name (`captions_val2017.json` -> `val2017`). Images are looked up in
`images_dir/<split>/<file_name>` when that folder exists (the COCO layout, so one
`--images_dir` serves several annotation files), else `images_dir/<file_name>`.

Bad inputs are listed with where they came from (`FILE:images[n]` or `FILE:annotations[n]`,
with the image path in the reason): an image without captions, a caption whose image_id
names no image, an empty caption, an image file that is missing or does not decode.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

from input_pipeline.sources.csv_source import Task, process
from input_pipeline.sources.shard_writer import Bad, Plan


def split_name(annotations: str) -> str:
    """`captions_train2017.json` -> `train2017`; other names -> the file stem."""
    stem = os.path.splitext(os.path.basename(annotations))[0]
    m = re.fullmatch(r"captions_(.+)", stem)
    return m.group(1) if m else stem


def read_annotations(path: str) -> tuple[list[dict], list[dict]]:
    """(images, annotations) of a COCO captions file; a clear error when it is not one."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not {"images", "annotations"} <= set(data):
        raise ValueError(f"{path}: a COCO captions file needs 'images' and 'annotations' lists")
    return list(data["images"]), list(data["annotations"])


def _id_order(item: tuple[object, str]) -> tuple:
    """Annotation ids in numeric order (strings after numbers)."""
    ann_id = item[0]
    return (0, ann_id, "") if isinstance(ann_id, int) else (1, 0, str(ann_id))


def split_tasks(
    annotations: str, images_dir: str, max_pixels: int | None, limit: int | None
) -> list[Task | Bad]:
    """One task per image of `annotations` (captions in annotation-id order)."""
    images, anns = read_annotations(annotations)
    split = split_name(annotations)
    folder = os.path.join(images_dir, split)
    folder = folder if os.path.isdir(folder) else images_dir
    captions: dict[object, list[tuple[object, str]]] = defaultdict(list)
    known = {img.get("id") for img in images if isinstance(img, dict)}
    out: list[Task | Bad] = []
    for n, ann in enumerate(anns):
        where = f"{annotations}:annotations[{n}]"
        if not isinstance(ann, dict) or "image_id" not in ann:
            out.append(Bad(where, "annotation without image_id"))
        elif ann["image_id"] not in known:
            out.append(Bad(where, f"image_id {ann['image_id']!r} names no image"))
        elif not isinstance(ann.get("caption"), str) or not ann["caption"].strip():
            out.append(Bad(where, "empty or missing caption"))
        else:
            captions[ann["image_id"]].append((ann.get("id", n), " ".join(ann["caption"].split())))
    num_tasks = 0
    for n, img in enumerate(images):
        if limit and num_tasks >= limit:
            break
        where = f"{annotations}:images[{n}]"
        if not isinstance(img, dict) or not isinstance(img.get("file_name"), str):
            out.append(Bad(where, "image entry without file_name"))
            continue
        caps = [c for _, c in sorted(captions.get(img.get("id"), []), key=_id_order)]
        path = os.path.join(folder, img["file_name"])
        if not caps:
            out.append(Bad(where, f"{path}: image has no captions"))
            continue
        out.append(Task(img["file_name"], path, tuple(dict.fromkeys(caps)), max_pixels, where))
        num_tasks += 1
    return out


def plan(
    *,
    annotations: list[str],
    images_dir: str,
    limit: int | None = None,
    max_pixels: int | None = 89_478_485,
) -> Plan:
    """A split per annotation file (e.g. captions_train2017.json, captions_val2017.json)."""
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"--images_dir {images_dir}: not a directory")
    splits: dict[str | None, list] = {}
    for path in annotations:
        name = split_name(path)
        if name in splits:
            raise ValueError(f"two annotation files give the split name {name!r}")
        splits[name] = split_tasks(path, images_dir, max_pixels, limit)
    return Plan(name="coco", splits=splits, process=process, default_format="jpeg")
