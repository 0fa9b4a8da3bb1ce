"""open_clip's CSV/TSV of image paths and captions (`--csv-img-key filepath
--csv-caption-key title --csv-separator '\\t'`), and the table reader the cc3m source shares.

A table is a header row naming the columns (or none: columns are then numbered from 0) and
one sample per row. Paths are taken as they are (absolute, or relative to the working
directory, as open_clip does) unless `images_dir` is given; `filename` (a format string over
{value}, {index}, {basename}, {sha1}) turns the column's value into the file name, e.g.
'{index:09d}.jpg' for downloads named by row number, '{basename}' for a URL's last part.

Rows naming the same image merge into one record with all their captions (open_clip trains
on each row; the record's `texts` keeps them all and the pipeline picks one per step). Rows
that cannot be used are listed as bad with file:line: a missing column, an empty caption or
path, an image file that is missing or does not decode.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import string
import sys
from collections.abc import Iterator
from urllib.parse import unquote, urlparse

from input_pipeline.sources.shard_writer import (
    Bad,
    BadImageError,
    ImageOptions,
    Plan,
    Record,
    encode_image,
    open_image,
)

# Extensions tried, in this order, when the named file does not exist as is (downloaders
# often save without an extension or with the one from the Content-Type).
EXTENSIONS = ("", ".jpg", ".jpeg", ".png", ".webp", ".JPEG", ".JPG", ".PNG", ".gif", ".bmp")


@dataclasses.dataclass(frozen=True)
class Task:
    """One image to decode. `where`: the input that named it ("table.tsv:12", the first row
    when several rows name the image), reported for a bad image; "" reports the path."""

    id: str
    path: str
    texts: tuple[str, ...]
    max_pixels: int | None
    where: str = ""


def process(task: Task, options: ImageOptions) -> Record | Bad:
    """Decodes one image file into a record; a Bad naming the row (file:line) and the image
    when it cannot, so the row can be found and fixed."""
    path = resolve_extension(task.path)
    if path is None:
        return _bad_image(task, task.path, "file not found")
    try:
        img = open_image(
            path,
            max_pixels=task.max_pixels,
            max_short_side=options.max_short_side,
            max_side=options.max_side,
        )
    except BadImageError as e:
        return _bad_image(task, path, str(e))
    return Record(task.id, encode_image(img, options), task.texts, -1)


def _bad_image(task: Task, path: str, reason: str) -> Bad:
    return Bad(task.where, f"{path}: {reason}") if task.where else Bad(path, reason)


def resolve_extension(path: str) -> str | None:
    """`path` itself, or `path` + the first extension in EXTENSIONS that exists."""
    for ext in EXTENSIONS:
        if os.path.isfile(path + ext):
            return path + ext
    return None


def _column(spec: str, header: list[str] | None, where: str) -> int:
    """Index of the column named `spec` (or numbered, when the table has no header)."""
    if header is not None and spec in header:
        return header.index(spec)
    if spec.lstrip("-").isdigit():
        return int(spec)
    named = f"; the header has {header}" if header is not None else " (the table has no header)"
    raise ValueError(f"{where}: no column {spec!r}{named}")


def read_table(
    path: str,
    *,
    separator: str,
    path_column: str,
    caption_column: str,
    has_header: bool | None = None,
) -> Iterator[tuple[str, int, str, str] | Bad]:
    """(where, row index, path value, caption) per data row; a Bad for a row that lacks one.

    has_header None: a header when the first row names both columns.
    """
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=separator)
        first = next(reader, None)
        if first is None:
            return
        if has_header is None:
            has_header = _looks_like_header(first, path_column, caption_column)
        header = first if has_header else None
        pi = _column(path_column, header, path)
        ci = _column(caption_column, header, path)
        rows = reader if has_header else _prepend(first, reader)
        index = 0
        for row in rows:
            where = f"{path}:{reader.line_num}"
            if not row or all(not c.strip() for c in row):
                continue
            if max(pi, ci) >= len(row):
                yield Bad(where, f"row has {len(row)} columns, needs column {max(pi, ci)}")
            elif not row[pi].strip():
                yield Bad(where, "empty image path")
            elif not row[ci].strip():
                yield Bad(where, "empty caption")
            else:
                yield where, index, row[pi].strip(), row[ci].strip()
            index += 1


HEADER_WORDS = {"caption", "captions", "title", "text", "url", "path", "filepath", "file", "image"}


def _looks_like_header(first: list[str], path_column: str, caption_column: str) -> bool:
    """The first row is a header when it names both columns, or when the numbered columns
    hold typical column names ("caption", "url", ...)."""
    if path_column in first and caption_column in first:
        return True
    cells = [
        first[int(c)].strip().lower()
        for c in (path_column, caption_column)
        if c.isdigit() and int(c) < len(first)
    ]
    return len(cells) == 2 and all(c in HEADER_WORDS for c in cells)


def _prepend(first: list[str], rest: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from rest


def file_name(value: str, index: int, template: str) -> str:
    """The file name `template` gives for a column value (path or URL) and row index."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    unknown = fields - {"value", "index", "basename", "sha1"}
    if unknown:
        raise ValueError(f"filename template {template!r}: unknown fields {sorted(unknown)}")
    basename = ""
    if "basename" in fields:
        parsed = urlparse(value)
        basename = os.path.basename(unquote(parsed.path if parsed.scheme else value))
    sha1 = hashlib.sha1(value.encode("utf-8")).hexdigest() if "sha1" in fields else ""
    return template.format(value=value, index=index, basename=basename, sha1=sha1)


