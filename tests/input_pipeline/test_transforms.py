"""Tests for input_pipeline/transforms.py on real (emoji) and synthetic images."""

import io
import math
import os
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile, ImageFont

from input_pipeline import transforms as T

EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def emoji():
    """A few real images: Noto colour emoji rendered on white, as RGB PIL images."""
    if not os.path.exists(EMOJI_FONT):
        pytest.skip(f"{EMOJI_FONT} not installed (Debian package fonts-noto-color-emoji)")
    font = ImageFont.truetype(EMOJI_FONT, 109)
    images = []
    for cp in (0x1F34E, 0x1F436, 0x1F697, 0x1F33B):  # apple, dog, car, sunflower
        canvas = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((0, 0), chr(cp), font=font, embedded_color=True)
        white = Image.new("RGB", canvas.size, (255, 255, 255))
        white.paste(canvas, mask=canvas.getchannel("A"))
        images.append(white)
    return images


@pytest.fixture(scope="module")
def photo(emoji) -> bytes:
    """A photo-sized JPEG (500x375, q95) of a real image."""
    return encode(emoji[1].resize((500, 375), Image.Resampling.BICUBIC), quality=95)


@pytest.fixture(scope="module")
def big_photo(emoji) -> bytes:
    return encode(emoji[0].resize((1600, 1200), Image.Resampling.BICUBIC), quality=95)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming width x height (1-bit grey) with a tiny, truncated IDAT: decoding it
    fails, so an error about the size proves the check ran before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------------
# decode_image


def test_decode_real_jpeg_and_png(emoji):
    for im in emoji:
        for data in (encode(im, quality=95), encode(im, "PNG")):
            out = T.decode_image(data)
            assert out.dtype == np.uint8 and out.shape == (128, 136, 3)
            assert np.abs(out.astype(int) - np.asarray(im)).mean() < 3


def _mode_image(mode: str) -> Image.Image:
    rgb = Image.new("RGB", (40, 30), (200, 30, 60))
    ImageDraw.Draw(rgb).rectangle((0, 0, 19, 29), fill=(10, 220, 90))
    if mode == "RGBA":
        im = rgb.convert("RGBA")
        im.putalpha(Image.new("L", im.size, 255))
        ImageDraw.Draw(im).rectangle((0, 0, 9, 9), fill=(0, 0, 0, 0))  # transparent corner
        return im
    if mode == "LA":
        im = rgb.convert("LA")
        ImageDraw.Draw(im).rectangle((0, 0, 9, 9), fill=(0, 0))
        return im
    if mode in ("P", "P_transparent"):
        im = Image.new("P", rgb.size, 0)
        im.putpalette([200, 30, 60, 10, 220, 90, 0, 0, 0])
        ImageDraw.Draw(im).rectangle((0, 0, 19, 29), fill=1)
        if mode == "P_transparent":
            ImageDraw.Draw(im).rectangle((0, 0, 9, 9), fill=2)
        return im
    return rgb.convert(mode)


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("RGB", "PNG"),
        ("L", "PNG"),
        ("L", "JPEG"),
        ("1", "PNG"),
        ("P", "PNG"),
        ("P_transparent", "PNG"),
        ("LA", "PNG"),
        ("RGBA", "PNG"),
        ("CMYK", "JPEG"),
        ("RGB", "BMP"),
        ("RGB", "WEBP"),
    ],
)
def test_modes_become_rgb(mode, fmt):
    im = _mode_image(mode)
    kw = {"transparency": 2} if mode == "P_transparent" else {}
    out = T.decode_image(encode(im, fmt, **kw))
    assert out.dtype == np.uint8 and out.shape == (30, 40, 3)
    if mode in ("RGBA", "LA", "P_transparent"):
        np.testing.assert_array_equal(out[:10, :10], 255)  # composited on white
    if mode in ("RGB", "RGBA", "P", "P_transparent") and fmt in ("PNG", "BMP"):
        np.testing.assert_array_equal(out[15, 30], (200, 30, 60))
    if mode in ("L", "LA", "1"):
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    if mode == "CMYK":  # the red/green halves survive the CMYK round trip
        assert out[15, 30, 0] > 150 and out[15, 5, 1] > 150


def test_sixteen_bit_grey():
    values = np.array([[0, 257, 32768, 65535]], np.uint16).repeat(3, axis=0)
    im = Image.fromarray(values)
    assert im.mode.startswith("I;16")
    out = T.decode_image(encode(im, "PNG"))
    assert out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    assert (out[..., 0] == out[..., 2]).all()


