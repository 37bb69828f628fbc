"""Tests for compass_serve.imageio: safe decoding to 8-bit RGB and PIL <-> torch helpers."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from compass_serve.imageio import (
    DEFAULT_LIMITS,
    ImageInputError,
    InputLimits,
    encode_image,
    fit_width,
    load_rgb,
    resize,
    sniff_format,
    to_image,
    to_tensor,
)

WHITE = (255, 255, 255)
RED = (255, 0, 0)
BLUE = (0, 0, 255)


# ------------------------------------------------------------------------------------ helpers


def _save(img: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img, dtype=np.int32)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    """Hand-built PNG, so headers can claim sizes or depths Pillow would not write itself."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _gradient(width: int = 16, height: int = 8) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), 128 + 0 * x], -1)
    return Image.fromarray(arr.astype(np.uint8))


# ------------------------------------------------------------------------------ mode handling


def _mode_1() -> Image.Image:
    img = Image.new("1", (2, 1), 0)
    img.putpixel((1, 0), 1)
    return img


def _palette(mode: str = "P") -> Image.Image:
    img = Image.new(mode, (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50])
    if mode == "PA":
        img.putpixel((0, 0), (0, 0))  # transparent
        img.putpixel((1, 0), (1, 255))
    else:
        img.putpixel((1, 0), 1)
    return img


def _palette_transparent() -> Image.Image:
    img = _palette()
    img.info["transparency"] = 0
    return img


def _from_bands(mode: str, pixels: list[tuple[int, ...]]) -> Image.Image:
    img = Image.new(mode, (len(pixels), 1))
    for x, value in enumerate(pixels):
        img.putpixel((x, 0), value)
    return img


def _i16(mode: str = "I;16") -> Image.Image:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    if mode == "I;16":
        return Image.fromarray(values)
    return Image.frombytes(mode, (4, 1), values.astype(">u2").tobytes())


def _gray(values: list[int]) -> list[tuple[int, int, int]]:
    return [(v, v, v) for v in values]


MODE_CASES: dict[str, tuple[Callable[[], Image.Image], list[tuple[int, int, int]], int]] = {
    # name: (image factory, expected RGB pixels of row 0, tolerance)
    "1": (_mode_1, _gray([0, 255]), 0),
    "L": (lambda: Image.fromarray(np.array([[0, 77, 255]], np.uint8)), _gray([0, 77, 255]), 0),
    "P": (_palette, [(10, 20, 30), (200, 100, 50)], 0),
    "P+transparency": (_palette_transparent, [WHITE, (200, 100, 50)], 0),
    "PA": (lambda: _palette("PA"), [WHITE, (200, 100, 50)], 0),
    "LA": (
        lambda: _from_bands("LA", [(100, 0), (100, 255), (100, 128)]),
        _gray([255, 100, 177]),
        1,
    ),
    "La": (lambda: _from_bands("La", [(0, 0), (100, 255), (50, 128)]), _gray([255, 100, 177]), 2),
    "RGBA": (
        lambda: _from_bands("RGBA", [(10, 20, 30, 0), (10, 20, 30, 255)]),
        [WHITE, (10, 20, 30)],
        0,
    ),
    "RGBa": (
        lambda: _from_bands("RGBa", [(0, 0, 0, 0), (10, 20, 30, 255)]),
        [WHITE, (10, 20, 30)],
        0,
    ),
    "RGBX": (lambda: _from_bands("RGBX", [(1, 2, 3, 0)]), [(1, 2, 3)], 0),
    "I;16": (_i16, _gray([0, 1, 128, 255]), 0),
    "I;16B": (lambda: _i16("I;16B"), _gray([0, 1, 128, 255]), 0),
    "I (16-bit samples)": (
        lambda: Image.fromarray(np.array([[0, 257, 32768, 65535, -7]], np.int32)),
        _gray([0, 1, 128, 255, 0]),
        0,
    ),
    "I (32-bit samples)": (
        lambda: Image.fromarray(np.array([[0, 2**30, 2**31 - 1]], np.int32)),
        _gray([0, 128, 255]),
        0,
    ),
    "F": (
        lambda: Image.fromarray(np.array([[-5.0, 0.4, 127.6, 300.0]], np.float32)),
        _gray([0, 0, 128, 255]),
        0,
    ),
    "CMYK": (
        lambda: _from_bands("CMYK", [(0, 0, 0, 0), (0, 255, 255, 0), (0, 0, 0, 255)]),
        [WHITE, RED, (0, 0, 0)],
        0,
    ),
    "YCbCr": (lambda: _from_bands("YCbCr", [(128, 128, 128), (76, 85, 255)]), [(128,) * 3, RED], 2),
    "LAB": (lambda: _from_bands("LAB", [(255, 128, 128), (0, 128, 128)]), [WHITE, (0, 0, 0)], 3),
    "HSV": (lambda: _from_bands("HSV", [(0, 255, 255), (0, 0, 200)]), [RED, (200,) * 3], 0),
}


