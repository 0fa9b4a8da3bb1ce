"""Host-side image transforms: decode, random resized crop, flip, eval resize (numpy uint8).

Everything here runs per record in the grain workers, so it is built for speed:
- the image size is read from the header and checked against `max_pixels` before any pixel
  is decoded (decompression bombs are rejected cheaply);
- a JPEG is decoded at 1/2, 1/4 or 1/8 scale (`Image.draft`, DCT scaling in libjpeg) when
  every requested crop is at least that many times larger than its output;
- `multi_crop` decodes once and cuts several views (SLIP: one CLIP crop and two SSL crops);
- resampling (`resampler=`) is OpenCV when `opencv-python-headless` is installed, else
  Pillow. Pillow: one antialiased bilinear `Image.resize(size, box=...)` per view. OpenCV
  (2-4x faster per view on one core; tools/benchmarks/input.py measures it): bilinear
  `cv2.resize` of the crop; when shrinking by f > 1 a Gaussian prefilter of variance
  (f^2 - 1) / 6 first, so the total kernel has the variance of Pillow's antialiasing
  triangle (f^2 / 6). Mean abs difference to Pillow: well under one grey level.

Outputs are uint8 RGB; photometric augmentation and float conversion happen on the device
(input_pipeline/augment.py). Random numbers come from the caller's `np.random.Generator`
(grain gives one per record), so a record's crops are reproducible.

The crop sampling follows torchvision's RandomResizedCrop (10 tries, then a centre crop
clipped to the aspect-ratio range); resizing is antialiased bilinear (Pillow's filter, as
torchvision uses on PIL images, or its OpenCV match above). EXIF orientation is not applied
(torchvision does not either).
"""

from __future__ import annotations

import dataclasses
import io
import math
import struct
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

try:  # Optional (setup.py extra "opencv"): a faster crop-resize; Pillow otherwise.
    import cv2 as _cv2

    _cv2.setNumThreads(1)  # one record per worker process: no threads inside a resize
except ImportError:  # pragma: no cover - depends on the environment
    _cv2 = None

# Pillow's own default limit (about 0.25 GiB of RGBA): larger images are rejected.
MAX_PIXELS = 89_478_485
# Passed to Image.resize: shrink by an integer factor with box averaging first when the
# remaining downscale is at least 2 * REDUCING_GAP (Pillow: >= 3 is near-identical to a
# plain resize). With draft decoding this rarely triggers; it bounds the cost for PNGs.
REDUCING_GAP = 3.0
_BILINEAR = Image.Resampling.BILINEAR
RESAMPLERS = ("opencv", "pillow")
_WHITE = (255, 255, 255)
# Errors Pillow's plugins raise on malformed data; all become BadImageError.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    KeyError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


class BadImageError(ValueError):
    """An image that cannot be decoded; `where` names the record (file@offset, id, ...)."""

    def __init__(self, where: str, reason: str):
        self.where = where
        self.reason = reason
        super().__init__(f"bad image {where or '<unknown>'}: {reason}")


