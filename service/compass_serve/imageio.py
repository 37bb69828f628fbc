"""Safe image input/output for the codec: anything Pillow reads -> 8-bit RGB, and PIL <-> torch.

Untrusted bytes are checked against :class:`InputLimits` (size in bytes, pixel count, side length,
format allow-list) before any pixel data is decoded; every failure caused by the input surfaces as
:class:`ImageInputError` with a reason that can be shown to the user.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError, features

if TYPE_CHECKING:
    from PIL import ImageCms

__all__ = [
    "DEFAULT_LIMITS",
    "ImageInputError",
    "InputLimits",
    "encode_image",
    "fit_width",
    "load_rgb",
    "resize",
    "sniff_format",
    "to_image",
    "to_tensor",
]


class ImageInputError(ValueError):
    """The input image is unreadable, unsupported or too large; the message says which."""


@dataclass(frozen=True)
class InputLimits:
    """Limits applied to untrusted input before its pixels are decoded."""

    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 50_000_000
    # The codec container stores width/height as u16.
    max_side: int = 65535
    formats: frozenset[str] = frozenset(
        {"JPEG", "PNG", "WEBP", "AVIF", "TIFF", "BMP", "GIF", "MPO"}
    )

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"InputLimits.{name} must be a positive int, got {value!r}")
        # Pillow format names are upper case; normalise so {"png"} works as expected.
        object.__setattr__(self, "formats", frozenset(f.upper() for f in self.formats))


DEFAULT_LIMITS = InputLimits()

# Exceptions Pillow raises for malformed input. Plugins are not consistent (a bad header can
# surface as struct.error, IndexError, ...), so everything input-driven is caught in one place.
_PILLOW_ERRORS: tuple[type[BaseException], ...] = (
    UnidentifiedImageError,
    OSError,  # e.g. "image file is truncated", decoder errors
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
)

# Image.MAX_IMAGE_PIXELS and the warnings filters are process-global; the lock keeps concurrent
# load_rgb calls from seeing each other's temporary values. It is held only while headers are
# parsed (Image.open), never while pixels decode.
_GUARD_LOCK = threading.Lock()

# Pillow's 16-bit integer modes; all decode to uint16 arrays with np.asarray.
_I16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_I32_MAX = 2**31 - 1


def sniff_format(data: bytes) -> str | None:
    """Return Pillow's format name for ``data`` (e.g. ``"PNG"``), or None if unrecognised.

    Only the leading magic bytes are inspected with Pillow's own per-plugin checks; no header is
    parsed and no filename or declared content type is consulted. JPEG files carrying MPO data
    sniff as ``"JPEG"`` (Pillow decides MPO while opening).
    """
    # Image.open itself identifies from the first 16 bytes.
    prefix = bytes(data[:16])
    if not prefix:
        return None
    Image.init()  # register every plugin so Image.ID / Image.OPEN are complete
    for fmt in Image.ID:
        _factory, accept = Image.OPEN[fmt]
        # Plugins without a magic check (TGA, SPIDER, ...) are only found by trial parsing,
        # which is exactly what must not happen on untrusted bytes of an unknown type.
        if accept is None:
            continue
        try:
            result = accept(prefix)
        except _PILLOW_ERRORS:
            continue
        # A string result means "this is the format, but support is missing" (e.g. AVIF built
        # without libavif): still the right name for the bytes.
        if result:
            return fmt
    return None


def load_rgb(
    source: str | os.PathLike[str] | bytes | BinaryIO | Image.Image,
    limits: InputLimits = DEFAULT_LIMITS,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Load ``source`` as an 8-bit RGB image, enforcing ``limits`` before decoding pixels.

    ``source`` is a path, raw bytes, a binary file object, or a PIL image (for which only the
    pixel limits apply and its current frame is used). Multi-frame files yield their first frame;
    EXIF orientation is applied. High bit-depth grayscale is scaled, not clipped, to 8 bits
    (``I;16``: 0..65535 -> 0..255; ``I``: read as 16-bit unless values exceed 65535, then as
    0..2**31-1; ``F``: Pillow's 0..255 scale, rounded). Any transparency (alpha channel,
    palette or ``tRNS`` transparency) is alpha-composited onto the opaque ``background`` colour.
    CMYK/YCbCr/HSV use Pillow's convert, LAB goes through LittleCMS to sRGB.

    Raises ImageInputError for unreadable, corrupt, disallowed-format or oversized input.
    The returned image is always a new object.
    """
    bg = _check_background(background)
    if isinstance(source, Image.Image):
        _check_size(source.size, limits)
        out = _decode(source, bg)
        return out.copy() if out is source else out

    data = _read_limited(source, limits.max_bytes)
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageInputError("unrecognised image data: not an image in a supported format")
    _check_format(fmt, limits)
    with _open_guarded(data, fmt, limits.max_pixels) as img:
        # Pillow may refine the format while opening (a JPEG carrying MPO data becomes "MPO").
        _check_format(img.format or fmt, limits)
        # Image.open only parsed the header: the size is known, no pixel is decoded yet.
        _check_size(img.size, limits)
        # Image.open leaves multi-frame files (GIF, animated WebP, multi-page TIFF, MPO) at
        # frame 0, so loading without seeking yields the first frame.
        out = _decode(img, bg)
        # Closing the file image invalidates its pixels, so an unconverted one must be copied.
        return out.copy() if out is img else out


