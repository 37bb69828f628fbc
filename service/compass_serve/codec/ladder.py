"""Layer ladders: the sizes an image is coded at, smallest (base layer) first."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from compass_serve.codec.bitstream import MAX_LAYERS
from compass_serve.imageio import fit_width

Dim = tuple[int, int]  # (width, height)

DEFAULT_BASE_MAX_SIDE = 256


class LadderError(ValueError):
    """The requested layer sizes are not usable for this image."""


def default_ladder(
    width: int, height: int, base_max_side: int = DEFAULT_BASE_MAX_SIDE
) -> list[Dim]:
    """Halve from the full size until the base layer's longer side is at most `base_max_side`."""
    sizes = [(width, height)]
    while max(sizes[-1]) > base_max_side and len(sizes) < MAX_LAYERS:
        w, h = sizes[-1]
        sizes.append((max(1, round(w / 2)), max(1, round(h / 2))))
    return sizes[::-1]


def ladder_from_widths(width: int, height: int, widths: Sequence[int]) -> list[Dim]:
    ws = list(widths)
    if not ws:
        raise LadderError("at least one layer width is needed")
    for w in ws:
        if not 1 <= w <= width:
            raise LadderError(f"layer width {w} is outside 1..{width} (the image's width)")
    return _check([fit_width(width, height, w) for w in ws])


def ladder_from_scales(width: int, height: int, scales: Sequence[float]) -> list[Dim]:
    ss = list(scales)
    if not ss:
        raise LadderError("at least one layer scale is needed")
    for s in ss:
        if not 0 < s <= 1:
            raise LadderError(f"layer scale {s} is outside (0, 1]")
    return _check([(max(1, round(width * s)), max(1, round(height * s))) for s in ss])


def make_ladder(
    width: int, height: int, widths: Sequence[int] | None = None,
    scales: Sequence[float] | None = None,
) -> list[Dim]:
    if widths is not None and scales is not None:
        raise LadderError("give layer widths or layer scales, not both")
    if widths is not None:
        return ladder_from_widths(width, height, widths)
    if scales is not None:
        return ladder_from_scales(width, height, scales)
    return default_ladder(width, height)


def _check(sizes: list[Dim]) -> list[Dim]:
    if len(sizes) > MAX_LAYERS:
        raise LadderError(f"{len(sizes)} layers requested; at most {MAX_LAYERS} are supported")
    for (w0, h0), (w1, h1) in pairwise(sizes):
        if w1 <= w0 and h1 <= h0:
            raise LadderError(
                f"layers must grow from the base layer up: {w0}x{h0} is followed by {w1}x{h1}"
            )
        if w1 < w0 or h1 < h0:
            raise LadderError(f"layer {w1}x{h1} is smaller than the layer below ({w0}x{h0})")
    return sizes
