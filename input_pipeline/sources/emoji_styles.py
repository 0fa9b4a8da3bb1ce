"""The held-out emoji in other art styles: does a model trained on Noto's art transfer?

For each emoji of the emoji TEST split (exactly the split, labels, ids and texts of
`input_pipeline/sources/emoji.py`, which builds the tasks: split by base emoji, test_fraction
0.2), one record per emoji that a style covers, in the emoji record format. A style may also
write the TRAIN split's emoji (`splits=("test", "train")`; the embedded default does so for
EmojiOne, `TRAIN_STYLES`), so that a recipe can train on two fonts and measure transfer on a
style held out of both (Symbola):

- "emojione": EmojiOne 3.x PNGs (Debian ruby-gemojione, 64 px), named by the upper-case hex
  code points joined by "-" with U+FE0F and U+200D (ZWJ) left out, e.g. 1F44D-1F3FD.png.
- "symbola": the Symbola font (Debian fonts-symbola), a monochrome outline font, drawn black
  on white. Only single code points (U+FE0F ignored): ZWJ, skin-tone, flag, keycap and tag
  sequences cannot be drawn as one glyph. A code point the font lacks draws as its .notdef
  box (detected by comparing with the drawing of an unassigned code point) and is skipped.

Images are processed as the Noto path does: cropped to the alpha box (the non-white box for an
opaque image), padded to a centred square on white, resized to `image_size`, JPEG.

Output (`write_style`): OUTPUT_DIR/emoji_styles/STYLE-test-00000-of-00001.tfrecord (+ .idx),
STYLE-train-* beside it when asked for, STYLE-test-stats.json, STYLE-classnames.json and
STYLE-groups.json (equal to emoji's), and STYLE-bad_files.txt, which lists every emoji the
style does not cover with the reason ("skipped"), so nothing is dropped silently; `coverage`
counts them by reason.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Sequence

from PIL import Image, ImageChops, ImageDraw, ImageFont

from input_pipeline.sources import emoji, shard_writer
from input_pipeline.sources.shard_writer import Bad, ImageOptions, Plan, Record, encode_image

STYLES = ("emojione", "symbola")
PACKAGES = {"emojione": "ruby-gemojione", "symbola": "fonts-symbola"}
SPLIT = "test"
TRAIN_STYLES = ("emojione",)  # styles whose train split the embedded default also writes
ZWJ = 0x200D
KEYCAP = 0x20E3
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
TAGS = range(0xE0020, 0xE0080)
SYMBOLA_SIZE = 160  # font size in px: a glyph of ~130 px, downscaled to image_size
UNASSIGNED = "\u0378"  # no font draws it: its drawing is the font's .notdef glyph


def _newest(pattern: str, default: str) -> str:
    found = sorted(glob.glob(pattern))
    return found[-1] if found else default


EMOJIONE_DIR = _newest(
    "/usr/share/rubygems-integration/all/gems/gemojione-*/assets/png",
    "/usr/share/rubygems-integration/all/gems/gemojione-3.3.0/assets/png",
)
SYMBOLA_FONT = _newest(
    "/usr/share/fonts/truetype/*/Symbola*.ttf",
    "/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf",
)
_VERSION = re.compile(r"^([0-9A-Fa-f ]+?)\s*;\s*fully-qualified\s*#\s*\S+\s+(E\d+\.\d+)\s")


def missing_reason(style: str, path: str) -> str | None:
    """Why `style` cannot be built from `path` (with the command that fixes it), or None."""
    ok = os.path.isdir(path) if style == "emojione" else os.path.isfile(path)
    if ok:
        return None
    return (
        f"{path} not found; install with: sudo apt-get install --no-install-recommends "
        f"{PACKAGES[style]} (or run tools/install.sh)"
    )


def emoji_versions(path: str = emoji.EMOJI_TEST) -> dict[str, str]:
    """Emoji.hex -> the emoji version that introduced it ("E4.0"), from emoji-test.txt."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = _VERSION.match(line)
            if m:
                out["-".join(f"{int(c, 16):04X}" for c in m.group(1).split())] = m.group(2)
    return out


def emojione_name(codepoints: Sequence[int]) -> str:
    """The EmojiOne file stem: hex code points without U+FE0F and ZWJ, joined by "-"."""
    return "-".join(f"{c:04X}" for c in codepoints if c not in (emoji.VS16, ZWJ))


def symbola_sequence_kind(codepoints: Sequence[int]) -> str | None:
    """None for one code point (U+FE0F ignored), else why Symbola cannot draw it as one."""
    cps = [c for c in codepoints if c != emoji.VS16]
    if len(cps) == 1:
        return None
    if ZWJ in cps:
        return "ZWJ sequence"
    if any(c in emoji.SKIN_TONES for c in cps):
        return "skin tone modifier sequence"
    if any(c in REGIONAL_INDICATORS for c in cps):
        return "regional indicator flag"
    if any(c in TAGS for c in cps):
        return "tag sequence flag"
    if KEYCAP in cps:
        return "keycap sequence"
    return "multi-code-point sequence"


