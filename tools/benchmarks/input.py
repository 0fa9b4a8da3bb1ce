"""Host input benchmark: our SLIP 3-view pipeline against SLIP's PIL recipe, on one core.

    python -m tools.benchmarks.input --out input.json

Records are real images (Debian's OpenClipArt PNGs when installed, else Noto colour emoji)
scaled to photo sizes (500x375 .. 640x480, both orientations) and JPEG-encoded at q95 in
memory. All pipelines run in this one process, pinned to one CPU, alternating rounds so
that load from other processes hits all alike.

- ours: `transforms.multi_crop` -> decode once (JPEG DCT draft scaling when every crop
  allows it), CLIP crop (scale 0.5-1) and two SSL crops (scale 0.08-1, flip), uint8 out.
  Photometric work happens later on the accelerator. `ours_multi_crop` uses the default
  resampler (OpenCV when installed), `ours_pillow` the Pillow one (the path before OpenCV):
  same crop boxes, same decode.
- decode-only ceilings on the same records: `decode_full` (Pillow decode to an RGB array,
  nothing else) and `decode_draft_half` (the same at 1/2 DCT scale: the cost when draft
  could halve every image; on photo-sized records the CLIP crop never allows it, see
  `draft_scales`).
- SLIP's recipe, written with PIL + numpy the way torchvision runs it on PIL images:
  RandomResizedCrop (crop + bilinear resize), ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8 in
  random order (ImageEnhance; hue through HSV), RandomGrayscale p=0.2, GaussianBlur
  (PIL, radius U(0.1, 2)) p=0.5, flip, ToTensor (CHW float / 255) and Normalize.
  Two variants: `slip_per_view_decode` opens + converts the JPEG separately for each view
  (three independent torchvision pipelines); `slip_decode_once` decodes once per sample,
  as SLIP's ImageCaptionDatasetSLIP does.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from input_pipeline import transforms  # noqa: E402
from tools.benchmarks.emit import emit  # noqa: E402

OPENCLIPART_DIR = "/usr/share/openclipart/png"
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
PHOTO_SIZES = ((500, 375), (512, 384), (560, 420), (600, 450), (640, 480))
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


# ----------------------------------------------------------------------------------------
# Records


def _openclipart_images(n: int, rng: np.random.Generator) -> list[Image.Image]:
    paths = sorted(glob.glob(os.path.join(OPENCLIPART_DIR, "**", "*.png"), recursive=True))
    images = []
    for i in rng.permutation(len(paths)):
        with open(paths[i], "rb") as f:
            data = f.read()
        try:
            arr = transforms.decode_image(data, where=paths[i])
        except transforms.BadImageError:
            continue
        if min(arr.shape[:2]) >= 64:  # skip icons and thin strips
            images.append(Image.fromarray(arr))
        if len(images) == n:
            break
    return images


def _emoji_images(n: int) -> list[Image.Image]:
    font = ImageFont.truetype(EMOJI_FONT, 109)  # the font's only bitmap size
    images = []
    for cp in range(0x1F300, 0x1FAFF):
        canvas = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((0, 0), chr(cp), font=font, embedded_color=True)
        box = canvas.getbbox()
        if box is None or box[2] - box[0] < 32 or box[3] - box[1] < 32:
            continue
        white = Image.new("RGB", canvas.size, (255, 255, 255))
        white.paste(canvas, mask=canvas.getchannel("A"))
        images.append(white)
        if len(images) == n:
            break
    return images


def make_records(
    n: int, seed: int = 0, source: str = "auto", quality: int = 95
) -> tuple[list[bytes], str]:
    """Returns `n` JPEG byte strings of real images at photo sizes, and the source used."""
    rng = np.random.default_rng(seed)
    if source == "auto":
        source = "openclipart" if os.path.isdir(OPENCLIPART_DIR) else "emoji"
    if source == "openclipart":
        images = _openclipart_images(n, rng)
    elif source == "emoji":
        if not os.path.exists(EMOJI_FONT):
            raise FileNotFoundError(f"no image source: neither {OPENCLIPART_DIR} nor {EMOJI_FONT}")
        images = _emoji_images(n)
    else:
        raise ValueError(f"unknown source {source!r}")
    if not images:
        raise RuntimeError(f"no images found in source {source!r}")
    records = []
    for i in range(n):
        w, h = PHOTO_SIZES[rng.integers(len(PHOTO_SIZES))]
        if rng.random() < 0.25:  # some portrait photos
            w, h = h, w
        im = images[i % len(images)].resize((w, h), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        records.append(buf.getvalue())
    return records, source


# ----------------------------------------------------------------------------------------
# SLIP's recipe on PIL (what torchvision does with PIL images)


def _pil_random_resized_crop(img: Image.Image, rng, size: int, scale) -> Image.Image:
    left, top, w, h = transforms.sample_crop(rng, img.width, img.height, scale)
    return img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)


def _pil_adjust_hue(img: Image.Image, factor: float) -> Image.Image:
    h, s, v = img.convert("HSV").split()
    hue = np.array(h, np.uint8)
    hue += np.uint8(int(factor * 255) % 256)  # wraps around, as torchvision's uint8 add
    return Image.merge("HSV", (Image.fromarray(hue, "L"), s, v)).convert("RGB")


def _pil_color_jitter(img: Image.Image, rng, b=0.4, c=0.4, s=0.4, hue=0.1) -> Image.Image:
    order = rng.permutation(4)
    fb, fc, fs = (rng.uniform(1 - x, 1 + x) for x in (b, c, s))
    fh = rng.uniform(-hue, hue)
    for k in order:
        if k == 0:
            img = ImageEnhance.Brightness(img).enhance(fb)
        elif k == 1:
            img = ImageEnhance.Contrast(img).enhance(fc)
        elif k == 2:
            img = ImageEnhance.Color(img).enhance(fs)
        else:
            img = _pil_adjust_hue(img, fh)
    return img


def _to_tensor_normalize(img: Image.Image) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)).astype(np.float32) / 255.0
    x -= MEAN
    x /= STD
    return x


def _pil_ssl_view(img: Image.Image, rng, size: int) -> np.ndarray:
    img = _pil_random_resized_crop(img, rng, size, (0.08, 1.0))
    if rng.random() < 0.8:
        img = _pil_color_jitter(img, rng)
    if rng.random() < 0.2:
        grey = np.asarray(img.convert("L"))
        img = Image.fromarray(np.dstack([grey, grey, grey]), "RGB")
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_tensor_normalize(img)


def _pil_load(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def slip_per_view_decode(data: bytes, rng, size: int = 224) -> list[np.ndarray]:
    clip = _to_tensor_normalize(_pil_random_resized_crop(_pil_load(data), rng, size, (0.5, 1.0)))
    return [
        clip,
        _pil_ssl_view(_pil_load(data), rng, size),
        _pil_ssl_view(_pil_load(data), rng, size),
    ]


def slip_decode_once(data: bytes, rng, size: int = 224) -> list[np.ndarray]:
    img = _pil_load(data)
    clip = _to_tensor_normalize(_pil_random_resized_crop(img, rng, size, (0.5, 1.0)))
    return [clip, _pil_ssl_view(img, rng, size), _pil_ssl_view(img, rng, size)]


def ours(data: bytes, rng, size: int = 224) -> list[np.ndarray]:
    return transforms.multi_crop(data, rng, transforms.slip_crop_specs(size))


def ours_pillow(data: bytes, rng, size: int = 224) -> list[np.ndarray]:
    return transforms.multi_crop(data, rng, transforms.slip_crop_specs(size), resampler="pillow")


def decode_full(data: bytes, rng, size: int = 224) -> np.ndarray:
    return transforms.decode_image(data)


def decode_draft_half(data: bytes, rng, size: int = 224) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (im.width // 2, im.height // 2))
    return np.asarray(im.convert("RGB"))


def draft_scales(records: Sequence[bytes], size: int, seed: int) -> dict[str, int]:
    """How often `multi_crop` may decode at 1/s (s = 1, 2, 4, 8) for SLIP's three crops."""
    rng = np.random.default_rng(seed)
    specs = transforms.slip_crop_specs(size)
    counts: dict[str, int] = {}
    for data in records:
        width, height = Image.open(io.BytesIO(data)).size
        boxes, _ = transforms.sample_boxes(rng, width, height, specs)
        ratio = min(min(b[2], b[3]) / spec.size for b, spec in zip(boxes, specs, strict=True))
        s = str(transforms._draft_scale(ratio))
        counts[s] = counts.get(s, 0) + 1
    return counts