def table_plan(
    *,
    name: str,
    table: str,
    images_dir: str | None,
    separator: str,
    path_column: str,
    caption_column: str,
    filename: str = "{value}",
    has_header: bool | None = None,
    split: str | None = None,
    limit: int | None = None,
    max_pixels: int | None = 89_478_485,
    forbid_urls: bool = False,
) -> Plan:
    """Tasks for every usable row of `table` (rows of one image merged, captions kept)."""
    if not os.path.isfile(table):
        raise FileNotFoundError(f"{table}: no such file")
    if images_dir is not None and not os.path.isdir(images_dir):
        raise FileNotFoundError(f"--images_dir {images_dir}: not a directory")
    merged: dict[str, list] = {}  # path -> [id, captions, where of the first row]
    order: list[str | Bad] = []
    for item in read_table(
        table,
        separator=separator,
        path_column=path_column,
        caption_column=caption_column,
        has_header=has_header,
    ):
        if isinstance(item, Bad):
            order.append(item)
            continue
        where, index, value, caption = item
        rel = file_name(value, index, filename)
        if forbid_urls and "://" in rel:
            order.append(Bad(where, f"{rel!r} is a URL; give --filename to find it on disk"))
            continue
        path = os.path.join(images_dir, rel) if images_dir else rel
        key = os.path.normpath(path)
        if key in merged:
            if caption not in merged[key][1]:
                merged[key][1].append(caption)
            continue
        merged[key] = [rel, [caption], where]
        order.append(key)
    tasks: list[Task | Bad] = []
    for item in order:
        if limit and len(tasks) >= limit:
            break
        if isinstance(item, Bad):
            tasks.append(item)
            continue
        sample_id, captions, where = merged[item]
        tasks.append(Task(sample_id, item, tuple(captions), max_pixels, where))
    return Plan(name=name, splits={split: tasks}, process=process, default_format="jpeg")


def plan(
    *,
    table: str,
    images_dir: str | None = None,
    separator: str = "\t",
    path_column: str = "filepath",
    caption_column: str = "title",
    filename: str = "{value}",
    split: str | None = None,
    limit: int | None = None,
    max_pixels: int | None = 89_478_485,
) -> Plan:
    """open_clip's CSV: a header row with `path_column` and `caption_column` (defaults are
    open_clip's `filepath` and `title`), `separator` between fields (open_clip: a tab)."""
    return table_plan(
        name="csv",
        table=table,
        images_dir=images_dir,
        separator=separator,
        path_column=path_column,
        caption_column=caption_column,
        filename=filename,
        has_header=True,
        split=split,
        limit=limit,
        max_pixels=max_pixels,
    )