def crop_to_square(img: Image.Image, image_size: int) -> Image.Image:
    """As `emoji.render` treats a Noto glyph: cropped to the alpha box (the non-white box when
    the image has no transparency), centred on a white square, resized (LANCZOS)."""
    rgba = img.convert("RGBA")  # P/L/LA with a transparency key become real alpha
    alpha = rgba.getchannel("A")
    if alpha.getextrema()[0] < 255:
        box = alpha.getbbox()
    else:
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        box = ImageChops.difference(rgba.convert("RGB"), white).getbbox()
    if box is None:
        raise ValueError("image is empty (fully transparent or all white)")
    return emoji.square_on_white(rgba.crop(box), image_size)


@functools.lru_cache(maxsize=4)
def _symbola(path: str, size: int) -> ImageFont.FreeTypeFont:
    # BASIC layout: one code point, nothing to shape; no font fallback either way.
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


def draw_glyph(char: str, font_path: str, size: int = SYMBOLA_SIZE) -> Image.Image:
    """The glyph's coverage (mode L, 255 = ink) on a canvas holding its whole box."""
    font = _symbola(font_path, size)
    left, top, right, bottom = font.getbbox(char)
    dx, dy = max(0, -left), max(0, -top)
    canvas = Image.new("L", (max(1, right + dx), max(1, bottom + dy)), 0)
    ImageDraw.Draw(canvas).text((dx, dy), char, font=font, fill=255)
    return canvas


@functools.lru_cache(maxsize=4)
def _notdef(font_path: str, size: int) -> tuple[tuple[int, int], bytes]:
    canvas = draw_glyph(UNASSIGNED, font_path, size)
    return canvas.size, canvas.tobytes()


def render_symbola(char: str, image_size: int, font_path: str = SYMBOLA_FONT) -> Image.Image:
    """One code point black on white, processed as the Noto glyphs are.

    Raises LookupError when the font lacks it (drawn as .notdef, or nothing at all)."""
    coverage = draw_glyph(char, font_path)
    if coverage.getbbox() is None:
        raise LookupError("not in Symbola: renders empty")
    if (coverage.size, coverage.tobytes()) == _notdef(font_path, SYMBOLA_SIZE):
        raise LookupError("not in Symbola: renders as its .notdef box")
    black = Image.new("RGBA", coverage.size, (0, 0, 0, 0))
    black.putalpha(coverage)
    return crop_to_square(black, image_size)


@dataclasses.dataclass(frozen=True)
class Task:
    id: str
    texts: tuple[str, ...]
    label: int
    image_size: int
    style: str
    source: str  # emojione: the PNG path; symbola: the character
    font_path: str = ""
    version: str = ""  # the emoji version ("E4.0"), for the reason of a skip


def process(task: Task, options: ImageOptions) -> Record | Bad:
    """Loads (EmojiOne) or draws (Symbola) one emoji and encodes it."""
    try:
        if task.style == "emojione":
            img = shard_writer.open_image(task.source)
            img = crop_to_square(img, task.image_size)
        else:
            img = render_symbola(task.source, task.image_size, task.font_path)
    except LookupError as e:  # a glyph the font does not have: not covered, on purpose
        return Bad(task.id, f"{e} (emoji {task.version})", skipped=True)
    except (shard_writer.BadImageError, OSError, ValueError) as e:
        where = task.source if task.style == "emojione" else task.id
        return Bad(where, str(e))
    return Record(task.id, encode_image(img, options), task.texts, task.label)


def reason_kind(reason: str) -> str:
    """The reason without its details in parentheses: what `coverage` counts."""
    return reason.split(" (", 1)[0]