# ----------------------------------------------------------------------------------------
# Timing


def _time_chunk(fn: Callable, chunk: Sequence[bytes], rng, size: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) to run `fn` over `chunk`."""
    wall, cpu = time.perf_counter(), time.process_time()
    for data in chunk:
        fn(data, rng, size)
    return time.perf_counter() - wall, time.process_time() - cpu


def _pin_one_core() -> int | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def run(args) -> dict:
    """Builds the records, times every pipeline on one core and returns the results.

    Pipelines alternate every `chunk` records (in rotating order), so load from other
    processes on the machine hits all of them alike. The headline rate is samples per CPU
    second of this single-threaded process (robust to time-sharing on a busy machine); wall
    clock rates are reported too.
    """
    core = _pin_one_core() if args.pin else None
    records, source = make_records(args.num_images, args.seed, args.source)
    pipelines = {
        "ours_multi_crop": ours,
        "ours_pillow": ours_pillow,
        "slip_per_view_decode": slip_per_view_decode,
        "slip_decode_once": slip_decode_once,
        "decode_full": decode_full,
        "decode_draft_half": decode_draft_half,
    }
    names = list(pipelines)
    for fn in pipelines.values():  # warm up (imports, caches)
        _time_chunk(fn, records[:10], np.random.default_rng(0), args.size)
    cpu = {k: [] for k in names}
    wall = {k: [] for k in names}
    for r in range(args.rounds):
        rngs = {k: np.random.default_rng(args.seed + r) for k in names}
        totals = {k: [0.0, 0.0] for k in names}
        for c, start in enumerate(range(0, len(records), args.chunk)):
            chunk = records[start : start + args.chunk]
            for name in names[c % len(names) :] + names[: c % len(names)]:
                w, t = _time_chunk(pipelines[name], chunk, rngs[name], args.size)
                totals[name][0] += w
                totals[name][1] += t
        for name in names:
            wall[name].append(len(records) / totals[name][0])
            cpu[name].append(len(records) / totals[name][1])
    cpu_rate = {k: float(np.median(v)) for k, v in cpu.items()}
    wall_rate = {k: float(np.median(v)) for k, v in wall.items()}
    sizes = [Image.open(io.BytesIO(d)).size for d in records]
    return {
        "benchmark": "input_pipeline_slip_3view",
        "image_size": args.size,
        "num_images": len(records),
        "image_source": source,
        "mean_jpeg_kib": float(np.mean([len(d) for d in records]) / 1024),
        "mean_pixels": float(np.mean([w * h for w, h in sizes])),
        "rounds": args.rounds,
        "pinned_core": core,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "samples_per_cpu_s": cpu_rate,
        "samples_per_wall_s": wall_rate,
        "resampler": transforms.default_resampler(),
        "opencv": transforms._cv2.__version__ if transforms._cv2 is not None else None,
        "draft_scales": draft_scales(records, args.size, args.seed),
        "speedup_vs_slip_per_view_decode": cpu_rate["ours_multi_crop"]
        / cpu_rate["slip_per_view_decode"],
        "speedup_vs_slip_decode_once": cpu_rate["ours_multi_crop"] / cpu_rate["slip_decode_once"],
        "pillow_path_speedup_vs_slip_per_view_decode": cpu_rate["ours_pillow"]
        / cpu_rate["slip_per_view_decode"],
        "speedup_vs_ours_pillow": cpu_rate["ours_multi_crop"] / cpu_rate["ours_pillow"],
        "fraction_of_decode_ceiling": cpu_rate["ours_multi_crop"] / cpu_rate["decode_full"],
        "wall_speedup_vs_slip_per_view_decode": wall_rate["ours_multi_crop"]
        / wall_rate["slip_per_view_decode"],
        "wall_speedup_vs_slip_decode_once": wall_rate["ours_multi_crop"]
        / wall_rate["slip_decode_once"],
        "samples_per_cpu_s_all_rounds": cpu,
        "python": platform.python_version(),
        "pillow": Image.__version__,
        "numpy": np.__version__,
        "cpu": platform.processor() or platform.machine(),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num_images", type=int, default=300)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chunk", type=int, default=20, help="records per alternation slot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", choices=("auto", "openclipart", "emoji"), default="auto")
    p.add_argument("--no_pin", dest="pin", action="store_false", help="do not pin to one CPU")
    p.add_argument("--out", help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    return emit(run(args), args.out)


if __name__ == "__main__":
    main()
