"""Conceptual Captions (CC3M/CC12M style): a TSV of caption and URL (or path) columns whose
images were downloaded beforehand. Nothing is downloaded here.

The official `Train_GCC-training.tsv` has no header: column 0 is the caption, column 1 the
URL. Where a downloader put each image is given by `filename`, a format string over the
column value and the row number (see csv_source.file_name):

    --filename '{index}'          files named by 0-based row number (the default; any of the
                                  usual extensions, or none, is tried)
    --filename '{index:09d}.jpg'  zero-padded row numbers
    --filename '{basename}'       the last part of the URL
    --filename '{sha1}.jpg'       sha1 of the URL
    --path_column 2 --filename '{value}'   a third column holding the local path

A row whose image is not on disk (most downloads lose 10-20% of CC3M) or does not decode is
counted as bad and listed with its TSV line, never dropped silently.
"""

from __future__ import annotations

from input_pipeline.sources.csv_source import table_plan
from input_pipeline.sources.shard_writer import Plan


def plan(
    *,
    tsv: str,
    images_dir: str,
    caption_column: str = "0",
    path_column: str = "1",
    filename: str = "{index}",
    separator: str = "\t",
    has_header: bool | None = None,
    split: str | None = None,
    limit: int | None = None,
    max_pixels: int | None = 89_478_485,
) -> Plan:
    """Tasks for every row of `tsv` whose image is found under `images_dir`."""
    return table_plan(
        name="cc3m",
        table=tsv,
        images_dir=images_dir,
        separator=separator,
        path_column=path_column,
        caption_column=caption_column,
        filename=filename,
        has_header=has_header,
        split=split,
        limit=limit,
        max_pixels=max_pixels,
        forbid_urls=True,
    )