def to_tensor(img: Image.Image) -> torch.Tensor:
    """Convert an image to a float32 tensor [1, 3, H, W] in [0, 1] (non-RGB via load_rgb rules)."""
    rgb = img if img.mode == "RGB" else _to_rgb(img, (255, 255, 255))
    # np.array copies, so torch gets a writable buffer that does not alias the image.
    arr = np.array(rgb, dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous().float().div_(255.0)


def to_image(x: torch.Tensor) -> Image.Image:
    """Convert [1, 3, H, W] or [3, H, W] values in [0, 1] to an RGB image (clamped, rounded)."""
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a [1,3,H,W] or [3,H,W] tensor, got shape {tuple(x.shape)}")
    x = x.detach().to(device="cpu", dtype=torch.float32)
    # NaN would otherwise survive clamp and turn into an arbitrary byte.
    x = torch.nan_to_num(x, nan=0.0).clamp_(0.0, 1.0)
    arr = x.mul_(255.0).round_().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr)


def resize(img: Image.Image, width: int, height: int) -> Image.Image:
    """Resize with Pillow's antialiased BICUBIC (the codec's ladder downscale)."""
    _check_dims(width, height)
    # Image.resize widens the bicubic kernel by the reduction factor when shrinking, which is the
    # antialiasing the ladder relies on; reducing_gap stays None so there is no JPEG-style shortcut.
    return img.resize((width, height), Image.Resampling.BICUBIC)


def fit_width(width: int, height: int, target_width: int) -> tuple[int, int]:
    """Size with ``target_width`` keeping the aspect ratio; height is at least 1."""
    _check_dims(width, height)
    _check_dims(target_width, 1)
    # Python's round() (half to even) is part of the contract: decoders recompute this size.
    return target_width, max(1, round(height * target_width / width))


_ENCODE_FORMATS: dict[str, str] = {
    "png": "PNG",
    "jpeg": "JPEG",
    "jpg": "JPEG",
    "webp": "WEBP",
    "avif": "AVIF",
}
_ENCODE_FEATURES: dict[str, str] = {"WEBP": "webp", "AVIF": "avif"}


