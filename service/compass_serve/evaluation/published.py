"""Published single-layer Kodak curves: where codecs of the paper's size land with full training.

CompressAI's published Kodak results (24 images, RGB PSNR) at 0.25 / 0.5 / 1.0 bpp, as the method
notes restate them (`../shared/docs/compass-method.md`). They are read off published curves, so a
BD-rate against them is good to about a point, and three points fit a quadratic (`bd_rate`).
They answer a question no local run can: would the paper's own backbone (mbt2018-mean, N=128,
M=192, trained on a GPU) beat the anchors this project measures? CompressAI's WebP against the
eval's Pillow WebP checks that both measure the same thing.
"""

from __future__ import annotations

from compass_serve.evaluation.run import bd_points

RATES = (0.25, 0.5, 1.0)
PUBLISHED_PSNR: dict[str, tuple[float, float, float]] = {
    "mbt2018-mean": (30.3, 33.4, 37.5),  # the paper's single-layer backbone
    "bpg": (30.3, 33.3, 37.2),           # HEVC intra
    "vtm": (31.3, 34.4, 38.2),           # VVC intra
    "webp": (28.6, 31.3, 35.1),
}


def published_curve(name: str) -> list[dict]:
    return [{"bpp": r, "psnr": p} for r, p in zip(RATES, PUBLISHED_PSNR[name], strict=True)]


def published_vs_anchors(res: dict) -> dict[str, dict[str, float]]:
    """BD-rate of every published curve against each single-layer anchor of an eval result
    (negative: the published codec needs fewer bits than that anchor here)."""
    return {name: {anchor: bd_points(a["single"], published_curve(name))
                   for anchor, a in res.get("anchors", {}).items()}
            for name in PUBLISHED_PSNR}
