"""OpenClipArt image-text pairs: the PNG renderings with captions from their SVG metadata.

Inputs (Debian packages openclipart-png and openclipart-svg): `PNG_DIR/<category>/.../x.png`
and the SVG at the same relative path under `SVG_DIR`, whose RDF metadata holds `dc:title`,
`dc:description` and `rdf:li` keywords under `dc:subject`. Label = top-level category.

Train/test (`test_fraction` > 0) are split by title, not by file: a hash of the normalised
title (`split_key`) decides, so variants of one drawing ("cat_01.png", "cat_02.png", or the
same title drawn twice) never straddle the splits. The title is texts[0] of every record, so
two images with equal caption sets always share a split. With `image_size`, each image is
flattened onto white (its alpha would otherwise turn transparent backgrounds black), padded
to a white square and resized, as the emoji are.

Dropped on purpose (reported as "skipped", never silently): the categories in
`DROP_CATEGORIES` (icon and gradient boilerplate) and images over `MAX_PIXELS` (some are
hundreds of megapixels; the size is read from the PNG header before any decoding).
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import os
import re
from collections.abc import Sequence

from PIL import Image

from input_pipeline.sources.shard_writer import (
    Bad,
    BadImageError,
    ImageOptions,
    Plan,
    Record,
    encode_image,
    header_size,
    open_image,
    to_storable,
)

PNG_DIR = "/usr/share/openclipart/png"
SVG_DIR = "/usr/share/openclipart/svg"
DROP_CATEGORIES = frozenset({"computer", "shapes", "special", "unsorted"})
MAX_PIXELS = 4_000_000

_AGENT = re.compile(r"<cc:Agent\b.*?</cc:Agent>", re.S)
_SUBJECT = re.compile(r"<dc:subject\b[^>]*>(.*?)</dc:subject>", re.S)
_LI = re.compile(r"<rdf:li\b[^>]*>(.*?)</rdf:li>", re.S)
_TAG = re.compile(r"<[^>]+>")


def _clean(text: str) -> str:
    """Tags removed, entities unescaped, whitespace collapsed."""
    return " ".join(html.unescape(_TAG.sub(" ", text)).split())


def _first(tag: str, text: str) -> str:
    m = re.search(rf"<{tag}\b[^>]*>(.*?)</{tag}>", text, re.S)
    return _clean(m.group(1)) if m else ""


def parse_svg_metadata(svg_text: str) -> dict:
    """{title, description, keywords, creator} from an SVG's RDF metadata (regex-based, so a
    malformed SVG body does not matter). Keywords equal to the creator's name are dropped."""
    creator = _first("dc:title", _first_block("dc:creator", svg_text))
    work = _AGENT.sub("", svg_text)  # agents (publisher, creator, rights) carry dc:title too
    subject = _SUBJECT.search(work)
    keywords = [_clean(k) for k in _LI.findall(subject.group(1))] if subject else []
    keywords = [k for k in dict.fromkeys(keywords) if k and k.lower() != creator.lower()]
    return {
        "title": _first("dc:title", work),
        "description": _first("dc:description", work),
        "keywords": keywords,
        "creator": creator,
    }


def _first_block(tag: str, text: str) -> str:
    m = re.search(rf"<{tag}\b[^>]*>(.*?)</{tag}>", text, re.S)
    return m.group(1) if m else ""


