"""Checkerboard context model for the mean-scale hyperprior (He et al., CVPR 2021).

The latent is split into two interleaved halves. "Anchors" ((row + col) even) are coded with
the hyperprior's entropy parameters alone; the other half is coded second, with parameters
refined from the decoded anchors around it. Both halves decode in one parallel pass each (no
serial autoregression), so decoding stays fast while the second half costs fewer bits.

The context sees the anchors' quantised offsets from their means (the coded symbols, y_hat - mu,
and their magnitudes), not y_hat itself: neighbouring offsets correlate strongly (0.6 on this
project's base layer), while y_hat mostly repeats the hyperprior's mean field.

The refinement is a residual on the hyperprior's parameters whose last layer starts at zero:
a model extended with a context starts out exactly as the model without it, and training
only has to learn what the neighbours add. Like the hyper-synthesis, it runs on the exact
grid at coding time, because it picks CDF indices (see `layers.exact_conv`).
"""

from __future__ import annotations

import torch
from torch import nn

from compass_serve.codec.layers import exact_conv


def anchor_mask(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[H, W] bool, True where (row + col) is even: the half coded first."""
    rows = torch.arange(height, device=device)[:, None]
    cols = torch.arange(width, device=device)[None, :]
    return (rows + cols) % 2 == 0


class CheckerboardContext(nn.Module):
    """Entropy parameters for the non-anchor half from the hyperprior's and the anchors'.

    Per-channel 5x5 filters gather each channel's decoded anchor offsets and their magnitudes;
    two 1x1 layers mix them with the hyperprior's (scales, means) into a correction of those.
    """

    def __init__(self, m: int, hidden: int) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(2 * m, 2 * m, 5, padding=2, groups=2 * m)
        self.mix = nn.Conv2d(4 * m, hidden, 1)
        self.out = nn.Conv2d(hidden, 2 * m, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, params: torch.Tensor, offsets: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """Entropy parameters [B, 2M, H, W] of the whole latent: the hyperprior's `params` at the
        anchors, corrected ones elsewhere; `offsets` is y_hat - mu at the anchors, 0 elsewhere."""
        mask = anchor_mask(*params.shape[-2:], device=params.device)
        anchors = torch.cat([offsets, offsets.abs()], 1)
        if not exact:
            ctx = self.spatial(anchors)
            h = torch.relu(self.mix(torch.cat([params, ctx], 1)))
            return torch.where(mask, params, params + self.out(h))
        # Coding time: the 1x1 layers run on the second half's positions only, as [B, C, K, 1].
        rest = ~mask.cpu()
        p = params.double().cpu()
        ctx = exact_conv(self.spatial, anchors)
        h = exact_conv(self.mix, torch.cat([p, ctx], 1)[..., rest, None]).clamp_min(0)
        out = p.clone()
        # Both terms lie on the exact grid, so their sum is exact in float32 too.
        out[..., rest] = p[..., rest] + exact_conv(self.out, h)[..., 0]
        return out.float().to(params.device)


__all__ = ["CheckerboardContext", "anchor_mask"]
