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
import torch.nn.functional as F
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
    # "none": the paper's LIFF. "bicubic": LIFF predicts a correction to bicubic up-sampling and
    # starts as exactly bicubic (zero-initialised filter), which converges in far fewer CPU
    # steps; the filter can still learn any linear map of the neighbourhood on top.
    skip: str = "none"


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
            feats.append(torch.relu_(conv(torch.cat(feats, 1))))  # in place: conv keeps no output
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


RENDER_CHUNK = 16384  # output pixels per rendering chunk at inference


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
        if cfg.skip not in ("none", "bicubic"):
            raise ValueError(f"unknown LIFF skip {cfg.skip!r} (none or bicubic)")
        if cfg.skip == "bicubic":
            nn.init.zeros_(self.filter.weight)

    @property
    def halo(self) -> int:
        """Low-res rows beyond a strip that influence it (receptive radius of the 3x3 convs)."""
        return self.cfg.blocks * self.cfg.convs + 4

    def _lowres(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per low-res pixel, channels last: first-layer term [B,h,w,H], filter terms G
        [B,h,w,3H] and their bias [B,h,w,3]. Kept as separate tensors: slicing one
        concatenated tensor costs a full-size zero-fill per slice in the backward pass."""
        if not self.training:
            # oneDNN's convolutions run ~2.5x faster on NHWC at inference, and the permuted
            # maps below are then contiguous for free.
            x = x.contiguous(memory_format=torch.channels_last)
        feat = self.features(x)
        hid3 = 3 * self.cfg.hidden
        w, pad = self.filter.weight, self.filter.padding
        maps = [self.first(feat), F.conv2d(feat, w[:hid3], padding=pad),
                F.conv2d(feat, w[hid3:], padding=pad)]
        # Contiguous once here: the chunked renderer gathers from these maps many times.
        return [m.permute(0, 2, 3, 1).contiguous() for m in maps]

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        b, _, hl, wl = x.shape
        h_hi, w_hi = size
        base = None
        if self.cfg.skip == "bicubic":
            base = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        if self.training:
            # .float(): under bf16 autocast (training only) the rendered filter output is bf16.
            pred = self._render(self._lowres(x), 0, (hl, wl), size, 0, h_hi).float()
            return pred if base is None else pred + base
        # Inference: horizontal strips of the lower layer (with a halo, so results equal the
        # whole-image computation) keep feature memory bounded at any size.
        iy, _ = _axis(hl, h_hi, x.device)
        strip = max(16, self.cfg.chunk_pixels * 4 // max(1, wl))
        out = x.new_zeros(b, 3, h_hi, w_hi) if base is None else base
        for a in range(0, hl, strip):
            z = min(hl, a + strip)
            rows = torch.nonzero((iy >= a) & (iy < z)).flatten()
            if rows.numel() == 0:
                continue
            lo0, lo1 = max(0, a - self.halo), min(hl, z + self.halo)
            lowres = [m[:, a - lo0 : z - lo0] for m in self._lowres(x[..., lo0:lo1, :])]
            y0, y1 = int(rows[0]), int(rows[-1]) + 1
            # Render in cache-sized chunks: the per-pixel tensors then stay in L2/L3, which is
            # ~2x faster on CPU than chunks of the strip's size.
            step = max(1, min(self.cfg.chunk_pixels, RENDER_CHUNK) // w_hi)
            for r0 in range(y0, y1, step):
                r1 = min(y1, r0 + step)
                out[..., r0:r1, :] += self._render(lowres, a, (hl, wl), size, r0, r1)
        return out

    def _render(
        self, lowres: list[torch.Tensor], row0: int, lo: Size, hi: Size, y0: int, y1: int
    ) -> torch.Tensor:
        """Output rows y0..y1 from precomputed low-res maps whose first row is `row0`."""
        b = lowres[0].shape[0]
        (hl, wl), (h_hi, w_hi) = lo, hi
        hid = self.cfg.hidden
        dev = lowres[0].device
        iy, ry = _axis(hl, h_hi, dev)
        ix, rx = _axis(wl, w_hi, dev)
        iy, ry = iy[y0:y1] - row0, ry[y0:y1]
        # Scale token: 2 * H_lower / H_upper per axis (the cell size in [-1, 1] units of the lower).
        s = torch.tensor([2 * hl / h_hi, 2 * wl / w_hi], device=dev)
        n_rows = y1 - y0
        src = (iy[:, None] * wl + ix[None, :]).reshape(-1)               # nearest low-res pixel
        # The coordinate term is linear in (ry, rx, s): a per-row plus a per-column vector,
        # broadcast, instead of a [P, 4] @ [4, H] product over every pixel.
        wc = self.coord.weight                                            # [H, 4]
        row_term = ry[:, None] * wc[:, 0] + (s @ wc[:, 2:].T + self.coord.bias)  # [rows, H]
        col_term = rx[:, None] * wc[:, 1]                                 # [W, H]
        coord = (row_term[:, None, :] + col_term[None, :, :]).reshape(1, -1, hid)
        # Channels-last gathers: whole contiguous rows per pixel (and a row-wise index_add in
        # the backward pass), several times faster on CPU than gathering along the last axis.
        offsets = torch.arange(b, device=dev)[:, None] * (lowres[0].shape[1] * wl)
        index = (offsets + src[None, :]).reshape(-1)
        first, g, bias = (m.reshape(-1, m.shape[-1]).index_select(0, index).view(b, -1, m.shape[-1])
                          for m in lowres)                                # [B, P, .]
        # In place wherever autograd allows: at inference every per-pixel temporary is a fresh
        # multi-MB allocation, and skipping them speeds LIFF up (same arithmetic,
        # so bit-identical results).
        h = torch.relu_(first.add_(coord))  # index_select, add and addmm keep no output
        for layer in self.hidden:
            h = torch.relu_(layer(h))
        g = g.view(b, -1, 3, hid)
        # The product's backward needs g, so only inference may overwrite it.
        prod = g * h.unsqueeze(2) if torch.is_grad_enabled() else g.mul_(h.unsqueeze(2))
        pred = prod.sum(-1).add_(bias)                                    # [B, P, 3]
        return pred.transpose(1, 2).reshape(b, 3, n_rows, w_hi)