def plan(
    style: str,
    *,
    limit: int | None = None,
    only: Collection[str] | None = None,
    splits: Sequence[str] = (SPLIT,),
    test_fraction: float = 0.2,
    image_size: int = 128,
    emoji_test: str = emoji.EMOJI_TEST,
    annotations: Sequence[str] = emoji.ANNOTATIONS,
    emojione_dir: str = EMOJIONE_DIR,
    symbola_font: str = SYMBOLA_FONT,
) -> Plan:
    """Per split of `splits` ("test", "train"): a task per emoji of `emoji.plan`'s split
    (the first `limit` emoji in file order, then only the `only` ones, given as Emoji.hex),
    or a skipped `Bad` naming why the style does not cover it. Class names and groups are
    emoji's."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    unknown = [sp for sp in splits if sp not in ("test", "train")]
    if unknown or not splits:
        raise ValueError(f"splits must be among ('test', 'train'), got {tuple(splits)}")
    path = emojione_dir if style == "emojione" else symbola_font
    reason = missing_reason(style, path)
    if reason:
        raise FileNotFoundError(reason)
    with warnings.catch_warnings():  # raqm shapes Noto's sequences; no style here needs it
        warnings.filterwarnings("ignore", message="Pillow has no raqm")
        base = emoji.plan(
            limit=limit,
            test_fraction=test_fraction,
            image_size=image_size,
            emoji_test=emoji_test,
            annotations=annotations,
        )
    versions = emoji_versions(emoji_test)
    # An EmojiOne name that two emoji share (it drops FE0F and ZWJ) would be ambiguous.
    names = Counter(emojione_name(e.codepoints) for e in emoji.parse_emoji_test(emoji_test))
    pngs = set(os.listdir(emojione_dir)) if style == "emojione" else set()
    wanted = set(only) if only is not None else None
    return Plan(
        name=f"emoji_styles/{style}",
        splits={
            split: _style_tasks(
                style, base.splits[split], wanted, versions, names, pngs, image_size, path
            )
            for split in splits
        },
        process=process,
        classnames=base.classnames,
        default_format=base.default_format,
        side_files=base.side_files,
    )


def _style_tasks(
    style: str,
    base_tasks: Sequence,
    wanted: set[str] | None,
    versions: dict[str, str],
    names: Counter,
    pngs: set[str],
    image_size: int,
    path: str,
) -> list[Task | Bad]:
    """The style's task (or skipped Bad) for each of `emoji.plan`'s tasks of one split;
    `path` is the EmojiOne PNG folder or the Symbola font."""
    tasks: list[Task | Bad] = []
    for t in base_tasks:
        hexes = t.id.rsplit("/", 1)[1]
        if wanted is not None and hexes not in wanted:
            continue
        cps = [ord(c) for c in t.text]
        version = versions.get(hexes, "E?")
        if style == "emojione":
            name = emojione_name(cps)
            if names[name] > 1 or name + ".png" not in pngs:
                kind = "ambiguous EmojiOne name" if names[name] > 1 else "no EmojiOne PNG"
                tasks.append(Bad(t.id, f"{kind} ({name}.png; emoji {version})", skipped=True))
            else:
                source = os.path.join(path, name + ".png")
                tasks.append(
                    Task(t.id, t.texts, t.label, image_size, style, source, version=version)
                )
        else:
            kind = symbola_sequence_kind(cps)
            if kind:
                reason = f"{kind}: not one Symbola glyph (emoji {version})"
                tasks.append(Bad(t.id, reason, skipped=True))
            else:
                char = "".join(chr(c) for c in cps if c != emoji.VS16)
                tasks.append(Task(t.id, t.texts, t.label, image_size, style, char, path, version))
    return tasks


def coverage(plan_: Plan, summary: shard_writer.Summary, split_name: str = SPLIT) -> dict:
    """How many emoji of a split (the held-out ones by default) the style covers, and why
    each of the others was left out."""
    split = summary.splits[split_name]
    skipped = [b for sp, b in summary.bad if b.skipped and sp == split_name]
    by_version = Counter(
        m.group(1) for b in skipped if (m := re.search(r"emoji (E\d+\.\d+)", b.reason))
    )
    return {
        f"{split_name}_emoji": len(plan_.splits[split_name]),
        "covered": split.num_records,
        "skipped": split.num_skipped,
        "bad": split.num_bad,
        "skipped_by_reason": dict(Counter(reason_kind(b.reason) for b in skipped).most_common()),
        "skipped_by_emoji_version": dict(
            sorted(by_version.items(), key=lambda kv: tuple(map(int, kv[0][1:].split("."))))
        ),
    }


def write_style(
    style: str,
    output_dir: str,
    *,
    workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    **plan_kwargs,
) -> tuple[shard_writer.Summary, dict]:
    """Writes OUTPUT_DIR/emoji_styles/STYLE-test-* (and STYLE-train-* when `splits` in
    `plan_kwargs` names it; see the module doc); returns the writer's summary and the test
    split's `coverage` counts, with the train split's under "train", which it also logs."""
    p = plan(style, **plan_kwargs)
    summary = shard_writer.write_plan(
        p,
        os.path.join(output_dir, "emoji_styles", style),
        num_shards=1,
        workers=workers,
        progress=progress,
    )
    log(summary.line())
    counts: dict = {}
    for split_name in p.splits:
        c = coverage(p, summary, split_name)
        reasons = ", ".join(f"{n} {k}" for k, n in c["skipped_by_reason"].items())
        which = "held-out" if split_name == SPLIT else "training"
        log(
            f"emoji_styles/{style}: covers {c['covered']} of {c[f'{split_name}_emoji']} {which} "
            f"emoji; skipped {c['skipped']} ({reasons or 'none'}); bad {c['bad']}; "
            f"each listed in {summary.bad_files_path}"
        )
        if split_name == SPLIT:
            counts.update(c)
        else:
            counts[split_name] = c
    return summary, counts
