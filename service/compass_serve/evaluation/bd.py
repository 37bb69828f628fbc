"""Bjontegaard delta-rate (VCEG-M33): the average rate difference at equal PSNR.

Interpolation: a cubic polynomial of log(rate) in PSNR is fitted to each curve (exact through
4 points; least squares with more), integrated over the PSNR interval both curves cover.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bd_rate(
    rate_anchor: Sequence[float], psnr_anchor: Sequence[float],
    rate_test: Sequence[float], psnr_test: Sequence[float],
    within: tuple[float, float] | None = None,
) -> float:
    """Percent rate change of `test` against `anchor` (negative: test needs fewer bits).

    `within` (PSNR low, high) narrows the interval both curves cover, so that models whose rate
    points moved are compared with an anchor over the same PSNRs. Returns NaN when the curves
    share no PSNR interval or have too few points.
    """
    ra, pa = np.log(np.asarray(rate_anchor, float)), np.asarray(psnr_anchor, float)
    rt, pt = np.log(np.asarray(rate_test, float)), np.asarray(psnr_test, float)
    if min(len(pa), len(pt)) < 2:
        return float("nan")
    lo, hi = max(pa.min(), pt.min()), min(pa.max(), pt.max())
    if within is not None:
        lo, hi = max(lo, within[0]), min(hi, within[1])
    if hi <= lo:
        return float("nan")
    deg_a, deg_t = min(3, len(pa) - 1), min(3, len(pt) - 1)
    fa = np.polyint(np.polyfit(pa, ra, deg_a))
    ft = np.polyint(np.polyfit(pt, rt, deg_t))
    avg_a = (np.polyval(fa, hi) - np.polyval(fa, lo)) / (hi - lo)
    avg_t = (np.polyval(ft, hi) - np.polyval(ft, lo)) / (hi - lo)
    return float((np.exp(avg_t - avg_a) - 1) * 100)
