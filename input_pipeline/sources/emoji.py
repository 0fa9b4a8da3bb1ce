"""Emoji image-text pairs: Noto Color Emoji glyphs with their Unicode names and CLDR keywords.

Inputs (Debian packages unicode-data, unicode-cldr-core, fonts-noto-color-emoji):
- emoji-test.txt: one line per emoji sequence; only `fully-qualified` ones are kept, under
  their `# group:` / `# subgroup:` headers.
- CLDR annotations (en.xml and annotationsDerived/en.xml): keywords per emoji, matched on the
  sequence with U+FE0F removed.
- NotoColorEmoji.ttf: a CBDT bitmap font, drawable by Pillow only at size 109.

Records: label = subgroup index (class names "face smiling", ...), id =
"GROUP/subgroup/CODEPOINTS", and the group of each label in PREFIX-groups.json. Train/test
are split by base emoji (skin tones removed) so near-duplicate variants never straddle splits.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont, features

from input_pipeline.sources.shard_writer import Bad, ImageOptions, Plan, Record, encode_image

EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
ANNOTATIONS = (
    "/usr/share/unicode/cldr/common/annotations/en.xml",
    "/usr/share/unicode/cldr/common/annotationsDerived/en.xml",
)
FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_SIZE = 109  # the only strike of the bitmap font; other sizes fail to draw
SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))  # Fitzpatrick modifiers U+1F3FB..U+1F3FF
VS16 = 0xFE0F  # emoji presentation selector
_LINE = re.compile(r"^([0-9A-Fa-f ]+?)\s*;\s*([a-z-]+)\s*#\s*\S+\s+E\d+\.\d+\s+(.+?)\s*$")


@dataclasses.dataclass(frozen=True)
class Emoji:
    codepoints: tuple[int, ...]
    name: str
    group: str
    subgroup: str

    @property
    def text(self) -> str:
        return "".join(map(chr, self.codepoints))

    @property
    def hex(self) -> str:
        return "-".join(f"{c:04X}" for c in self.codepoints)


def parse_emoji_test(path: str = EMOJI_TEST) -> list[Emoji]:
    """The fully-qualified emoji of emoji-test.txt, in file (CLDR) order."""
    group = subgroup = ""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
            elif line.startswith("# subgroup:"):
                subgroup = line.split(":", 1)[1].strip()
            elif line.strip() and not line.startswith("#"):
                m = _LINE.match(line)
                if m is None:
                    raise ValueError(f"{path}: cannot parse line {line!r}")
                if m.group(2) == "fully-qualified":
                    cps = tuple(int(c, 16) for c in m.group(1).split())
                    out.append(Emoji(cps, m.group(3), group, subgroup))
    if not out:
        raise ValueError(f"{path}: no fully-qualified emoji found")
    return out


def load_keywords(paths: Iterable[str] = ANNOTATIONS) -> dict[str, list[str]]:
    """CLDR keywords per emoji (key: the emoji string without U+FE0F), first file wins."""
    keywords: dict[str, list[str]] = {}
    for path in paths:
        for el in ET.parse(path).getroot().iter("annotation"):
            if el.get("type") == "tts" or not el.text:
                continue
            key = el.get("cp", "").replace(chr(VS16), "")
            words = [w.strip() for w in el.text.split("|") if w.strip()]
            keywords.setdefault(key, words)
    return keywords


def readable(subgroup: str) -> str:
    """ "face-smiling" -> "face smiling"."""
    return subgroup.replace("-", " ")


def _strip_tone_name(name: str) -> str:
    """ "kiss: woman, man, medium skin tone" -> "kiss: woman, man"; "waving hand: dark skin
    tone" -> "waving hand". A qualifier list left holding only "person" means the generic
    form ("kiss: person, person, ..." -> "kiss")."""
    if ": " not in name:
        return name
    head, tail = name.split(": ", 1)
    quals = [q for q in tail.split(", ") if not q.endswith("skin tone")]
    if not quals or all(q == "person" for q in quals):
        return head
    return f"{head}: {', '.join(quals)}"


def base_groups(emoji: Sequence[Emoji]) -> list[str]:
    """For each emoji, the name of its base emoji: the earliest emoji it is linked to by equal
    tone-stripped code points (U+1F3FB..F and U+FE0F removed) or equal tone-stripped name."""
    parent = list(range(len(emoji)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple, int] = {}
    for i, e in enumerate(emoji):
        cps = tuple(c for c in e.codepoints if c not in SKIN_TONES and c != VS16)
        for key in (("cp", cps), ("name", _strip_tone_name(e.name))):
            j = first.setdefault(key, i)
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return [_strip_tone_name(emoji[find(i)].name) for i in range(len(emoji))]


def split_of(base: str, test_fraction: float) -> str:
    """Deterministic hash split: "test" for about `test_fraction` of the base emoji."""
    h = int.from_bytes(hashlib.sha256(base.encode("utf-8")).digest()[:8], "big")
    return "test" if h / 2.0**64 < test_fraction else "train"


CAPTION_TEMPLATES = ("an emoji of {}", "{} emoji")


def captions(e: Emoji, keywords: Sequence[str]) -> tuple[str, ...]:
    """Every text of an emoji: its CLDR name (always first: evaluators and the tokens of an
    eval record take texts[0]), the name in each of `CAPTION_TEMPLATES`, each CLDR keyword
    on its own, and the joined keyword list. Deduplicated ignoring case and spacing, order
    kept; the pipeline draws one of them per step, so each is a real pair."""
    texts = [e.name, *(t.format(e.name) for t in CAPTION_TEMPLATES), *keywords]
    if len(keywords) > 1:
        texts.append(", ".join(keywords))
    seen: dict[str, str] = {}
    for text in texts:
        text = " ".join(text.split())
        if text:
            seen.setdefault(text.casefold(), text)
    return tuple(seen.values())


@functools.lru_cache(maxsize=2)
def _font(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, FONT_SIZE)


def render(text: str, image_size: int, font_path: str = FONT) -> Image.Image:
    """Draws one emoji: RGBA canvas, crop to the alpha box, pad square on white, resize.

    Raises ValueError when the glyph is empty or comes out as several glyphs side by side
    (a sequence the font or the text shaper cannot ligate).
    """
    font = _font(font_path)
    probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font, embedded_color=True)
    width, height = max(1, right), max(1, bottom)
    canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), text, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        raise ValueError("glyph renders empty (no alpha)")
    advance, one = font.getlength(text), font.getlength("\U0001f600")
    if advance > 1.5 * one:
        raise ValueError(
            f"shaped as {advance / one:.1f} glyphs, not one (a sequence the font or the "
            "text shaper cannot join; is raqm available?)"
        )
    return square_on_white(canvas.crop(box), image_size)


def square_on_white(glyph: Image.Image, image_size: int) -> Image.Image:
    """An RGBA glyph pasted centred on a white square of its longer side, resized (LANCZOS)
    to `image_size`: every emoji art style goes through this one framing."""
    w, h = glyph.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(glyph, ((side - w) // 2, (side - h) // 2), mask=glyph.getchannel("A"))
    if side != image_size:
        square = square.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return square


@dataclasses.dataclass(frozen=True)
class Task:
    id: str
    text: str
    texts: tuple[str, ...]
    label: int
    image_size: int
    font_path: str


def process(task: Task, options: ImageOptions) -> Record | Bad:
    """Renders and encodes one emoji."""
    try:
        img = render(task.text, task.image_size, task.font_path)
    except (ValueError, OSError) as e:
        return Bad(task.id, str(e))
    return Record(task.id, encode_image(img, options), task.texts, task.label)


def check_raqm() -> bool:
    """Warns when Pillow lacks raqm: ZWJ sequences, flags and skin tones then come out as
    several glyphs (and are reported as bad) instead of one."""
    ok = bool(features.check("raqm"))
    if not ok:
        warnings.warn(
            "Pillow has no raqm (PIL.features.check('raqm') is False): emoji sequences will "
            "not shape into single glyphs. Install the PyPI Pillow wheel, which bundles it.",
            stacklevel=2,
        )
    return ok


def plan(
    *,
    limit: int | None = None,
    test_fraction: float = 0.2,
    image_size: int = 128,
    emoji_test: str = EMOJI_TEST,
    annotations: Sequence[str] = ANNOTATIONS,
    font_path: str = FONT,
) -> Plan:
    """Train/test tasks for every fully-qualified emoji (the first `limit` in file order)."""
    check_raqm()
    emoji = parse_emoji_test(emoji_test)
    keywords = load_keywords(annotations)
    bases = base_groups(emoji)
    subgroups = list(dict.fromkeys(e.subgroup for e in emoji))
    groups = list(dict.fromkeys(e.group for e in emoji))
    label_of = {s: i for i, s in enumerate(subgroups)}
    group_of = {e.subgroup: e.group for e in emoji}
    group_of_label = [groups.index(group_of[s]) for s in subgroups]
    splits: dict[str | None, list[Task]] = {"train": [], "test": []}
    chosen = list(zip(emoji, bases, strict=True))[: limit if limit else None]
    for e, base in chosen:
        kw = keywords.get(e.text.replace(chr(VS16), ""), [])
        task = Task(
            id=f"{e.group}/{e.subgroup}/{e.hex}",
            text=e.text,
            texts=captions(e, kw),
            label=label_of[e.subgroup],
            image_size=image_size,
            font_path=font_path,
        )
        splits[split_of(base, test_fraction)].append(task)
    return Plan(
        name="emoji",
        splits=splits,
        process=process,
        classnames=[readable(s) for s in subgroups],
        default_format="jpeg",
        side_files={"groups.json": {"groups": groups, "group_of_label": group_of_label}},
    )
