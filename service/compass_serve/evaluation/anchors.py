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


# Encoder effort beyond Pillow's defaults, used when COMPASS's own encoder spends extra time
# (latent refinement), so that slow is compared with slow. AVIF keeps its default speed: speeds
# 4, 2 and 0 took 4-37x the time for at most 1.4 % fewer bytes (kodim05, quality 50).
MAX_EFFORT: dict[str, dict[str, object]] = {
    "jpeg": {"optimize": True},
    "webp": {"method": 6},
    "avif": {},
}


def code(img: Image.Image, codec: str, quality: int, effort: str = "default") -> tuple[int, Image.Image]:
    """Encode at `quality` with Pillow's defaults, or with `effort="max"` the slowest settings
    of MAX_EFFORT; returns (bytes, decoded RGB image)."""
    if effort not in ("default", "max"):
        raise ValueError(f"unknown anchor effort {effort!r} (default or max)")
    buf = io.BytesIO()
    fmt = {"jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}[codec]
    img.save(buf, format=fmt, quality=quality, **(MAX_EFFORT[codec] if effort == "max" else {}))
    n = buf.tell()
    buf.seek(0)
    with Image.open(buf) as dec:
        return n, dec.convert("RGB")
