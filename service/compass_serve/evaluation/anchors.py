"""Classic codecs from Pillow (JPEG, WebP, AVIF) as rate-distortion anchors."""

from __future__ import annotations

import io

from PIL import Image, features

QUALITIES: dict[str, tuple[int, ...]] = {
    "jpeg": (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95),
    "webp": (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95),
    "avif": (10, 20, 30, 40, 50, 60, 70, 80, 90),
}


def available() -> list[str]:
    out = ["jpeg"]
    if features.check("webp"):
        out.append("webp")
    if features.check("avif"):
        out.append("avif")
    return out


def code(img: Image.Image, codec: str, quality: int) -> tuple[int, Image.Image]:
    """Encode with Pillow's defaults at `quality`; returns (bytes, decoded RGB image)."""
    buf = io.BytesIO()
    fmt = {"jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}[codec]
    img.save(buf, format=fmt, quality=quality)
    n = buf.tell()
    buf.seek(0)
    with Image.open(buf) as dec:
        return n, dec.convert("RGB")