def test_decompression_bomb_rejected_from_header():
    bomb = png_header_only(20000, 20000)  # Pillow's own 2x limit fires inside open
    assert len(bomb) < 200
    with pytest.raises(T.BadImageError, match="decompression bomb") as e:
        T.decode_image(bomb, where="shard-0@123")
    assert "shard-0@123" in str(e.value)
    # Over our limit but under Pillow's error limit: our header check must reject it before
    # any decoding (decoding this file would raise a truncation error instead).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        start = time.perf_counter()
        for fn in (
            lambda d: T.decode_image(d, where="w"),
            lambda d: T.random_resized_crop(d, np.random.default_rng(0), 32, where="w"),
            lambda d: T.multi_crop(d, np.random.default_rng(0), T.slip_crop_specs(32), where="w"),
            lambda d: T.resize_center_crop(d, 32, where="w"),
        ):
            with pytest.raises(T.BadImageError, match="max_pixels"):
                fn(png_header_only(12000, 12000))
        assert time.perf_counter() - start < 1.0
    with pytest.raises(T.BadImageError, match="max_pixels=1000000"):
        T.decode_image(png_header_only(2000, 2000), max_pixels=1_000_000)
    # Within the limit the same file is decoded and fails as truncated: the check is real.
    with pytest.raises(T.BadImageError) as e:
        T.decode_image(png_header_only(2000, 2000), max_pixels=10_000_000)
    assert "max_pixels" not in str(e.value)


def test_truncated_jpeg(photo):
    truncated = photo[: len(photo) // 2]
    with pytest.raises(T.BadImageError, match="rec-7"):
        T.decode_image(truncated, where="rec-7")
    with pytest.raises(T.BadImageError):
        T.random_resized_crop(truncated, np.random.default_rng(0), 64)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # never switched on globally


def test_zero_and_garbage_bytes():
    with pytest.raises(T.BadImageError, match="zero bytes"):
        T.decode_image(b"", where="x")
    with pytest.raises(T.BadImageError, match="cannot identify"):
        T.decode_image(b"not an image at all" * 10)
    with pytest.raises(T.BadImageError):
        T.multi_crop(b"", np.random.default_rng(0), T.slip_crop_specs(16))


def test_decode_draft_size(big_photo):
    full = T.decode_image(big_photo)
    small = T.decode_image(big_photo, draft_size=300)
    assert full.shape == (1200, 1600, 3)
    assert small.shape == (300, 400, 3)  # 1/4 scale: short side still >= 300
    assert T.decode_image(big_photo, draft_size=1000).shape == (1200, 1600, 3)


# ----------------------------------------------------------------------------------------
# Crops


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.5, 1.0)])
def test_crop_scale_and_ratio_ranges(scale):
    rng = np.random.default_rng(0)
    width, height = 500, 375
    boxes = np.array([T.sample_crop(rng, width, height, scale) for _ in range(3000)])
    left, top, w, h = boxes.T
    assert (left >= 0).all() and (top >= 0).all()
    assert (left + w <= width).all() and (top + h <= height).all()
    frac = w * h / (width * height)
    assert frac.min() >= scale[0] * 0.97 and frac.max() <= 1.0
    assert frac.min() < scale[0] + 0.05 and frac.max() > 0.95  # the range is covered
    aspect = w / h
    assert aspect.min() > 0.74 and aspect.max() < 1.35
    # Offsets are spread over the free range, not pinned to a corner.
    free = (width - w).astype(float)
    rel = left[free > 50] / free[free > 50]
    assert 0.4 < rel.mean() < 0.6 and rel.min() < 0.1 and rel.max() > 0.9


def test_crop_fallback_is_centre_crop_within_ratio():
    rng = np.random.default_rng(0)
    # A 1000x50 strip cannot hold any crop with area >= 90% and aspect <= 4/3: fallback.
    left, top, w, h = T.sample_crop(rng, 1000, 50, (0.9, 1.0))
    assert (w, h) == (67, 50) and top == 0 and left == (1000 - 67) // 2
    left, top, w, h = T.sample_crop(rng, 50, 1000, (0.9, 1.0))
    assert (w, h) == (50, 67) and left == 0 and top == (1000 - 67) // 2


