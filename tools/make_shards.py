"""Makes TFRecord shards (+ .idx, class names, stats, bad-file list) from real datasets.

    python tools/make_shards.py emoji --output data/emoji/emoji
    python tools/make_shards.py fashion_mnist --output data/fashion_mnist/fashion_mnist
    python tools/make_shards.py openclipart --output data/openclipart/openclipart --image_size 128
    python tools/make_shards.py folder --images_dir imgs --captions caps.jsonl --output data/x/x
    python tools/make_shards.py tfds --name my_ds --data_dir ~/tfds --split train,test \\
        --output data/my_ds/my_ds
    python tools/make_shards.py webdataset 'shards-{00000..00009}.tar' --output data/wds/wds
    python tools/make_shards.py csv train.csv --separator , --output data/mine/mine
    python tools/make_shards.py coco annotations/captions_train2017.json \\
        annotations/captions_val2017.json --images_dir coco --output data/coco/coco
    python tools/make_shards.py cc3m Train_GCC-training.tsv --images_dir cc3m/images \\
        --filename '{index}' --output data/cc3m/cc3m
    python tools/make_shards.py index 'data/other/*.tfrecord'   # .idx for foreign shards
    python tools/make_shards.py embedded --output_dir data      # the embedded default

Shards are PREFIX-SPLIT-00003-of-00016.tfrecord (PREFIX-00003-of-00016.tfrecord for a source
without splits). Images are stored as JPEG (quality 95) with the short side at most 256 px,
except Fashion-MNIST, stored as lossless greyscale PNG (28x28: smaller than JPEG, exact).
The same input always gives the same bytes. Inputs that cannot be used are counted in the
summary line and listed in PREFIX-bad_files.txt; when none can be used, no shards are written
and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from input_pipeline.sources import shard_writer


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output", required=True, help="shard prefix, e.g. data/emoji/emoji")
    g.add_argument(
        "--num_shards",
        type=int,
        default=0,
        help="shards per split (0: one per 10,000 records, at least one)",
    )
    g.add_argument(
        "--max_short_side",
        type=int,
        default=256,
        help="downscale so the short side is at most this (0: keep the size)",
    )
    g.add_argument(
        "--max_side",
        type=int,
        default=0,
        help="also downscale so the long side is at most this, as FFCV's max_resolution "
        "(0: no cap; use --max_short_side 0 to cap the long side only)",
    )
    g.add_argument(
        "--format",
        choices=("jpeg", "png"),
        default=None,
        help="image format (default: jpeg; png for fashion_mnist)",
    )
    g.add_argument("--quality", type=int, default=95, help="JPEG quality")
    g.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    g.add_argument(
        "--limit",
        type=int,
        default=None,
        help="at most N inputs (per split for fashion_mnist, tfds)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="source", required=True)

    p = sub.add_parser("emoji", help="Noto emoji images with Unicode names and CLDR keywords")
    _common(p)
    p.add_argument("--image_size", type=int, default=128, help="square output size in px")
    p.add_argument("--test_fraction", type=float, default=0.2, help="share of base emoji")

    p = sub.add_parser("openclipart", help="OpenClipArt PNGs with SVG metadata captions")
    _common(p)
    p.add_argument("--png_dir", default="/usr/share/openclipart/png")
    p.add_argument("--svg_dir", default="/usr/share/openclipart/svg")
    p.add_argument(
        "--test_fraction", type=float, default=0.2, help="share of titles (0: no splits)"
    )
    p.add_argument(
        "--image_size", type=int, default=0, help="white square of this side (0: keep aspect)"
    )

    p = sub.add_parser("fashion_mnist", help="Fashion-MNIST IDX files, image-label records")
    _common(p)
    p.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--split", default="train,test", help="comma-separated: train,test")

    p = sub.add_parser("folder", help="a directory of images + a JSONL or CSV captions file")
    _common(p)
    p.add_argument("--images_dir", required=True)
    p.add_argument(
        "--captions",
        default=None,
        help="JSONL {path, caption, label} or CSV path,caption[,label]; "
        "without it, every image is used, labelled by its subdirectory",
    )
    p.add_argument("--split", default=None, help="split name in the shard names (optional)")
    p.add_argument("--max_pixels", type=int, default=89_478_485, help="larger images are bad")

    p = sub.add_parser("tfds", help="a prepared tfds dataset (tfrecord, array_record), no TF")
    _common(p)
    p.add_argument("--name", required=True, help="dataset name, e.g. mnist or my_ds:1.0.0")
    p.add_argument("--data_dir", default=None, help="tfds data dir (default: tfds' own)")
    p.add_argument("--split", default="train", help="comma-separated splits, e.g. train,test")
    p.add_argument("--image_key", default="image")
    p.add_argument(
        "--label_key", default=None, help="default: 'label' when present; '' for no labels"
    )
    p.add_argument("--text_key", default=None, help="feature holding the caption(s)")
    p.add_argument("--module", default=None, help="module to import that defines the builder")

    p = sub.add_parser("webdataset", help="WebDataset tars: key.jpg|png|webp + key.txt/json/cls")
    _common(p)
    p.add_argument("shards", nargs="+", help="tar paths, globs or {00000..00031} ranges")
    p.add_argument("--split", default=None, help="split name in the shard names (optional)")
    p.add_argument("--json_caption_key", default="caption", help="'' to ignore key.json")
    p.add_argument("--classnames", default=None, help="JSON list of names for key.cls labels")
    p.add_argument("--max_pixels", type=int, default=89_478_485, help="larger images are bad")

    p = sub.add_parser("csv", help="open_clip CSV/TSV: image path and caption columns")
    _common(p)
    p.add_argument("table", help="the CSV/TSV file")
    p.add_argument("--separator", default="\\t", help="field separator (open_clip: tab)")
    p.add_argument("--path_column", default="filepath", help="open_clip's --csv-img-key")
    p.add_argument("--caption_column", default="title", help="open_clip's --csv-caption-key")
    p.add_argument("--images_dir", default=None, help="root of relative paths (default: cwd)")
    p.add_argument("--filename", default="{value}", help="{value} {index} {basename} {sha1}")
    p.add_argument("--split", default=None, help="split name in the shard names (optional)")
    p.add_argument("--max_pixels", type=int, default=89_478_485, help="larger images are bad")

    p = sub.add_parser("coco", help="COCO captions_*.json + image folder, all captions per image")
    _common(p)
    p.add_argument("annotations", nargs="+", help="captions_<split>.json files")
    p.add_argument("--images_dir", required=True, help="holds <split>/ folders or the images")
    p.add_argument("--max_pixels", type=int, default=89_478_485, help="larger images are bad")

    p = sub.add_parser("cc3m", help="CC3M-style TSV (caption, url) with images already on disk")
    _common(p)
    p.add_argument("tsv", help="e.g. Train_GCC-training.tsv")
    p.add_argument("--images_dir", required=True, help="where the images were downloaded")
    p.add_argument("--filename", default="{index}", help="{index} {basename} {sha1} {value}")
    p.add_argument("--caption_column", default="0", help="name or 0-based number")
    p.add_argument("--path_column", default="1", help="name or 0-based number (url or path)")
    p.add_argument("--split", default=None, help="split name in the shard names (optional)")
    p.add_argument("--max_pixels", type=int, default=89_478_485, help="larger images are bad")

    p = sub.add_parser("index", help="write the .idx of shards made elsewhere")
    p.add_argument("paths", nargs="+", help="shard paths or globs")

    p = sub.add_parser(
        "embedded", help="the embedded default: emoji + fashion_mnist + openclipart + tokenizer"
    )
    p.add_argument("--output_dir", default="data")
    p.add_argument(
        "--fashion_limit", type=int, default=None, help="images per split (default: all)"
    )
    p.add_argument("--emoji_limit", type=int, default=None, help="emoji (default: all)")
    p.add_argument(
        "--openclipart_limit", type=int, default=None, help="OpenClipArt PNGs (default: all)"
    )
    p.add_argument(
        "--no_openclipart",
        action="store_true",
        help="leave OpenClipArt out (recorded as skipped in the manifest)",
    )
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _splits(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


def make_plan(args: argparse.Namespace) -> shard_writer.Plan:
    """The source plan named by the parsed command line."""
    if args.source == "emoji":
        from input_pipeline.sources import emoji

        return emoji.plan(
            limit=args.limit, test_fraction=args.test_fraction, image_size=args.image_size
        )
    if args.source == "openclipart":
        from input_pipeline.sources import openclipart

        return openclipart.plan(
            png_dir=args.png_dir,
            svg_dir=args.svg_dir,
            limit=args.limit,
            test_fraction=args.test_fraction,
            image_size=args.image_size or None,
        )
    if args.source == "fashion_mnist":
        from input_pipeline.sources import fashion_mnist

        return fashion_mnist.plan(
            data_dir=args.data_dir, limit=args.limit, splits=_splits(args.split)
        )
    if args.source == "folder":
        from input_pipeline.sources import folder

        return folder.plan(
            images_dir=args.images_dir,
            captions=args.captions,
            split=args.split,
            limit=args.limit,
            max_pixels=args.max_pixels,
        )
    if args.source == "tfds":
        from input_pipeline.sources import tfds_source

        return tfds_source.plan(
            name=args.name,
            data_dir=args.data_dir,
            splits=_splits(args.split),
            image_key=args.image_key,
            label_key=args.label_key,
            text_key=args.text_key,
            limit=args.limit,
            module=args.module,
        )
    if args.source == "webdataset":
        from input_pipeline.sources import webdataset

        return webdataset.plan(
            shards=args.shards,
            split=args.split,
            json_caption_key=args.json_caption_key or None,
            classnames=args.classnames,
            limit=args.limit,
            max_pixels=args.max_pixels,
        )
    if args.source in ("csv", "cc3m"):
        from input_pipeline.sources import cc3m, csv_source

        kw = dict(
            images_dir=args.images_dir,
            path_column=args.path_column,
            caption_column=args.caption_column,
            filename=args.filename,
            split=args.split,
            limit=args.limit,
            max_pixels=args.max_pixels,
        )
        if args.source == "cc3m":
            return cc3m.plan(tsv=args.tsv, **kw)
        separator = {"\\t": "\t", "tab": "\t"}.get(args.separator, args.separator)
        return csv_source.plan(table=args.table, separator=separator, **kw)
    if args.source == "coco":
        from input_pipeline.sources import coco

        return coco.plan(
            annotations=args.annotations,
            images_dir=args.images_dir,
            limit=args.limit,
            max_pixels=args.max_pixels,
        )
    raise ValueError(f"unknown source {args.source!r}")


def run_index(patterns: Sequence[str]) -> list[tuple[str, int]]:
    """Writes the .idx of every shard matching `patterns`; prints and returns the counts."""
    paths: list[str] = []
    for pattern in patterns:
        matched = sorted(p for p in glob.glob(pattern) if not p.endswith((".idx", ".tmp")))
        if not matched:
            raise FileNotFoundError(f"no shard matches {pattern!r}")
        paths += matched
    counts = shard_writer.index_shards(paths)
    for path, n in counts:
        print(f"{path}: {n} records")
    print(f"indexed {len(counts)} shards, {sum(n for _, n in counts)} records")
    return counts


def main(argv: Sequence[str] | None = None):
    """Runs the command line; exits with status 1 and a message when nothing usable was
    written (every input bad), so scripts and CI stop here rather than at training time."""
    try:
        return _main(argv)
    except shard_writer.NoRecordsError as e:
        raise SystemExit(f"make_shards: error: {e}") from None


def _main(argv: Sequence[str] | None):
    args = parse_args(argv)
    if args.source == "index":
        return run_index(args.paths)
    if args.source == "embedded":
        from input_pipeline.sources.embedded import build_embedded

        manifest = build_embedded(
            args.output_dir,
            fashion_limit=args.fashion_limit,
            emoji_limit=args.emoji_limit,
            openclipart_limit=args.openclipart_limit,
            with_openclipart=not args.no_openclipart,
            workers=args.workers,
            force=args.force,
            progress=not args.quiet,
        )
        print(f"manifest: {os.path.join(args.output_dir, 'manifest.json')}")
        return manifest
    plan = make_plan(args)
    options = shard_writer.ImageOptions(
        format=args.format or plan.default_format,
        quality=args.quality,
        max_short_side=args.max_short_side or None,
        max_side=args.max_side or None,
    )
    summary = shard_writer.write_plan(
        plan,
        args.output,
        options=options,
        num_shards=args.num_shards,
        workers=args.workers,
        progress=not args.quiet,
    )
    print(summary.line())
    return summary


if __name__ == "__main__":
    main()