@dataclasses.dataclass(frozen=True)
class CropSpec:
    """One random-resized-crop view: output `size`, area `scale` and aspect `ratio` ranges,
    and whether to flip horizontally with probability 0.5."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False


def slip_crop_specs(size: int = 224) -> tuple[CropSpec, CropSpec, CropSpec]:
    """SLIP's three views: the CLIP crop (scale 0.5-1, no flip) and two SSL crops
    (scale 0.08-1, flipped with p=0.5)."""
    ssl = CropSpec(size, (0.08, 1.0), flip=True)
    return CropSpec(size, (0.5, 1.0)), ssl, ssl


# ----------------------------------------------------------------------------------------
# Opening and converting


def _open(data, where: str, max_pixels: int) -> Image.Image:
    """Opens encoded bytes lazily (header only) and rejects images over `max_pixels`."""
    if isinstance(data, Image.Image):
        return data
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim not in (2, 3):
            raise ValueError(f"expected a uint8 [H, W(, C)] array, got {data.dtype} {data.shape}")
        return Image.fromarray(data)
    if not _is_encoded(data):
        raise TypeError(f"expected encoded bytes, a uint8 array or a PIL image, got {type(data)}")
    if len(data) == 0:
        raise BadImageError(where, "zero bytes")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # Pillow's global 2x limit fired first.
        raise BadImageError(where, f"decompression bomb: {e}") from e
    except _DECODE_ERRORS as e:
        raise BadImageError(where, f"cannot identify image: {e}") from e
    w, h = im.size
    if w <= 0 or h <= 0:
        raise BadImageError(where, f"empty image size {w}x{h}")
    if w * h > max_pixels:
        raise BadImageError(
            where, f"decompression bomb: {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}"
        )
    return im


def _is_encoded(data) -> bool:
    """True for encoded bytes (an image we open, and may draft, ourselves)."""
    return isinstance(data, (bytes, bytearray, memoryview))


def _to_rgb(im: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB; transparency is composited on white."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey (PNG/TIFF): map 0..65535 to 0..255 with rounding.
        a = np.asarray(im).astype(np.uint32)
        a = ((np.clip(a, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(a[..., None], 3, axis=-1))
    if mode == "F":
        a = np.clip(np.asarray(im), 0, 255).round().astype(np.uint8)
        return Image.fromarray(np.repeat(a[..., None], 3, axis=-1))
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _as_array(im: Image.Image) -> np.ndarray:
    a = np.asarray(im)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:  # defensive: never expected
        raise ValueError(f"internal: expected uint8 RGB, got {a.dtype} {a.shape}")
    return a


def _draft(im: Image.Image, scale: int) -> int:
    """Asks a JPEG (or MPO) to decode at 1/scale (scale in 1, 2, 4, 8); returns the scale
    obtained (1 for other formats, whose `draft` is a no-op returning None)."""
    if scale <= 1:
        return 1
    w, h = im.size
    # draft picks the largest scale s in (8, 4, 2, 1) with s <= min(w // rw, h // rh); for
    # (rw, rh) = (w // scale, h // scale) that is exactly `scale`.
    res = im.draft("RGB", (w // scale, h // scale))
    if res is None:
        return 1
    return max(1, round(w / res[1][2]))


def _draft_scale(min_ratio: float) -> int:
    """Largest JPEG DCT scale that keeps every crop at least as large as its output."""
    for s in (8, 4, 2):
        if min_ratio >= s:
            return s
    return 1


def decode_image(
    data: bytes,
    *,
    where: str = "",
    max_pixels: int = MAX_PIXELS,
    draft_size: int | None = None,
) -> np.ndarray:
    """Decodes JPEG/PNG/... bytes to uint8 RGB [H, W, 3].

    Grey, LA, P, RGBA (composited on white), CMYK and 16-bit images become RGB. With
    `draft_size`, a JPEG may decode at 1/2..1/8 scale as long as its short side stays
    >= draft_size. Raises BadImageError (naming `where`) for zero bytes, unknown formats,
    truncated data and images over `max_pixels` (checked from the header, before decoding).
    """
    im = _open(data, where, max_pixels)
    try:
        if draft_size:
            _draft(im, _draft_scale(min(im.size) / draft_size))
        return _as_array(_to_rgb(im))
    except BadImageError:
        raise
    except _DECODE_ERRORS as e:
        raise BadImageError(where, f"decode failed: {e}") from e


# ----------------------------------------------------------------------------------------
# Random resized crop


def sample_crop(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Samples a crop box (left, top, w, h) like torchvision's RandomResizedCrop: up to 10
    tries of area ~ U(scale) * area and log-aspect ~ U(log ratio) that fit; else a centre
    crop of the whole image clipped to the ratio range."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = rng.random(4)
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            # Uniform integer offsets in [0, width - w] and [0, height - h].
            left = min(int(u[2] * (width - w + 1)), width - w)
            top = min(int(u[3] * (height - h + 1)), height - h)
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def default_resampler() -> str:
    """ "opencv" when cv2 imports, else "pillow"."""
    return "opencv" if _cv2 is not None else "pillow"


def _check_resampler(resampler: str | None) -> str:
    resampler = resampler or default_resampler()
    if resampler not in RESAMPLERS:
        raise ValueError(f"resampler must be one of {RESAMPLERS}, got {resampler!r}")
    if resampler == "opencv" and _cv2 is None:
        raise ImportError("resampler='opencv' needs opencv-python-headless (pip install)")
    return resampler


def _cv2_resize(
    a: np.ndarray, box: tuple[float, float, float, float], size: int, flip: bool
) -> np.ndarray:
    """Bilinear resize of `box` (left, top, right, bottom; pixel edges, may be fractional)
    of the uint8 [H, W, 3] array `a` to size x size, antialiased when shrinking.

    Like torchvision's crop-then-resize, only pixels of the crop are used (edges are
    replicated). A fractional box (after draft decoding) goes through `warpAffine` with the
    exact mapping; an integer box through `resize` (same mapping, faster).
    """
    left, top, right, bottom = box
    x0, y0 = int(math.floor(left)), int(math.floor(top))
    x1 = min(int(math.ceil(right)), a.shape[1])
    y1 = min(int(math.ceil(bottom)), a.shape[0])
    crop = a[y0:y1, x0:x1]
    fx, fy = (right - left) / size, (bottom - top) / size
    sx = math.sqrt((fx * fx - 1.0) / 6.0) if fx > 1.0 else 0.0
    sy = math.sqrt((fy * fy - 1.0) / 6.0) if fy > 1.0 else 0.0
    if sx > 0.0 or sy > 0.0:
        # Kernel radius 2 sigma (renormalized): 3 taps up to sigma 0.5 (f = 1.58), which
        # keeps the blur cheap; cv2 reads sigma 0 as "derive it from the kernel size".
        ksize = (2 * math.ceil(2 * sx) + 1, 2 * math.ceil(2 * sy) + 1)
        crop = _cv2.GaussianBlur(
            crop,
            ksize,
            sigmaX=max(sx, 1e-3),
            sigmaY=max(sy, 1e-3),
            borderType=_cv2.BORDER_REPLICATE,
        )
    if (left, top, right, bottom) == (x0, y0, x1, y1):
        out = _cv2.resize(crop, (size, size), interpolation=_cv2.INTER_LINEAR)
    else:
        # Inverse map: output pixel centre j + 0.5 -> input edge coordinate
        # left + (j + 0.5) * f, i.e. pixel-centre coordinate that minus 0.5.
        m = np.array([[fx, 0.0, left - x0 + 0.5 * fx - 0.5], [0.0, fy, top - y0 + 0.5 * fy - 0.5]])
        out = _cv2.warpAffine(
            crop,
            m,
            (size, size),
            flags=_cv2.INTER_LINEAR | _cv2.WARP_INVERSE_MAP,
            borderMode=_cv2.BORDER_REPLICATE,
        )
    if flip:
        out = _cv2.flip(out, 1)
    return out


def sample_boxes(
    rng: np.random.Generator, width: int, height: int, specs: Sequence[CropSpec]
) -> tuple[list[tuple[int, int, int, int]], list[bool]]:
    """Crop boxes (left, top, w, h) in original pixels and flips, in spec order (box, then
    flip): what `multi_crop` draws from `rng`, whatever the resampler or draft scale."""
    boxes, flips = [], []
    for spec in specs:
        boxes.append(sample_crop(rng, width, height, spec.scale, spec.ratio))
        flips.append(spec.flip and rng.random() < 0.5)
    return boxes, flips


def multi_crop(
    data,
    rng: np.random.Generator,
    specs: Sequence[CropSpec],
    *,
    where: str = "",
    max_pixels: int = MAX_PIXELS,
    draft: bool = True,
    resampler: str | None = None,
) -> list[np.ndarray]:
    """Decodes an image once and cuts one uint8 [size, size, 3] view per CropSpec.

    All crop boxes are sampled first (`sample_boxes`), so the JPEG can be decoded at the
    largest DCT scale that still leaves every crop >= its output size; the boxes are then
    mapped into the decoded image and each view is one bilinear resize (`resampler`:
    "opencv", "pillow" or None for `default_resampler()`).
    """
    resampler = _check_resampler(resampler)
    im = _open(data, where, max_pixels)
    width, height = im.size
    boxes, flips = sample_boxes(rng, width, height, specs)
    try:
        s = 1
        if draft and boxes and _is_encoded(data):
            min_ratio = min(
                min(b[2], b[3]) / spec.size for b, spec in zip(boxes, specs, strict=True)
            )
            s = _draft(im, _draft_scale(min_ratio))
        im = _to_rgb(im)
        out = []
        if resampler == "opencv":
            a = np.asarray(im)
            for (left, top, w, h), flip, spec in zip(boxes, flips, specs, strict=True):
                box = (left / s, top / s, (left + w) / s, (top + h) / s)
                out.append(_cv2_resize(a, box, spec.size, flip))
            return out
        for (left, top, w, h), flip, spec in zip(boxes, flips, specs, strict=True):
            box = (left / s, top / s, (left + w) / s, (top + h) / s)
            view = im.resize((spec.size, spec.size), _BILINEAR, box=box, reducing_gap=REDUCING_GAP)
            if flip:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            out.append(_as_array(view))
        return out
    except BadImageError:
        raise
    except _DECODE_ERRORS as e:
        raise BadImageError(where, f"decode failed: {e}") from e


def random_resized_crop(
    data_or_image,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    where: str = "",
    max_pixels: int = MAX_PIXELS,
    draft: bool = True,
    resampler: str | None = None,
) -> np.ndarray:
    """RandomResizedCrop of encoded bytes, a uint8 array or a PIL image -> uint8 [size, size, 3].

    With bytes, a JPEG is decoded at reduced scale when the crop is >= 2x the output.
    """
    spec = CropSpec(size, tuple(scale), tuple(ratio))
    views = multi_crop(
        data_or_image,
        rng,
        (spec,),
        where=where,
        max_pixels=max_pixels,
        draft=draft,
        resampler=resampler,
    )
    return views[0]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flips a [H, W, C] image left-right with probability 0.5."""
    if rng.random() < 0.5:
        return np.ascontiguousarray(image[:, ::-1])
    return image