def test_random_resized_crop_deterministic(photo):
    a = T.random_resized_crop(photo, np.random.default_rng(3), 96)
    b = T.random_resized_crop(photo, np.random.default_rng(3), 96)
    c = T.random_resized_crop(photo, np.random.default_rng(4), 96)
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_random_resized_crop_accepts_arrays_and_images(photo):
    arr = T.decode_image(photo)
    a = T.random_resized_crop(photo, np.random.default_rng(1), 64, draft=False)
    b = T.random_resized_crop(arr, np.random.default_rng(1), 64)
    c = T.random_resized_crop(Image.fromarray(arr), np.random.default_rng(1), 64)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(b, c)


def test_crop_matches_explicit_crop_then_resize(photo):
    """Same pixels as torchvision's PIL path: crop the box, then bilinear resize."""
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    out = T.random_resized_crop(photo, rng_a, 80, (0.3, 1.0))
    left, top, w, h = T.sample_crop(rng_b, 500, 375, (0.3, 1.0))
    img = Image.open(io.BytesIO(photo)).convert("RGB")
    ref = np.asarray(img.crop((left, top, left + w, top + h)).resize((80, 80), Image.BILINEAR))
    assert np.abs(out.astype(int) - ref).mean() < 1.0


RESAMPLERS = [
    "pillow",
    pytest.param(
        "opencv",
        marks=pytest.mark.skipif(T._cv2 is None, reason="opencv-python-headless not installed"),
    ),
]


@pytest.mark.parametrize("resampler", RESAMPLERS)
def test_draft_path_close_to_full_decode(big_photo, monkeypatch, resampler):
    """Drafted decode + mapped box vs full decode + Pillow resize of the same box."""
    decoded_sizes = []
    original = T._to_rgb

    def spy(im):
        decoded_sizes.append(im.size)
        return original(im)

    monkeypatch.setattr(T, "_to_rgb", spy)
    diffs = []
    for seed in range(6):
        fast = T.random_resized_crop(
            big_photo, np.random.default_rng(seed), 128, (0.3, 1.0), resampler=resampler
        )
        slow = T.random_resized_crop(
            big_photo, np.random.default_rng(seed), 128, (0.3, 1.0), draft=False, resampler="pillow"
        )
        diffs.append(np.abs(fast.astype(float) - slow).mean())
    assert max(diffs) < 2.0, diffs
    reduced = [s for s in decoded_sizes if s != (1600, 1200)]
    assert len(reduced) == 6  # every draft call decoded at a reduced DCT scale
    assert all(s[0] in (800, 400, 200) for s in reduced)


@pytest.mark.skipif(T._cv2 is None, reason="opencv-python-headless not installed")
@pytest.mark.parametrize("size", [160, 224])
def test_opencv_resampler_close_to_pillow(photo, big_photo, size):
    """Same boxes and flips (same generator draws), pixels within a fraction of a grey
    level on average: SLIP's three views, upscaled and downscaled crops, with and without
    draft decoding."""
    specs = T.slip_crop_specs(size)
    diffs = []
    for data in (photo, big_photo):
        width, height = Image.open(io.BytesIO(data)).size
        for seed in range(8):
            rng_a, rng_b, rng_c = (np.random.default_rng(seed) for _ in range(3))
            fast = T.multi_crop(data, rng_a, specs, resampler="opencv")
            ref = T.multi_crop(data, rng_b, specs, resampler="pillow", draft=False)
            _, flips = T.sample_boxes(rng_c, width, height, specs)
            # Both paths drew exactly the boxes and flips of sample_boxes.
            assert rng_a.random() == rng_b.random() == rng_c.random()
            for a, b, flip in zip(fast, ref, flips, strict=True):
                assert a.shape == b.shape == (size, size, 3) and a.dtype == np.uint8
                diffs.append(np.abs(a.astype(float) - b).mean())
                if flip:  # a flipped view must not match its unflipped self
                    assert np.abs(a.astype(float) - b[:, ::-1]).mean() > diffs[-1]
    assert np.mean(diffs) < 0.75, diffs
    assert max(diffs) < 3.0, diffs


@pytest.mark.skipif(T._cv2 is None, reason="opencv-python-headless not installed")
def test_opencv_antialiases_when_shrinking():
    """A 1-pixel checkerboard shrunk 1.75x must come out near flat grey (Pillow does);
    plain bilinear sampling without the prefilter leaves strong aliasing."""
    board = ((np.indices((350, 350)).sum(0) % 2) * 255).astype(np.uint8)
    arr = np.repeat(board[..., None], 3, -1)
    spec = T.CropSpec(200, (0.999, 1.0), (0.999, 1.001))
    fast = T.multi_crop(arr, np.random.default_rng(0), [spec], resampler="opencv")[0]
    ref = T.multi_crop(arr, np.random.default_rng(0), [spec], resampler="pillow")[0]
    plain = T._cv2.resize(arr, (200, 200), interpolation=T._cv2.INTER_LINEAR)
    assert fast.std() < 2 * ref.std() + 8
    assert plain.std() > 4 * fast.std()


