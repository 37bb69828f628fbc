"""LIFF: the local implicit filter function, COMPASS's arbitrary-scale inter-layer predictor.

For every pixel of the larger layer, an MLP maps (the unfolded 3x3 feature of the nearest
lower-layer pixel, the relative offset r, the scale token s) to a per-pixel colour filter of
shape (C*9) x 3, and the prediction is unfolded_feature @ filter.

The product is reordered so that neither the filter nor the MLP's feature input is ever built
per output pixel. Both the MLP's first layer and the filter are linear in the unfolded feature
u, and u only changes with the nearest LOW-resolution pixel, so
    first-layer term  W1u @ u          -> one 3x3 conv on the feature map (per low-res pixel)
    prediction_c      = sum_k h_k (u @ W_last)[c, k] + (u @ b_last)[c]
                                        -> another 3x3 conv, then a 3*H dot per output pixel.
This is algebraically the same function as the paper's formulation; per output pixel only the
hidden layers of the MLP remain, and pixels are processed in chunks so memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compass_serve.codec.layers import Size


@dataclass(frozen=True)
class LiffConfig:
    features: int = 32        # feature channels C (paper: 64)
    blocks: int = 2           # residual dense blocks (paper: 4)
    convs: int = 3            # convs per dense block (paper: 4)
    growth: int = 16          # dense growth rate (paper: 32)
    hidden: int = 64          # MLP width (paper: 256)
    depth: int = 3            # MLP hidden layers (paper: 4)
    chunk_pixels: int = 65536  # output pixels evaluated at once at inference


class DenseBlock(nn.Module):
    """Residual dense block: densely connected 3x3 convs, 1x1 fusion, local residual."""

    def __init__(self, channels: int, growth: int, convs: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(channels + i * growth, growth, 3, padding=1) for i in range(convs)
        )
        self.fuse = nn.Conv2d(channels + convs * growth, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in self.convs:
            feats.append(torch.relu(conv(torch.cat(feats, 1))))
        return x + self.fuse(torch.cat(feats, 1))


class Rdn(nn.Module):
    """Residual dense network feature extractor with a global skip (paper: RDN as in LIIF)."""

    def __init__(self, cfg: LiffConfig) -> None:
        super().__init__()
        c = cfg.features
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.ModuleList(DenseBlock(c, cfg.growth, cfg.convs) for _ in range(cfg.blocks))
        self.fuse = nn.Sequential(nn.Conv2d(c * cfg.blocks, c, 1), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shallow = self.head(x - 0.5)
        outs, h = [], shallow
        for block in self.body:
            h = block(h)
            outs.append(h)
        return shallow + self.fuse(torch.cat(outs, 1))


def _axis(n_lo: int, n_hi: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest low-res index and offset r (in low-res pixels) for each high-res pixel centre."""
    centres = (torch.arange(n_hi, device=device, dtype=torch.float64) + 0.5) / n_hi  # in (0, 1)
    idx = torch.clamp(torch.floor(centres * n_lo), 0, n_lo - 1)
    offset = centres * n_lo - (idx + 0.5)
    return idx.long(), offset.float()


class Liff(nn.Module):
    """Arbitrary-scale predictor: `liff(x_lower, (H, W))` -> prediction of the (H, W) layer."""

    def __init__(self, cfg: LiffConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, h = cfg.features, cfg.hidden
        self.features = Rdn(cfg)
        # One 3x3 conv realises both linear maps of the unfolded feature (see module docstring).
        self.first = nn.Conv2d(c, h, 3, padding=1)
        self.filter = nn.Conv2d(c, 3 * h + 3, 3, padding=1, bias=False)
        self.coord = nn.Linear(4, h)  # r (2) and scale token s (2) into the first layer
        self.hidden = nn.ModuleList(nn.Linear(h, h) for _ in range(cfg.depth - 1))

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        feat = self.features(x)
        lowres = torch.cat([self.first(feat), self.filter(feat)], 1)  # [B, H + 3H + 3, h, w]
        return self._render(lowres, size)

    def _render(self, lowres: torch.Tensor, hi: Size) -> torch.Tensor:
        b, _, hl, wl = lowres.shape
        h_hi, w_hi = hi
        hid = self.cfg.hidden
        iy, ry = _axis(hl, h_hi, lowres.device)
        ix, rx = _axis(wl, w_hi, lowres.device)
        # Scale token: 2 * H_lower / H_upper per axis (the cell size in [-1, 1] units of the lower).
        s = torch.tensor([2 * hl / h_hi, 2 * wl / w_hi], device=lowres.device)
        flat = lowres.flatten(2)  # [B, ch, hl*wl]
        out = lowres.new_empty(b, 3, h_hi * w_hi)
        rows = max(1, (self.cfg.chunk_pixels if not self.training else 1 << 30) // w_hi)
        for y0 in range(0, h_hi, rows):
            y1 = min(h_hi, y0 + rows)
            gy, gx = torch.meshgrid(torch.arange(y0, y1, device=lowres.device),
                                    torch.arange(w_hi, device=lowres.device), indexing="ij")
            gy, gx = gy.reshape(-1), gx.reshape(-1)
            src = iy[gy] * wl + ix[gx]                                     # nearest low-res pixel
            coords = torch.stack([ry[gy], rx[gx], s[0].expand_as(gy.float()),
                                  s[1].expand_as(gy.float())], -1)          # [P, 4]
            picked = flat[:, :, src]                                       # [B, ch, P]
            first, filt = picked[:, :hid], picked[:, hid:]
            h = torch.relu(first.transpose(1, 2) + self.coord(coords))     # [B, P, H]
            for layer in self.hidden:
                h = torch.relu(layer(h))
            g = filt[:, : 3 * hid].reshape(b, 3, hid, -1)                  # [B, 3, H, P]
            pred = torch.einsum("bph,bchp->bcp", h, g) + filt[:, 3 * hid:]
            out[:, :, y0 * w_hi: y1 * w_hi] = pred
        return out.reshape(b, 3, h_hi, w_hi)