def encode_image(img: Image.Image, fmt: str, quality: int | None = None) -> bytes:
    """Encode ``img`` as RGB ``png``/``jpeg``/``webp``/``avif`` bytes.

    ``quality`` (0..100) applies to the lossy formats and is ignored for PNG; None uses Pillow's
    default. Unknown or unavailable formats raise ImageInputError.
    """
    pil_format = _ENCODE_FORMATS.get(fmt.lower())
    if pil_format is None:
        raise ImageInputError(
            f"unsupported output format {fmt!r}; expected one of png, jpeg, webp, avif"
        )
    feature = _ENCODE_FEATURES.get(pil_format)
    if feature is not None and not features.check(feature):
        raise ImageInputError(f"{fmt.lower()} encoding is not available in this Pillow build")
    options: dict[str, int] = {}
    if quality is not None and pil_format != "PNG":
        if isinstance(quality, bool) or not isinstance(quality, int) or not 0 <= quality <= 100:
            raise ImageInputError(f"quality must be an int in 0..100, got {quality!r}")
        options["quality"] = quality
    rgb = img if img.mode == "RGB" else _to_rgb(img, (255, 255, 255))
    buf = io.BytesIO()
    rgb.save(buf, format=pil_format, **options)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# internals


def _check_dims(width: int, height: int) -> None:
    for value in (width, height):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"sizes must be positive ints, got {width!r}x{height!r}")


def _check_background(background: tuple[int, int, int]) -> tuple[int, int, int]:
    bg = tuple(background)
    if len(bg) != 3 or not all(
        isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in bg
    ):
        raise ValueError(f"background must be three ints in 0..255, got {background!r}")
    return bg[0], bg[1], bg[2]


def _check_format(fmt: str, limits: InputLimits) -> None:
    if fmt not in limits.formats:
        allowed = ", ".join(sorted(limits.formats))
        raise ImageInputError(f"image format {fmt} is not accepted (allowed: {allowed})")


def _check_size(size: tuple[int, int], limits: InputLimits) -> None:
    # EXIF orientation may swap width and height later; the pixel count is unchanged and the
    # side limit is the same for both axes, so checking the stored size covers the result too.
    width, height = size
    if width < 1 or height < 1:
        raise ImageInputError(f"image has an empty size {width}x{height}")
    if width > limits.max_side or height > limits.max_side:
        raise ImageInputError(
            f"image is {width}x{height}; each side must be at most {limits.max_side} pixels"
        )
    if width * height > limits.max_pixels:
        raise ImageInputError(
            f"image is {width}x{height} = {width * height} pixels; "
            f"the limit is {limits.max_pixels} pixels"
        )