def test_resampler_choice(photo, monkeypatch):
    with pytest.raises(ValueError, match="resampler"):
        T.multi_crop(photo, np.random.default_rng(0), T.slip_crop_specs(32), resampler="x")
    monkeypatch.setattr(T, "_cv2", None)  # as without opencv-python-headless
    assert T.default_resampler() == "pillow"
    views = T.multi_crop(photo, np.random.default_rng(0), T.slip_crop_specs(32))
    ref = T.multi_crop(photo, np.random.default_rng(0), T.slip_crop_specs(32), resampler="pillow")
    for a, b in zip(views, ref, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ImportError, match="opencv"):
        T.multi_crop(photo, np.random.default_rng(0), T.slip_crop_specs(32), resampler="opencv")


def test_multi_crop_views(photo):
    specs = T.slip_crop_specs(64)
    views = T.multi_crop(photo, np.random.default_rng(0), specs)
    assert len(views) == 3 and all(v.shape == (64, 64, 3) and v.dtype == np.uint8 for v in views)
    again = T.multi_crop(photo, np.random.default_rng(0), specs)
    for v, w in zip(views, again, strict=True):
        np.testing.assert_array_equal(v, w)
    # The first view is exactly random_resized_crop with the same generator state.
    # Without draft (whose scale depends on all crops) the first view is exactly
    # random_resized_crop with the same generator state.
    views = T.multi_crop(photo, np.random.default_rng(0), specs, draft=False)
    first = T.random_resized_crop(photo, np.random.default_rng(0), 64, (0.5, 1.0), draft=False)
    np.testing.assert_array_equal(views[0], first)


def test_multi_crop_flip():
    # Left half black, right half white: a flipped crop of the middle mirrors the columns.
    arr = np.zeros((100, 100, 3), np.uint8)
    arr[:, 50:] = 255
    spec_flip = T.CropSpec(32, (0.99, 1.0), (0.99, 1.01), flip=True)
    spec_none = T.CropSpec(32, (0.99, 1.0), (0.99, 1.01), flip=False)
    flipped = 0
    for seed in range(20):
        a = T.multi_crop(arr, np.random.default_rng(seed), [spec_flip])[0]
        b = T.multi_crop(arr, np.random.default_rng(seed), [spec_none])[0]
        if np.array_equal(a, b[:, ::-1]) and not np.array_equal(a, b):
            flipped += 1
        else:
            np.testing.assert_array_equal(a, b)
    assert 3 <= flipped <= 17


def test_random_flip():
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    outs = [T.random_flip(arr, np.random.default_rng(s)) for s in range(20)]
    n_flipped = sum(np.array_equal(o, arr[:, ::-1]) for o in outs)
    assert 3 <= n_flipped <= 17
    assert all(np.array_equal(o, arr) or np.array_equal(o, arr[:, ::-1]) for o in outs)


# ----------------------------------------------------------------------------------------
# Eval


@pytest.mark.parametrize("resize_size", [None, 73])
def test_resize_center_crop_matches_resize_then_crop(photo, resize_size):
    size = 64
    out = T.resize_center_crop(photo, size, resize_size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    # torchvision: Resize(short side) then CenterCrop, on PIL.
    img = Image.open(io.BytesIO(photo)).convert("RGB")
    r = resize_size or size
    new_w, new_h = int(r * 500 / 375), r
    resized = img.resize((new_w, new_h), Image.BILINEAR)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    ref = np.asarray(resized.crop((left, top, left + size, top + size)))
    assert np.abs(out.astype(int) - ref).mean() < 1.5
    with pytest.raises(ValueError):
        T.resize_center_crop(photo, 64, 32)


def test_resize_center_crop_portrait_array():
    arr = np.zeros((200, 100, 3), np.uint8)
    arr[:40] = 255  # top fifth white: cut away by the centre crop (and its filter support)
    out = T.resize_center_crop(arr, 50)
    assert out.shape == (50, 50, 3)
    assert out.max() == 0
    assert math.isclose(T.resize_center_crop(arr, 50, 100)[0, 0, 0], 0)