@pytest.mark.parametrize("name", list(MODE_CASES))
def test_modes_convert_to_rgb(name: str) -> None:
    factory, expected, tolerance = MODE_CASES[name]
    src = factory()
    out = load_rgb(src)
    assert out.mode == "RGB"
    assert out.size == src.size
    diff = np.abs(_pixels(out)[0] - np.array(expected, dtype=np.int32))
    assert diff.max() <= tolerance, (name, _pixels(out)[0].tolist(), expected)


def test_sixteen_bit_gray_png_scales_not_clips() -> None:
    data = _save(_i16(), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really a 16-bit file
    assert _pixels(load_rgb(data))[0, :, 0].tolist() == [0, 1, 128, 255]


def test_sixteen_bit_rgb_png() -> None:
    row = struct.pack(">9H", 65535, 32768, 0, 0, 65535, 32768, 32768, 0, 65535)
    data = _png(3, 1, 16, 2, zlib.compress(b"\x00" + row))
    out = load_rgb(data)
    assert _pixels(out)[0].tolist() == [[255, 128, 0], [0, 255, 128], [128, 0, 255]]


def test_alpha_composites_onto_background() -> None:
    img = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert _pixels(load_rgb(img)).reshape(-1, 3).tolist() == [list(WHITE)] * 4
    black = load_rgb(img, background=(0, 0, 0))
    assert _pixels(black).max() == 0
    png = load_rgb(_save(img, "PNG"), background=(1, 2, 3))
    assert _pixels(png)[0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_from_file(fmt: str) -> None:
    data = _save(_palette(), fmt, transparency=0)
    assert _pixels(load_rgb(data))[0].tolist() == [list(WHITE), [200, 100, 50]]


def test_bad_background_rejected() -> None:
    with pytest.raises(ValueError):
        load_rgb(Image.new("RGB", (1, 1)), background=(0, 0, 256))


# ---------------------------------------------------------------------------- files / formats


def test_exif_orientation_6_rotates() -> None:
    img = Image.new("RGB", (48, 32), BLUE)
    img.paste(RED, (0, 0, 16, 16))  # marks the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90° clockwise
    out = load_rgb(_save(img, "JPEG", quality=95, exif=exif))
    assert out.size == (32, 48)
    px = _pixels(out)
    # Rotating clockwise moves the stored top-left corner to the top-right.
    assert np.abs(px[2, 29] - RED).max() < 40
    assert np.abs(px[2, 2] - BLUE).max() < 40


MULTI_FRAME = {"GIF": None, "WEBP": "webp", "TIFF": None}


@pytest.mark.parametrize("fmt", list(MULTI_FRAME))
def test_multi_frame_uses_first_frame(fmt: str) -> None:
    feature = MULTI_FRAME[fmt]
    if feature and not features.check(feature):
        pytest.skip(f"Pillow lacks {fmt}")
    frames = [Image.new("RGB", (4, 4), RED), Image.new("RGB", (4, 4), BLUE)]
    options: dict[str, object] = {"save_all": True, "append_images": frames[1:]}
    if fmt == "WEBP":
        options["lossless"] = True
    data = _save(frames[0], fmt, **options)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    assert _pixels(load_rgb(data))[0, 0].tolist() == list(RED)


# format -> (Pillow feature needed or None, max mean abs error)
FORMATS: dict[str, tuple[str | None, float]] = {
    "JPEG": ("jpg", 6.0),
    "PNG": (None, 0.0),
    "WEBP": ("webp", 6.0),
    "BMP": (None, 0.0),
    "TIFF": (None, 0.0),
    "AVIF": ("avif", 8.0),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_formats_load(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    feature, max_err = FORMATS[fmt]
    available = feature is None or bool(features.check(feature))
    with capsys.disabled():
        print(f"\n[imageio] {fmt}: {'available' if available else 'NOT available'} in Pillow")
    if not available:
        pytest.skip(f"Pillow lacks {fmt} support")
    src = _gradient()
    data = _save(src, fmt)
    assert sniff_format(data) == fmt
    out = load_rgb(data)
    assert out.mode == "RGB" and out.size == src.size
    assert np.abs(_pixels(out) - _pixels(src)).mean() <= max_err


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "GIF"])
def test_one_by_one(fmt: str) -> None:
    data = _save(Image.new("RGB", (1, 1), (7, 8, 9)), fmt)
    out = load_rgb(data)
    assert out.size == (1, 1)
    if fmt != "GIF":  # GIF quantises
        assert _pixels(out)[0, 0].tolist() == [7, 8, 9]


def test_sources_path_bytes_file_and_sniff_ignores_names(tmp_path: Path) -> None:
    data = _save(_gradient(), "PNG")
    misnamed = tmp_path / "photo.jpg"
    misnamed.write_bytes(data)
    stream = io.BytesIO(data)
    stream.name = "picture.gif"
    expected = _pixels(load_rgb(data))
    for source in (misnamed, str(misnamed), stream, bytearray(data)):
        assert np.array_equal(_pixels(load_rgb(source)), expected)  # type: ignore[arg-type]
    assert sniff_format(data) == "PNG"
    assert sniff_format(b"") is None
    assert sniff_format(b"garbage, definitely not an image") is None


def test_missing_path_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(ImageInputError, match="cannot read"):
        load_rgb(tmp_path / "nope.png")


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage, definitely not an image", b"\x89PNG\r\n\x1a\n"],
    ids=["empty", "garbage", "png-signature-only"],
)
def test_garbage_rejected(data: bytes) -> None:
    with pytest.raises(ImageInputError):
        load_rgb(data)


def test_truncated_png_rejected() -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    data = _save(noisy, "PNG")
    # Cuts in the signature/IHDR, at the IDAT start, and through the pixel data. (Dropping only
    # the zlib checksum and IEND still yields every pixel, which Pillow accepts.)
    for cut in (20, 40, len(data) // 2, len(data) * 3 // 4):
        with pytest.raises(ImageInputError):
            load_rgb(data[:cut])


def test_format_outside_allow_list() -> None:
    with pytest.raises(ImageInputError, match="PPM"):
        load_rgb(_save(_gradient(), "PPM"))
    jpeg = _save(_gradient(), "JPEG")
    with pytest.raises(ImageInputError, match="JPEG"):
        load_rgb(jpeg, limits=InputLimits(formats=frozenset({"png"})))


# ------------------------------------------------------------------------------------ limits


def test_default_limits_accept_24mp() -> None:
    assert DEFAULT_LIMITS.max_pixels >= 6000 * 4000
    assert DEFAULT_LIMITS.max_side == 65535


class _CountingReader(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.consumed = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.consumed += len(chunk)
        return chunk


def test_byte_limit(tmp_path: Path) -> None:
    data = _save(_gradient(), "PNG")
    tight = InputLimits(max_bytes=len(data) - 1)
    path = tmp_path / "img.png"
    path.write_bytes(data)
    for source in (data, path):
        with pytest.raises(ImageInputError, match="bytes"):
            load_rgb(source, limits=tight)
    reader = _CountingReader(data + b"\0" * 10_000)
    with pytest.raises(ImageInputError, match="bytes"):
        load_rgb(reader, limits=tight)
    assert reader.consumed == len(data)  # read stopped at max_bytes + 1
    assert load_rgb(data, limits=InputLimits(max_bytes=len(data))).size == (16, 8)


@pytest.mark.parametrize(
    ("width", "height", "limits"),
    [
        (10_000, 10_000, DEFAULT_LIMITS),  # within 2x of the limit: Pillow's warning path
        (30_000, 30_000, DEFAULT_LIMITS),  # beyond 2x: Pillow's error path
        (70_000, 1, DEFAULT_LIMITS),  # few pixels, but a side the container cannot store
        (9, 9, InputLimits(max_pixels=80)),
    ],
)
def test_size_limits_checked_before_decode(width: int, height: int, limits: InputLimits) -> None:
    # The IDAT is garbage: had the pixels been decoded, the error would be about corrupt data.
    data = _png(width, height, 8, 2, b"not zlib data")
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageInputError, match="pixels"):
        load_rgb(data, limits=limits)
    assert before == Image.MAX_IMAGE_PIXELS  # the bomb guard is restored


def test_pixel_limits_on_real_images() -> None:
    img = Image.new("RGB", (8, 8))
    data = _save(img, "PNG")
    assert load_rgb(data, limits=InputLimits(max_pixels=64)).size == (8, 8)
    for source in (data, img):
        with pytest.raises(ImageInputError, match="pixels"):
            load_rgb(source, limits=InputLimits(max_pixels=63))
        with pytest.raises(ImageInputError, match="pixels"):
            load_rgb(source, limits=InputLimits(max_side=7))


def test_pil_input_not_mutated() -> None:
    src = Image.new("RGB", (3, 2), (1, 2, 3))
    out = load_rgb(src)
    assert out is not src
    out.putpixel((0, 0), (9, 9, 9))
    assert src.getpixel((0, 0)) == (1, 2, 3)


# ---------------------------------------------------------------------------- tensor helpers


def test_tensor_round_trip_exact() -> None:
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    x = to_tensor(img)
    assert x.shape == (1, 3, 5, 7) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert np.array_equal(np.asarray(to_image(x)), arr)
    assert np.array_equal(np.asarray(to_image(x[0])), arr)


def test_to_image_clamps_and_rounds() -> None:
    x = torch.tensor([-1.0, 2.0, 0.502, float("nan")]).view(1, 1, 4).expand(3, 1, 4)
    original = x.clone()
    assert _pixels(to_image(x))[0, :, 0].tolist() == [0, 255, 128, 0]
    assert torch.equal(torch.nan_to_num(x), torch.nan_to_num(original))  # input untouched
    with pytest.raises(ValueError):
        to_image(torch.zeros(2, 3, 4, 4))


def test_to_tensor_converts_other_modes() -> None:
    x = to_tensor(Image.new("L", (2, 2), 255))
    assert x.shape == (1, 3, 2, 2) and float(x.min()) == 1.0


def test_fit_width() -> None:
    assert fit_width(1920, 1080, 960) == (960, 540)
    assert fit_width(1000, 1, 10) == (10, 1)  # never zero
    assert fit_width(3, 5, 1) == (1, 2)
    with pytest.raises(ValueError):
        fit_width(0, 5, 1)


def test_resize_matches_pillow_bicubic() -> None:
    src = _gradient(32, 16)
    out = resize(src, 8, 4)
    assert out.size == (8, 4)
    assert np.array_equal(np.asarray(out), np.asarray(src.resize((8, 4), Image.Resampling.BICUBIC)))


# ------------------------------------------------------------------------------------ encode


def test_encode_image() -> None:
    src = _gradient()
    png = encode_image(src, "png")
    assert sniff_format(png) == "PNG"
    assert np.array_equal(_pixels(load_rgb(png)), _pixels(src))
    assert sniff_format(encode_image(src, "JPEG", quality=90)) == "JPEG"
    for fmt, feature in (("webp", "webp"), ("avif", "avif")):
        if features.check(feature):
            assert sniff_format(encode_image(src, fmt, quality=80)) == fmt.upper()
        else:
            with pytest.raises(ImageInputError):
                encode_image(src, fmt)
    with pytest.raises(ImageInputError, match="gif"):
        encode_image(src, "gif")
    with pytest.raises(ImageInputError, match="quality"):
        encode_image(src, "jpeg", quality=101)
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert _pixels(load_rgb(encode_image(rgba, "png"))).min() == 255  # flattened onto white


def _rgb_icc_profile(description: str, primaries: list[tuple[float, float, float]],
                     gamma: float) -> bytes:
    """A minimal ICC v2 matrix/TRC RGB display profile (enough for LittleCMS)."""

    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    def xyz(v: tuple[float, float, float]) -> bytes:
        return b"XYZ " + bytes(4) + b"".join(s15(c) for c in v)

    text = description.encode() + b"\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)
    tags = [(b"desc", desc), (b"wtpt", xyz((0.9642, 1.0, 0.8249))), (b"rXYZ", xyz(primaries[0])),
            (b"gXYZ", xyz(primaries[1])), (b"bXYZ", xyz(primaries[2])),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        body += bytes(-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + bytes(4) + bytes.fromhex("02100000") + b"mntrRGB XYZ "
              + bytes(12) + b"acsp" + bytes(4 + 4 + 4 + 4 + 8 + 4)
              + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(4 + 16 + 28))
    return header + struct.pack(">I", len(tags)) + table + data


def test_icc_tagged_images_are_converted_to_srgb() -> None:
    from PIL import ImageCms

    assert features.check("littlecms2")  # PyPI's Pillow wheels ship LittleCMS
    img = Image.new("RGB", (4, 4), (200, 40, 90))
    # Display P3 primaries (D50-adapted): the same numbers mean a more saturated colour.
    p3 = _rgb_icc_profile("Display P3 (test)", [(0.5151, 0.2412, -0.0011),
                                                (0.2920, 0.6922, 0.0419),
                                                (0.1571, 0.0666, 0.7841)], 2.2)
    buf = io.BytesIO()
    img.save(buf, format="PNG", icc_profile=p3)
    out = load_rgb(buf.getvalue())
    expected = ImageCms.profileToProfile(img, ImageCms.ImageCmsProfile(io.BytesIO(p3)),
                                         ImageCms.createProfile("sRGB"), outputMode="RGB")
    r, g, b = out.getpixel((0, 0))
    assert (r, g, b) == expected.getpixel((0, 0))
    assert r > 200 and g < 40  # more saturated red than the raw numbers, as P3 means
    # sRGB-tagged pixels are left exactly as they are.
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buf = io.BytesIO()
    img.save(buf, format="PNG", icc_profile=srgb)
    assert load_rgb(buf.getvalue()).getpixel((0, 0)) == (200, 40, 90)
    # A corrupt profile is ignored rather than failing the upload.
    buf = io.BytesIO()
    img.save(buf, format="PNG", icc_profile=b"not a profile")
    assert load_rgb(buf.getvalue()).getpixel((0, 0)) == (200, 40, 90)