def title_from_filename(path: str) -> str:
    """ "ragnetto_incazzato_archi_01.png" -> "ragnetto incazzato archi" (fallback caption)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    stem = re.sub(r"_\d+[a-z]?$", "", stem)
    return " ".join(stem.replace("_", " ").replace("-", " ").split())


def captions(meta: dict, fallback_title: str) -> tuple[str, ...]:
    """Title, "clip art of <title>", the keyword list and the description; deduplicated."""
    title = meta.get("title") or fallback_title
    texts = [title, f"clip art of {title}"]
    if meta.get("keywords"):
        texts.append(", ".join(meta["keywords"]))
    if meta.get("description"):
        texts.append(meta["description"])
    return tuple(dict.fromkeys(t for t in texts if t))


def split_key(title: str) -> str:
    """The title as the split sees it: case, punctuation and spacing ignored."""
    return " ".join(re.sub(r"[\W_]+", " ", title.casefold()).split())


def split_of(title: str, test_fraction: float) -> str:
    """Deterministic hash split by title: "test" for about `test_fraction` of the titles."""
    digest = hashlib.sha256(split_key(title).encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2.0**64 < test_fraction else "train"


def square_on_white(img: Image.Image, size: int) -> Image.Image:
    """Transparency flattened onto white, padded to a centred white square, resized."""
    img = to_storable(img).convert("RGB")
    w, h = img.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(img, ((side - w) // 2, (side - h) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return square


@dataclasses.dataclass(frozen=True)
class Task:
    id: str
    path: str
    texts: tuple[str, ...]
    label: int
    image_size: int | None = None  # None: keep the aspect ratio (options cap the short side)


def process(task: Task, options: ImageOptions) -> Record | Bad:
    """Decodes one PNG (a square of `image_size` when set) and encodes it as options say."""
    try:
        img = open_image(
            task.path,
            max_pixels=MAX_PIXELS,
            max_short_side=options.max_short_side,
            max_side=options.max_side,
        )
        if task.image_size:
            img = square_on_white(img, task.image_size)
    except (BadImageError, OSError, ValueError) as e:
        return Bad(task.path, str(e))
    return Record(task.id, encode_image(img, options), task.texts, task.label)


def list_pngs(png_dir: str) -> list[str]:
    """Relative paths of every PNG under png_dir, sorted (deterministic order)."""
    out = []
    for root, dirs, files in os.walk(png_dir):
        dirs.sort()
        out += [
            os.path.relpath(os.path.join(root, f), png_dir)
            for f in sorted(files)
            if f.lower().endswith(".png")
        ]
    return sorted(out)


def plan(
    *,
    png_dir: str = PNG_DIR,
    svg_dir: str = SVG_DIR,
    limit: int | None = None,
    drop_categories: Sequence[str] = tuple(sorted(DROP_CATEGORIES)),
    max_pixels: int = MAX_PIXELS,
    test_fraction: float = 0.0,
    image_size: int | None = None,
) -> Plan:
    """Tasks over the kept categories; `limit` keeps the first N kept PNGs (sorted paths).

    test_fraction > 0: "train" and "test" splits by title (`split_of`); 0: one unsplit set.
    image_size: square output side (see `square_on_white`); None keeps the aspect ratio.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    for d, pkg in ((png_dir, "openclipart-png"), (svg_dir, "openclipart-svg")):
        if not os.path.isdir(d):
            raise FileNotFoundError(
                f"{d}: not found. Install it with: apt-get install --no-install-recommends {pkg}"
            )
    rel_paths = [p for p in list_pngs(png_dir) if os.sep in p]
    drop = set(drop_categories)
    categories = sorted({p.split(os.sep, 1)[0] for p in rel_paths} - drop)
    label_of = {c: i for i, c in enumerate(categories)}
    splits: dict[str | None, list[Task | Bad]] = (
        {"train": [], "test": []} if test_fraction > 0 else {None: []}
    )
    num_tasks = 0
    for rel in rel_paths:
        category = rel.split(os.sep, 1)[0]
        if category in drop:
            continue  # whole categories; counted in PREFIX-dropped_categories.json
        if limit and num_tasks >= limit:
            break
        num_tasks += 1
        path = os.path.join(png_dir, rel)
        svg_path = os.path.join(svg_dir, os.path.splitext(rel)[0] + ".svg")
        meta: dict = {}
        if os.path.exists(svg_path):
            with open(svg_path, encoding="utf-8", errors="replace") as f:
                meta = parse_svg_metadata(f.read())
        texts = captions(meta, title_from_filename(rel))
        split = split_of(texts[0] if texts else rel, test_fraction) if test_fraction > 0 else None
        if not texts:
            splits[split].append(Bad(path, "no title in the SVG metadata nor in the file name"))
            continue
        try:
            width, height = header_size(path)
        except (OSError, ValueError) as e:
            splits[split].append(Bad(path, f"cannot read the size from the header ({e})"))
            continue
        if width * height > max_pixels:
            reason = f"{width}x{height} over {max_pixels} pixels"
            splits[split].append(Bad(path, reason, skipped=True))
            continue
        splits[split].append(Task(rel, path, texts, label_of[category], image_size))
    dropped = {c: sum(p.startswith(c + os.sep) for p in rel_paths) for c in sorted(drop)}
    return Plan(
        name="openclipart",
        splits=splits,
        process=process,
        classnames=[c.replace("_", " ") for c in categories],
        default_format="jpeg",
        side_files={"dropped_categories.json": dropped},
    )