def _read_limited(source: str | os.PathLike[str] | bytes | BinaryIO, max_bytes: int) -> bytes:
    """Return the raw bytes of ``source``, refusing anything over ``max_bytes``."""
    too_big = f"image data is larger than the limit of {max_bytes} bytes"
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) > max_bytes:
            raise ImageInputError(too_big)
        return bytes(source)
    if isinstance(source, str | os.PathLike):
        try:
            with open(source, "rb") as fh:
                # Cheap early reject; the bounded read below still guards files that grow.
                if os.fstat(fh.fileno()).st_size > max_bytes:
                    raise ImageInputError(too_big)
                data = _read_at_most(fh, max_bytes + 1)
        except OSError as exc:
            raise ImageInputError(f"cannot read image file {os.fspath(source)!r}: {exc}") from exc
    else:
        data = _read_at_most(source, max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageInputError(too_big)
    return data


def _read_at_most(fh: BinaryIO, limit: int) -> bytes:
    # read(n) may legally return fewer bytes (pipes, sockets, raw files), so loop until EOF.
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = fh.read(remaining)
        if not chunk:
            break
        chunks.append(bytes(chunk))
        remaining -= len(chunk)
    return b"".join(chunks)


@contextmanager
def _open_guarded(data: bytes, fmt: str, max_pixels: int) -> Iterator[ImageFile.ImageFile]:
    """Open ``data`` lazily with only the sniffed plugin and Pillow's bomb guard at our limit."""
    too_many = f"image has more than {max_pixels} pixels (the limit)"
    try:
        with _GUARD_LOCK, warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; make both fatal.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = max_pixels
            try:
                # formats=[fmt]: only the plugin whose magic matched parses the header.
                img = Image.open(io.BytesIO(data), formats=[fmt])
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError(too_many) from exc
    except _PILLOW_ERRORS as exc:
        raise ImageInputError(f"cannot decode {fmt} image: corrupt or unsupported data") from exc
    try:
        yield img
    finally:
        img.close()


def _decode(img: Image.Image, bg: tuple[int, int, int]) -> Image.Image:
    """Decode pixels, apply EXIF orientation and convert to RGB, mapping failures."""
    try:
        img.load()
    except _PILLOW_ERRORS as exc:
        raise ImageInputError(f"cannot decode image: {_reason(exc)}") from exc
    img = _apply_orientation(img)
    img = _to_srgb(img)
    try:
        return _to_rgb(img, bg)
    except ImageInputError:
        raise
    except _PILLOW_ERRORS as exc:
        raise ImageInputError(f"cannot convert {img.mode} image to RGB: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text if text else type(exc).__name__


def _apply_orientation(img: Image.Image) -> Image.Image:
    # A broken EXIF block should not make an otherwise valid image unusable: ignore it.
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except _PILLOW_ERRORS:
        return img
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return img  # skips exif_transpose's full copy for the common upright case
    try:
        return ImageOps.exif_transpose(img)
    except _PILLOW_ERRORS:
        return img


def _to_rgb(img: Image.Image, bg: tuple[int, int, int]) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see load_rgb for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _I16_MODES or mode == "I":
        return _gray_to_rgb(_scale_int_gray(np.asarray(img), mode))
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)
        return _gray_to_rgb(np.rint(np.clip(arr, 0.0, 255.0)).astype(np.uint8))
    if mode == "La":
        # Pillow cannot convert premultiplied La directly; RGBa -> RGBA it can.
        gray, alpha = img.split()
        img, mode = Image.merge("RGBa", (gray, gray, gray, alpha)), "RGBa"
    if img.has_transparency_data:
        return _flatten(img.convert("RGBA"), bg)
    if mode == "LAB":
        return _lab_to_rgb(img)
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageInputError(f"unsupported pixel mode {mode}") from exc


def _scale_int_gray(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map 16-bit (or wider) integer samples to uint8 with rounding, never clipping highlights."""
    wide = arr.astype(np.int64)
    full_scale = 65535
    # Pillow's "I" is int32 but usually carries 16-bit samples (16-bit PNG/PGM/TIFF after
    # convert("I")); only values beyond 16 bits reveal a genuinely 32-bit source.
    if mode == "I":
        np.clip(wide, 0, None, out=wide)
        if wide.size and int(wide.max()) > 65535:
            full_scale = _I32_MAX
    # Round half up: (v * 255 + full/2) // full == round(v / 257) for 16-bit input.
    return ((wide * 255 + full_scale // 2) // full_scale).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8)).convert("RGB")


def _flatten(rgba: Image.Image, bg: tuple[int, int, int]) -> Image.Image:
    # Straight-alpha "over" onto an opaque background; Pillow does this in C with rounding.
    base = Image.new("RGBA", rgba.size, (*bg, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


@lru_cache(maxsize=1)
def _lab_transform() -> ImageCms.ImageCmsTransform:
    from PIL import ImageCms  # optional: needs Pillow built with LittleCMS

    return ImageCms.buildTransform(
        ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
    )


def _to_srgb(img: Image.Image) -> Image.Image:
    """Convert pixels tagged with a non-sRGB ICC profile (Display P3, Adobe RGB, CMYK press
    profiles...) to sRGB, which is what the codec and every browser assume for untagged output.
    Without this, wide-gamut photos come out desaturated. A broken profile is ignored."""
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "RGBA", "CMYK") or not features.check("littlecms2"):
        return img
    from PIL import ImageCms

    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in ImageCms.getProfileDescription(src).lower():
            return img  # already sRGB: skip a needless transform (and its rounding)
        out_mode = "RGBA" if img.mode == "RGBA" else "RGB"
        out = ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"),
                                        outputMode=out_mode)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return img
    return out if out is not None else img


def _lab_to_rgb(img: Image.Image) -> Image.Image:
    # Image.convert("RGB") on LAB reinterprets the channels instead of converting colour.
    if not features.check("littlecms2"):
        raise ImageInputError("LAB images need Pillow built with LittleCMS")
    return _lab_transform().apply(img)
