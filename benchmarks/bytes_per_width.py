"""Bytes a client fetches per target width, against separate JPEG / WebP renditions.

Starts the service on loopback (embedded defaults in a temporary data dir), uploads one image,
then for each width fetches it with the SDK (one Range request; bytes counted under httpx) and
encodes Pillow JPEG and WebP renditions of the same width. PSNR is against Pillow's bicubic
downscale of the original to that width.

    .venv/bin/python benchmarks/bytes_per_width.py [--image ../shared/data/kodak/kodim23.png]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from compass_serve import Client
from compass_serve.evaluation.run import psnr
from compass_serve.imageio import fit_width, load_rgb, resize
from compass_serve.server import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.server_harness import LiveServer


class Counting(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = super().handle_request(request)
        body = resp.read()
        if request.url.path.endswith("/bitstream"):
            self.bytes += len(body)
        return httpx.Response(resp.status_code, headers=resp.headers, content=body, request=request)


def rendition(img: Image.Image, fmt: str, quality: int) -> tuple[int, Image.Image]:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=quality)
    n = buf.tell()
    buf.seek(0)
    return n, Image.open(buf).convert("RGB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--image", default="../shared/data/kodak/kodim23.png")
    ap.add_argument("--widths", default="128,192,256,384,512,768")
    ap.add_argument("--quality", type=float, default=None,
                    help="COMPASS quality (default: the model's default quality)")
    ap.add_argument("--jpeg-quality", type=int, default=85)
    ap.add_argument("--webp-quality", type=int, default=80)
    a = ap.parse_args()
    src = load_rgb(a.image)
    widths = [int(w) for w in a.widths.split(",")]
    with tempfile.TemporaryDirectory() as tmp, LiveServer(Settings(data_dir=Path(tmp))) as srv:
        with Client(srv.url) as c:
            info = c.upload(Path(a.image), quality=a.quality, wait=True)
        layers = ", ".join(f"{la.width}x{la.height}" for la in info.layers)
        print(f"{Path(a.image).name}: {src.width}x{src.height}, COMPASS quality {info.quality:g}, "
              f"layers {layers}, stream {info.size} bytes\n")
        print(f"| width | COMPASS fetch bytes | PSNR | JPEG q{a.jpeg_quality} bytes | PSNR "
              f"| WebP q{a.webp_quality} bytes | PSNR |")
        print("|---|---|---|---|---|---|---|")
        totals = np.zeros(3)
        for w in widths:
            counting = Counting()
            with Client(srv.url, transport=counting) as c:
                img = c.fetch(info.id, w)
            ref = resize(src, *fit_width(src.width, src.height, w))
            jb, jd = rendition(ref, "JPEG", a.jpeg_quality)
            wb, wd = rendition(ref, "WEBP", a.webp_quality)
            totals += (counting.bytes, jb, wb)
            print(f"| {w} | {counting.bytes} | {psnr(img, ref):.2f} | {jb} | {psnr(jd, ref):.2f} | "
                  f"{wb} | {psnr(wd, ref):.2f} |")
        print(f"\nAll widths in turn: COMPASS progressive fetch transfers at most the stream "
              f"({info.size} bytes); separate renditions cost JPEG {int(totals[1])}, "
              f"WebP {int(totals[2])} bytes.")


if __name__ == "__main__":
    main()
