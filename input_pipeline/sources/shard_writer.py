"""The shard writer every source shares: image encoding, parallel processing, shard files.

A source describes its work as a `Plan`: per split, a sequence of picklable tasks and one
top-level `process(task, options)` function that turns a task into a `Record` (encoded image,
captions, label, id) or a `Bad` (an input that could not be used, with the reason).
`write_plan` runs the tasks in a process pool (results come back in task order, so the output
is byte-identical for the same input whatever the worker count), spreads records round-robin
over the shards of each split (so every shard sees every class), and writes beside them:

    PREFIX-SPLIT-00000-of-00004.tfrecord (+ .idx)   or  PREFIX-00000-of-00004.tfrecord
    PREFIX-SPLIT-stats.json    records per shard and per class      (PREFIX-stats.json)
    PREFIX-classnames.json     list of class names, index = label   (when labels exist)
    PREFIX-bad_files.txt       every input that was skipped and why (always written), one
                               line each: split, kind, input, reason; tab-separated, with
                               tab, newline, CR and backslash inside a field escaped

Bad inputs are never dropped silently: they are counted in the summary line and listed.
When no input at all gives a record, `write_plan` writes only the bad-file list and raises
NoRecordsError (a zero-record shard set would only fail later, far from its cause).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import multiprocessing
import os
import re
import struct
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from PIL import Image

DEFAULT_RECORDS_PER_SHARD = 10_000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class Record:
    """One sample ready to serialise: an encoded image, its captions, label and stable id."""

    id: str
    image: bytes
    texts: tuple[str, ...] = ()
    label: int = -1


@dataclasses.dataclass(frozen=True)
class Bad:
    """An input that did not become a record. `skipped`: left out on purpose by a filter
    (e.g. too many pixels), as opposed to broken (missing, undecodable, empty)."""

    where: str
    reason: str
    skipped: bool = False


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """How images are stored: format (jpeg|png), JPEG quality, caps on the short side and on
    the long side (`max_side`, FFCV's `max_resolution`); images are only ever downscaled,
    keeping the aspect ratio, by the smaller of the two scales."""

    format: str = "jpeg"
    quality: int = 95
    max_short_side: int | None = 256
    max_side: int | None = None

    def __post_init__(self) -> None:
        if self.format not in ("jpeg", "png"):
            raise ValueError(f"format must be 'jpeg' or 'png', got {self.format!r}")
        for name in ("max_short_side", "max_side"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or >= 1, got {value}")


@dataclasses.dataclass
class Plan:
    """What a source wants written.

    splits: split name (None: a set without splits) -> sequence of tasks. A task that is
      already a `Bad` (found while listing the inputs) is reported as is.
    process: top-level (picklable) function (task, ImageOptions) -> Record | Bad.
    classnames: class names, index = label; None when the records carry no labels.
    side_files: suffix -> JSON object, written as PREFIX-suffix (e.g. "groups.json").
    """

    name: str
    splits: dict[str | None, Sequence[Any]]
    process: Callable[[Any, ImageOptions], Record | Bad]
    classnames: list[str] | None = None
    default_format: str = "jpeg"
    side_files: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class SplitSummary:
    split: str | None
    num_records: int
    shards: list[str]
    shard_counts: list[int]
    label_counts: dict[int, int]
    num_bad: int
    num_skipped: int


@dataclasses.dataclass
class Summary:
    """The result of `write_plan`: per-split counts, every bad input, file locations."""

    prefix: str
    splits: dict[str | None, SplitSummary]
    bad: list[tuple[str | None, Bad]]
    bad_files_path: str
    classnames_path: str | None
    elapsed_s: float

    @property
    def num_records(self) -> int:
        return sum(s.num_records for s in self.splits.values())

    def line(self) -> str:
        """One summary line: records per split, bad and skipped inputs, where they are listed."""
        parts = [f"{s.num_records} {name or ''}".strip() for name, s in self.splits.items()]
        n_bad = sum(not b.skipped for _, b in self.bad)
        n_skip = sum(b.skipped for _, b in self.bad)
        return (
            f"{self.prefix}: wrote {' + '.join(parts)} records in {self.elapsed_s:.1f}s; "
            f"{n_bad} bad, {n_skip} skipped inputs (listed in {self.bad_files_path})"
        )


class NoRecordsError(ValueError):
    """Every input of a plan was bad (or there were none): nothing usable to write."""


# ----------------------------------------------------------------------------- images


class BadImageError(ValueError):
    """An image file or buffer that cannot be used; the message says why."""


def header_size(path: str) -> tuple[int, int]:
    """(width, height) from the file header alone, without decoding the pixels.

    PNG sizes come straight from the IHDR chunk, so even a gigapixel PNG costs 24 bytes of
    I/O and never reaches Pillow's decompression-bomb check.
    """
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(path) as img:
                return img.size
        except _IMAGE_ERRORS as e:
            raise BadImageError(f"cannot read the image header ({e})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def downscale(
    width: int, height: int, max_short_side: int | None, max_side: int | None = None
) -> float:
    """The scale (<= 1) that brings the short side to at most `max_short_side` and the long
    side to at most `max_side` (None: no cap); 1.0 when the image already fits."""
    scale = 1.0
    if max_short_side and min(width, height) > max_short_side:
        scale = max_short_side / min(width, height)
    if max_side and max(width, height) > max_side:
        scale = min(scale, max_side / max(width, height))
    return scale


def open_image(
    source: str | bytes,
    *,
    max_pixels: int | None = None,
    max_short_side: int | None = None,
    max_side: int | None = None,
) -> Image.Image:
    """Opens and fully decodes an image file or buffer; raises BadImageError with the reason.

    With `max_short_side` / `max_side`, JPEGs decode in draft mode at the smallest DCT scale
    that still leaves the image at least as large as `limit_size` will make it (much faster
    for large photos).
    """
    import io

    try:
        with warnings.catch_warnings():
            # Pillow warns above its pixel limit; our own `max_pixels` check decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise BadImageError(f"{width}x{height} has more than {max_pixels} pixels")
        scale = downscale(width, height, max_short_side, max_side)
        if img.format == "JPEG" and scale < 1.0:
            img.draft(img.mode, (math.ceil(width * scale), math.ceil(height * scale)))
        img.load()
    except FileNotFoundError:
        raise BadImageError("file not found") from None
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError(f"too many pixels ({e})") from None
    except _IMAGE_ERRORS as e:
        raise BadImageError(f"cannot decode image ({type(e).__name__}: {e})") from None
    if width == 0 or height == 0:
        raise BadImageError("image has zero size")
    return img


def to_storable(img: Image.Image) -> Image.Image:
    """An 8-bit L or RGB image; transparency is flattened onto white.

    Clip art and emoji are drawn on transparent canvases; dropping alpha would leave them on
    black (or on whatever colour the transparent pixels hold), so they are composited on
    white. 16-bit and 32-bit grey is scaled to 8 bits.
    """
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("L", "RGB"):
        return img
    if img.mode == "1":
        return img.convert("L")
    if img.mode.startswith("I") or img.mode == "F":
        import numpy as np

        arr = np.asarray(img).astype(np.float64)
        if arr.max(initial=0) > 255:
            arr = arr / 257.0  # 16-bit range to 8-bit
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def limit_size(
    img: Image.Image, max_short_side: int | None, max_side: int | None = None
) -> Image.Image:
    """Downscales (never upscales, aspect kept) so that the short side is at most
    `max_short_side` and the long side at most `max_side`."""
    width, height = img.size
    scale = downscale(width, height, max_short_side, max_side)
    if scale >= 1.0:
        return img
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if max_side:  # rounding must not push the long side past the cap
        size = tuple(min(n, max_side) for n in size)
    if size == (width, height):
        return img
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_image(img: Image.Image, options: ImageOptions) -> bytes:
    """Flattens, resizes and encodes `img` as options say. Deterministic bytes."""
    import io

    img = limit_size(to_storable(img), options.max_short_side, options.max_side)
    buf = io.BytesIO()
    if options.format == "jpeg":
        img.save(buf, format="JPEG", quality=options.quality)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- writing


def shard_path(prefix: str, split: str | None, index: int, num_shards: int) -> str:
    """PREFIX-SPLIT-00003-of-00016.tfrecord, or PREFIX-00003-of-00016.tfrecord."""
    base = f"{prefix}-{split}" if split else prefix
    return f"{base}-{index:05d}-of-{num_shards:05d}.tfrecord"


def stats_path(prefix: str, split: str | None) -> str:
    return f"{prefix}-{split}-stats.json" if split else f"{prefix}-stats.json"


def classnames_path(prefix: str) -> str:
    return f"{prefix}-classnames.json"


def bad_files_path(prefix: str) -> str:
    return f"{prefix}-bad_files.txt"


def _run_task(task: Any, process: Callable, options: ImageOptions) -> tuple[str, int, bytes] | Bad:
    """(id, label, serialised Example) or Bad; runs in a worker, serialisation included."""
    from input_pipeline import records

    if isinstance(task, Bad):
        return task
    result = process(task, options)
    if isinstance(result, Bad):
        return result
    example = records.encode_example(
        image=result.image, texts=result.texts, label=result.label, id=result.id
    )
    return result.id, result.label, _deterministic(example)


def _deterministic(example: bytes) -> bytes:
    """The Example re-serialised with its feature map in sorted key order.

    Protobuf map order is unspecified and differs between processes (upb seeds its hash per
    process), so without this the same input gives different shard bytes run to run.
    """
    from tensorflow_datasets.proto import tf_example_pb2

    return tf_example_pb2.Example.FromString(example).SerializeToString(deterministic=True)


def _results(
    fn: Callable[[Any], Any], tasks: Sequence[Any], pool: Any, workers: int
) -> Iterator[Any]:
    """fn over tasks, results in task order; in the pool when there is one."""
    if pool is None:
        yield from map(fn, tasks)
        return
    chunk = max(1, min(64, len(tasks) // (workers * 8)))
    yield from pool.imap(fn, tasks, chunksize=chunk)


def _make_pool(workers: int) -> Any:
    # forkserver: children start from a clean process, so a parent that has imported
    # threaded libraries (tfds, JAX under pytest) cannot deadlock them.
    return multiprocessing.get_context("forkserver").Pool(workers)


def _remove_stale_shards(prefix: str, split: str | None, keep: Iterable[str]) -> None:
    """Deletes shards of an earlier run with another shard count (a glob would mix them)."""
    base = f"{prefix}-{split}" if split else prefix
    directory = os.path.dirname(base) or "."
    pattern = re.compile(re.escape(os.path.basename(base)) + r"-\d{5}-of-\d{5}\.tfrecord(\.idx)?$")
    keep = {os.path.abspath(p) for p in keep} | {os.path.abspath(p) + ".idx" for p in keep}
    for name in os.listdir(directory):
        path = os.path.abspath(os.path.join(directory, name))
        if pattern.match(name) and path not in keep:
            os.remove(path)


def write_json(path: str, obj: Any) -> None:
    """Writes JSON atomically (temp file + rename), UTF-8, indented, in insertion order."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def num_shards_for(num_tasks: int, num_shards: int, records_per_shard: int) -> int:
    """`num_shards` when given (> 0), else enough shards of `records_per_shard` records."""
    if num_shards > 0:
        return num_shards
    return max(1, math.ceil(num_tasks / records_per_shard))


def write_plan(
    plan: Plan,
    prefix: str,
    *,
    options: ImageOptions | None = None,
    num_shards: int = 0,
    records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
    workers: int | None = None,
    progress: bool = True,
) -> Summary:
    """Runs `plan` and writes its shards, stats, class names and bad-file list under `prefix`.

    num_shards: shards per split; 0 picks ceil(tasks / records_per_shard) per split.
    workers: processes that decode/render/encode images (default: all cores, at most 8).
    """
    from tqdm import tqdm

    from input_pipeline.tfrecord import TFRecordWriter

    start = time.perf_counter()
    options = options or ImageOptions(format=plan.default_format)
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    fn = functools.partial(_run_task, process=plan.process, options=options)
    num_classes = len(plan.classnames) if plan.classnames is not None else None
    total = sum(len(t) for t in plan.splits.values())
    pool = _make_pool(workers) if workers > 1 and total >= 64 else None
    bad: list[tuple[str | None, Bad]] = []
    summaries: dict[str | None, SplitSummary] = {}
    empty_splits: list[tuple[str | None, list[str]]] = []
    try:
        for split, tasks in plan.splits.items():
            n = num_shards_for(len(tasks), num_shards, records_per_shard)
            paths = [shard_path(prefix, split, i, n) for i in range(n)]
            writers = [TFRecordWriter(p) for p in paths]
            labels: Counter[int] = Counter()
            written = 0
            try:
                bar = tqdm(
                    total=len(tasks),
                    desc=f"{plan.name} {split or ''}".strip(),
                    unit="img",
                    disable=not progress,
                    file=sys.stderr,
                    dynamic_ncols=True,
                )
                with bar:
                    for result in _results(fn, tasks, pool, workers):
                        bar.update(1)
                        if isinstance(result, Bad):
                            bad.append((split, result))
                            continue
                        sample_id, label, example = result
                        if num_classes is not None and not -1 <= label < num_classes:
                            raise ValueError(
                                f"{sample_id}: label {label} out of range [-1, {num_classes})"
                            )
                        writers[written % n].write(example)
                        labels[label] += 1
                        written += 1
            except BaseException:
                for w in writers:
                    w.abort()
                raise
            if written:
                for w in writers:
                    w.close()
                _remove_stale_shards(prefix, split, paths)
            else:  # written below, once another split is known to hold records
                for w in writers:
                    w.abort()
                empty_splits.append((split, paths))
            split_bad = [b for s, b in bad if s == split]
            summaries[split] = SplitSummary(
                split=split,
                num_records=written,
                shards=paths,
                shard_counts=[len(w) for w in writers],
                label_counts=dict(sorted(labels.items())),
                num_bad=sum(not b.skipped for b in split_bad),
                num_skipped=sum(b.skipped for b in split_bad),
            )
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    bad_path = bad_files_path(prefix)
    if not any(s.num_records for s in summaries.values()):
        # A zero-record shard set only fails later, far from its cause: write the bad list
        # (the message points to it) and nothing else.
        _write_bad_files(bad_path, bad)
        raise NoRecordsError(_no_records_message(prefix, total, bad, bad_path))
    for split, paths in empty_splits:  # other splits hold records: keep the layout complete
        for path in paths:
            TFRecordWriter(path).close()
        _remove_stale_shards(prefix, split, paths)

    names_path = None
    if plan.classnames is not None:
        names_path = classnames_path(prefix)
        write_json(names_path, list(plan.classnames))
    for suffix, obj in plan.side_files.items():
        write_json(f"{prefix}-{suffix}", obj)
    for split, s in summaries.items():
        write_json(stats_path(prefix, split), _stats(plan, s, options))
    _write_bad_files(bad_path, bad)
    return Summary(
        prefix=prefix,
        splits=summaries,
        bad=bad,
        bad_files_path=bad_path,
        classnames_path=names_path,
        elapsed_s=time.perf_counter() - start,
    )


def _no_records_message(
    prefix: str, total: int, bad: Sequence[tuple[str | None, Bad]], bad_path: str
) -> str:
    """Why nothing was written and where to look, for NoRecordsError."""
    if total == 0:
        message = f"{prefix}: the source found no inputs, so no shards were written"
        hint = "Check the input paths and options (and --limit)."
    else:
        n_bad = sum(not b.skipped for _, b in bad)
        n_skip = len(bad) - n_bad
        message = (
            f"{prefix}: no usable records, so no shards were written: all {total} inputs "
            f"were bad ({n_bad} bad, {n_skip} skipped), each listed with its reason in "
            f"{bad_path}"
        )
        hint = "Fix the inputs or the options that locate them (e.g. --images_dir) and rerun."
    directory, base = os.path.split(prefix)
    pattern = re.compile(re.escape(base) + r"-.*\d{5}-of-\d{5}\.tfrecord$")
    if any(pattern.match(name) for name in os.listdir(directory or ".")):
        hint += f" Shards of an earlier run under {prefix} were left as they were."
    return f"{message}. {hint}"


def _stats(plan: Plan, s: SplitSummary, options: ImageOptions) -> dict:
    per_class: dict[str, int] = {}
    if plan.classnames is not None:
        per_class = {name: s.label_counts.get(i, 0) for i, name in enumerate(plan.classnames)}
    else:
        per_class = {str(label): n for label, n in s.label_counts.items() if label >= 0}
    return {
        "source": plan.name,
        "split": s.split,
        "num_records": s.num_records,
        "num_bad": s.num_bad,
        "num_skipped": s.num_skipped,
        "image_format": options.format,
        "jpeg_quality": options.quality if options.format == "jpeg" else None,
        "max_short_side": options.max_short_side,
        "max_side": options.max_side,
        "shards": {os.path.basename(p): n for p, n in zip(s.shards, s.shard_counts, strict=True)},
        "per_class": per_class,
        "unlabelled": s.label_counts.get(-1, 0),
    }


_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def escape_field(text: str) -> str:
    """`text` with backslash, newline, carriage return and tab written as \\\\ \\n \\r \\t,
    so that a field of the tab-separated bad-file list never splits a line or a column."""
    return text.translate(_ESCAPES)


def _write_bad_files(path: str, bad: Sequence[tuple[str | None, Bad]]) -> None:
    """One line per bad input: split, kind, input, reason (fields escaped, tab-separated)."""
    lines = ["# split\tkind\tinput\treason (\\t \\n \\r \\\\ escaped)\n"]
    lines += [
        "\t".join(
            [
                escape_field(split or "-"),
                "skipped" if b.skipped else "bad",
                escape_field(b.where),
                escape_field(b.reason),
            ]
        )
        + "\n"
        for split, b in bad
    ]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def index_shards(paths: Sequence[str]) -> list[tuple[str, int]]:
    """Builds the .idx of each shard (made elsewhere); returns (path, record count) pairs."""
    from input_pipeline.tfrecord import write_index

    return [(p, write_index(p)) for p in paths]