# ----------------------------------------------------------------------------------------
# Evaluation


def resize_center_crop(
    image,
    size: int,
    resize_size: int | None = None,
    *,
    where: str = "",
    max_pixels: int = MAX_PIXELS,
    draft: bool = True,
) -> np.ndarray:
    """Eval transform: resize the short side to `resize_size` (default `size`, as SLIP's
    zero-shot eval; linear probing uses 256 for 224) and centre-crop `size` x `size`.

    Same geometry as torchvision's Resize(resize_size) + CenterCrop(size), done as one
    resize of the crop box. Accepts encoded bytes, a uint8 array or a PIL image.
    """
    resize_size = size if resize_size is None else resize_size
    if resize_size < size:
        raise ValueError(f"resize_size ({resize_size}) must be >= size ({size})")
    im = _open(image, where, max_pixels)
    width, height = im.size
    if width <= height:
        new_w, new_h = resize_size, int(resize_size * height / width)
    else:
        new_w, new_h = int(resize_size * width / height), resize_size
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    sx, sy = width / new_w, height / new_h
    try:
        s = _draft(im, _draft_scale(min(sx, sy))) if draft and _is_encoded(image) else 1
        box = (left * sx / s, top * sy / s, (left + size) * sx / s, (top + size) * sy / s)
        im = _to_rgb(im)
        return _as_array(im.resize((size, size), _BILINEAR, box=box, reducing_gap=REDUCING_GAP))
    except BadImageError:
        raise
    except _DECODE_ERRORS as e:
        raise BadImageError(where, f"decode failed: {e}") from e
