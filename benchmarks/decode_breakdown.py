"""Where a multi-layer decode spends its time: per layer, LIFF vs entropy decoding vs RC synthesis
(vs the post-filter, for a model that has one).

    .venv/bin/python benchmarks/decode_breakdown.py [--image ../shared/data/kodak/kodim23.png]
        [--widen-synthesis 96] [--deepen-filter 7]

`--widen-synthesis N` also times, in the same runs, the RC synthesis widened to N hidden channels
(`backbone.widen`: the same function, so the decode is unchanged), i.e. what a wider decoder
would cost before any hour is spent training one; the ratio is against the shipped synthesis.
`--deepen-filter N` does the same for the post-filter grown to N convolutions
(`postfilter.deepen`). Each run ends with two sums: every part timed, and what a display decode
runs (`Codec.decode` filters only the layer it shows).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from compass_serve.allocator import retain_freed_memory
from compass_serve.codec import bitstream as bs
from compass_serve.codec.backbone import TRANSFORM_TILE, build_backbone, widen
from compass_serve.codec.coder import Codec
from compass_serve.codec.postfilter import PostFilter, deepen
from compass_serve.imageio import load_rgb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--image", default="../shared/data/kodak/kodim23.png")
    ap.add_argument("--model", default="lite")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--widen-synthesis", type=int, default=0, metavar="N",
                    help="also time the RC synthesis widened to N hidden channels")
    ap.add_argument("--deepen-filter", type=int, default=0, metavar="N",
                    help="also time the post-filter deepened to N convolutions")
    a = ap.parse_args()
    retain_freed_memory()  # as every compass-serve process runs (compass_serve.allocator)
    codec = Codec.load(a.model)
    model = codec.model
    stream = bs.Bitstream.parse(codec.encode(load_rgb(a.image)))
    strings = [bs.unpack_strings(p) for p in stream.payloads]
    sizes = [(e.height, e.width) for e in stream.header.table]
    q = stream.header.quality
    rc = model.enhancement.residual
    wide = None
    if a.widen_synthesis:
        wide = build_backbone(replace(rc.cfg, n_synthesis=a.widen_synthesis))
        widen(rc, wide)
        wide.eval()
    pf = model.enhancement.post_filter
    deep = None
    if a.deepen_filter:
        if pf is None:
            ap.error(f"model {a.model} has no post-filter to deepen")
        assert model.cfg.post_filter is not None
        deep = PostFilter(replace(model.cfg.post_filter, layers=a.deepen_filter),
                          len(model.cfg.lambdas))
        deepen(pf, deep)
        deep.eval()
    print(f"{a.image}, model {a.model}, torch threads {torch.get_num_threads()}")
    with torch.inference_mode():
        for rep in range(a.repeats):
            t = time.perf_counter()
            x = model.base.codec.decompress(strings[0], sizes[0], q)
            total = time.perf_counter() - t
            cells = [f"base {sizes[0][1]}x{sizes[0][0]} {total:.3f} s"]
            filters = []  # a display decode runs only the last (the shown layer's)
            for s, size in zip(strings[1:], sizes[1:], strict=True):
                t0 = time.perf_counter()
                pred = model.enhancement.predict(x, size)
                t1 = time.perf_counter()
                y_hat = rc.decode_latent(s, size)  # hyper-synthesis and range decoding
                t2 = time.perf_counter()
                residual = rc.synthesize(y_hat * rc.inv_gain(q), size)
                x = pred + residual
                t3 = time.perf_counter()
                total += t3 - t0
                cell = (f"{size[1]}x{size[0]}: LIFF {t1 - t0:.3f} s, entropy {t2 - t1:.3f} s, "
                        f"RC synthesis {t3 - t2:.3f} s")
                if pf is not None:
                    t = time.perf_counter()
                    shown = model.enhancement.show(x, pred, q)  # the chain goes on from x
                    shown_filter = time.perf_counter() - t
                    total += shown_filter
                    filters.append(shown_filter)
                    cell += f", post-filter {shown_filter:.3f} s"
                if deep is not None:
                    t4 = time.perf_counter()
                    same = deep.tiled(x, pred, q, TRANSFORM_TILE)
                    t5 = time.perf_counter()
                    cell += (f" (deepened to {a.deepen_filter}: {t5 - t4:.3f} s, "
                             f"x{(t5 - t4) / shown_filter:.2f}, max |diff| "
                             f"{(same - shown).abs().max():.1e})")
                if wide is not None:
                    t4 = time.perf_counter()
                    same = wide.synthesize(y_hat * wide.inv_gain(q), size)
                    t5 = time.perf_counter()
                    cell += (f" (widened to {a.widen_synthesis}: {t5 - t4:.3f} s, "
                             f"x{(t5 - t4) / (t3 - t2):.2f}, max |diff| "
                             f"{(same - residual).abs().max():.1e})")
                cells.append(cell)
            cells.append(f"summed {total:.2f} s, display decode {total - sum(filters[:-1]):.2f} s")
            print(f"run {rep + 1}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
