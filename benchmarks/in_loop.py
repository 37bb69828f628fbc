"""What a post-filter in the loop would save before any hour is spent training one: the shipped
model's filter put in the chain as it is (`PostFilterConfig.in_loop`: the next layer's LIFF reads
the filtered layer), against the shipped chain, on the first N Kodak images at every trained
quality, default ladder; the top layer's cumulative bpp and PSNR, and the BD-rate.

    .venv/bin/python benchmarks/in_loop.py [--images 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from compass_serve.allocator import retain_freed_memory
from compass_serve.codec.coder import Codec
from compass_serve.codec.model import Compass
from compass_serve.codec.registry import load_state
from compass_serve.evaluation.bd import bd_rate
from compass_serve.evaluation.run import LADDER, code_compass, ladder_for
from compass_serve.imageio import load_rgb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="../shared/data/kodak")
    ap.add_argument("--model", default="lite")
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    retain_freed_memory()  # as every compass-serve process runs (compass_serve.allocator)
    torch.set_num_threads(a.threads)
    shipped = Codec.load(a.model)
    cfg = shipped.model.cfg
    if not cfg.post_filter.channels or cfg.post_filter.in_loop:
        ap.error(f"model {a.model} has no post-filter outside the loop to move into it")
    looped_model = Compass(replace(cfg, post_filter=replace(cfg.post_filter, in_loop=True)))
    load_state(looped_model, shipped.model.state_dict())
    looped = Codec(looped_model, shipped.name, shipped.weights_id)
    codecs = {"shipped": shipped, "in the loop": looped}
    qualities = range(1, shipped.qualities + 1)
    points: dict[str, dict[int, list[tuple[float, float]]]] = {
        k: {q: [] for q in qualities} for k in codecs}
    paths = sorted(Path(a.data).glob("*.png"))[: a.images]
    t0 = time.perf_counter()
    for i, path in enumerate(paths, 1):
        img = load_rgb(path)
        lad = ladder_for(img, [max(1, round(img.width * s)) for s in LADDER])  # the eval's
        for q in qualities:
            for k, codec in codecs.items():
                points[k][q].append(code_compass(codec, img, lad, q)[-1])
        print(f"{path.name} ({i}/{len(paths)}), {(time.perf_counter() - t0) / i:.0f} s an image",
              flush=True)
    curves = {k: [tuple(sum(v) / len(paths) for v in zip(*points[k][q], strict=True))
                  for q in qualities] for k in codecs}
    print(f"model {a.model}, {len(paths)} images from {a.data}, top layer bpp / PSNR per quality")
    for k, curve in curves.items():
        print(f"{k:>12}: " + "  ".join(f"{b:.4f} / {p:.2f}" for b, p in curve))
    base, test = curves["shipped"], curves["in the loop"]
    print("bits at each quality: " + "  ".join(
        f"q{q} {100 * (t[0] / b[0] - 1):+.1f} %" for q, b, t in zip(qualities, base, test,
                                                                      strict=True)))
    bd = bd_rate([b for b, _ in base], [p for _, p in base], [b for b, _ in test],
                 [p for _, p in test])
    print(f"BD-rate, in the loop against the shipped chain: {bd:+.2f} %")


if __name__ == "__main__":
    main()
