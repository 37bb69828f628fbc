"""What encoder latent refinement buys: BD-rate and encode time against the amortised encoder.

On held-out training images (never Kodak: the step count is chosen here), each cropped to
768x512 and coded on the default ladder at qualities 1-4, in one process: the top layer's
cumulative bytes and PSNR for each step count, BD-rate against 0 steps (the amortised encoder,
run in the same process) and the encode-time ratio.

    .venv/bin/python benchmarks/refine_effort.py [--steps 0,10,30,60] [--images 3] [--lr 0.005,0.02]

With several --lr values, every step count runs at each Adam step size (the refinement's
`lr`), each against the same amortised baseline.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from compass_serve.allocator import retain_freed_memory
from compass_serve.codec.coder import Codec
from compass_serve.codec.refine import Refinement
from compass_serve.evaluation.bd import bd_rate
from compass_serve.evaluation.run import psnr
from compass_serve.imageio import load_rgb, resize
from compass_serve.training.data import list_images, split_holdout


def crop_768x512(path: Path) -> Image.Image:
    img = load_rgb(path)
    if img.width < img.height:
        img = img.transpose(Image.Transpose.ROTATE_90)  # landscape, like Kodak
    s = max(768 / img.width, 512 / img.height)
    img = resize(img, max(768, round(img.width * s)), max(512, round(img.height * s)))
    x0, y0 = (img.width - 768) // 2, (img.height - 512) // 2
    return img.crop((x0, y0, x0 + 768, y0 + 512))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="lite")
    ap.add_argument("--data", default="../shared/data/train")
    ap.add_argument("--steps", default="0,10,30,60")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", default=str(Refinement.lr), help="comma-separated Adam step sizes")
    a = ap.parse_args()
    retain_freed_memory()  # as every compass-serve process runs (compass_serve.allocator)
    torch.set_num_threads(a.threads)
    codec = Codec.load(a.model)
    steps = [int(s) for s in a.steps.split(",")]
    if steps[0] != 0:
        steps = [0, *steps]
    images = [crop_768x512(p) for p in split_holdout(list_images(a.data))[1][: a.images]]
    qualities = [float(q) for q in range(1, codec.qualities + 1)]
    print(f"{len(images)} held-out images at 768x512, model {a.model}, torch threads {a.threads}")
    rates = [float(r) for r in a.lr.split(",")]
    runs = [(0, rates[0])] + [(n, r) for n in steps if n for r in rates]
    rows: dict[tuple[int, float], tuple[list[float], list[float], float]] = {}
    for n, lr in runs:
        refinement = Refinement(steps=n, lr=lr)
        bpp, db, seconds = [], [], 0.0
        for q in qualities:
            b_q, p_q = [], []
            for img in images:
                t = time.perf_counter()
                data = codec.encode(img, quality=q, refine=refinement)
                seconds += time.perf_counter() - t
                b_q.append(len(data) * 8 / (768 * 512))
                p_q.append(psnr(codec.decode(data).image, img))  # default: the top layer
            bpp.append(float(np.mean(b_q)))
            db.append(float(np.mean(p_q)))
        rows[n, lr] = (bpp, db, seconds / (len(qualities) * len(images)))
        base_bpp, base_db, base_s = rows[runs[0]]
        bd = bd_rate(base_bpp, base_db, bpp, db)
        label = f"steps {n:3d} lr {lr:g}" if n else "steps   0 (amortised)"
        print(f"{label}: bpp q1..q{len(qualities)} " + " ".join(f"{b:.3f}" for b in bpp)
              + "  PSNR " + " ".join(f"{p:.2f}" for p in db)
              + f"  BD-rate vs 0 steps {bd:+.1f} %  encode {rows[n, lr][2]:.1f} s "
              f"({rows[n, lr][2] / base_s:.1f}x)", flush=True)


if __name__ == "__main__":
    main()
