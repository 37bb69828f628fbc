"""Encode and decode one large image (default 4000x3000) and report times and peak memory.

    .venv/bin/python benchmarks/large_image.py [--model lite] [--size 4000x3000] [--random]

`--random` uses the model's preset with random weights (memory and time do not depend on the
weights' values), so the figure can be taken before a model is trained.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from PIL import Image

from compass_serve.allocator import retain_freed_memory
from compass_serve.codec import bitstream as bs
from compass_serve.codec.coder import Codec
from compass_serve.codec.registry import PRESETS, build, load_model


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([128 + 80 * np.sin(xx / (40 + 9 * c) + yy / (55 + 7 * c)) for c in range(3)], -1)
    img += rng.normal(0, 8, img.shape).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="lite")
    ap.add_argument("--size", default="4000x3000")
    ap.add_argument("--random", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    retain_freed_memory()  # as every compass-serve process runs (compass_serve.allocator)
    if a.threads:
        torch.set_num_threads(a.threads)
    w, h = (int(v) for v in a.size.split("x"))
    if a.random:
        torch.manual_seed(0)
        model = build(PRESETS[a.model])
        model.update()
        codec = Codec(model, "random", bytes(8))  # a preset name may exceed a stream's 32 bytes
    else:
        model, info = load_model(a.model)
        codec = Codec.from_info(model, info)
    img = synthetic(w, h)
    base_rss = peak_rss_mib()
    t = time.perf_counter()
    data = codec.encode(img)
    t_enc = time.perf_counter() - t
    enc_rss = peak_rss_mib()
    t = time.perf_counter()
    out = codec.decode(data)
    t_dec = time.perf_counter() - t
    table = bs.parse_header(data).table
    layers = " -> ".join(f"{e.width}x{e.height}" for e in table)
    print(f"image {w}x{h} ({w * h / 1e6:.1f} MP), model {a.model}"
          f"{' (random weights)' if a.random else ''}, torch threads {torch.get_num_threads()}")
    print(f"layers: {layers}; stream {len(data)} bytes")
    print(f"encode {t_enc:.1f} s, decode {t_dec:.1f} s, output {out.image.size}")
    print(f"peak RSS: before {base_rss:.0f} MiB, after encode {enc_rss:.0f} MiB, "
          f"after decode {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
