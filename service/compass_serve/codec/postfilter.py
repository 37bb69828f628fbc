"""A post-filter on each enhancement layer's decoded image: decode time spent for quality.

The residual codec's reconstruction P + RC^-1 still carries coding artefacts that a small
convolutional network, seeing the layer and its LIFF prediction, can undo in part. The filter
acts on what the decoder shows only: the chain of layers (the next layer's prediction) reads the
unfiltered reconstruction, so streams and layer ranges are unchanged, and a model without a
filter (`channels` 0) decodes exactly as before. The quality the stream was coded at enters as
one constant input plane, because the artefacts to undo shrink as the rate grows (a filter
blind to it smoothed high-quality layers and lost PSNR there).
Its last convolution starts at zero: a fresh filter is the identity.

`in_loop` moves the filter into the chain: the next layer's LIFF reads the filtered layer, a
cleaner prediction source (a display-trained filter put in the loop unchanged saved 1.2 % of the
top layer's bits on 6 Kodak images, most at low rates). Streams then depend on the filter, so it
is a different codec: a preset of its own, whose weights get their own identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import nn


@dataclass(frozen=True)
class PostFilterConfig:
    channels: int = 0  # hidden channels; 0: no filter
    layers: int = 3    # 3x3 convolutions
    in_loop: bool = False  # the next layer's prediction reads the filtered layer


class PostFilter(nn.Module):
    """x + f(x, prediction, quality plane), with f a stack of 3x3 convolutions and ReLUs."""

    def __init__(self, cfg: PostFilterConfig, qualities: int) -> None:
        super().__init__()
        if cfg.channels <= 0 or cfg.layers < 2:
            raise ValueError(f"a post-filter needs channels > 0 and at least 2 layers, got {cfg}")
        self.qualities = qualities
        widths = [7, *[cfg.channels] * (cfg.layers - 1), 3]
        convs: list[nn.Module] = []
        for i, (a, b) in enumerate(pairwise(widths)):
            convs.append(nn.Conv2d(a, b, 3, padding=1))
            if i < cfg.layers - 1:
                convs.append(nn.ReLU())
        self.net = nn.Sequential(*convs)
        last = self.net[-1]
        assert isinstance(last, nn.Conv2d)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.halo = cfg.layers  # each 3x3 convolution reads one pixel beyond its output

    def quality_plane(self, quality: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
        """Quality as (q - 1) / (Q - 1) in [0, 1]: an int tensor holds 0-based trained levels
        (training), a float the stream's quality 1..Q (decoding)."""
        span = max(1, self.qualities - 1)
        if isinstance(quality, torch.Tensor):
            t = quality.to(like.dtype).reshape(-1, 1, 1, 1) / span
        else:
            t = torch.full((1, 1, 1, 1), (float(quality) - 1) / span, dtype=like.dtype)
        return t.to(like.device).expand(like.shape[0], 1, *like.shape[-2:])

    def forward(self, x: torch.Tensor, prediction: torch.Tensor,
                quality: torch.Tensor | float) -> torch.Tensor:
        inp = torch.cat([x, prediction, self.quality_plane(quality, x)], 1)
        return x + self.net(inp)

    @torch.no_grad()
    def tiled(self, x: torch.Tensor, prediction: torch.Tensor, quality: float,
              tile: int) -> torch.Tensor:
        """`forward` in tiles of `tile` pixels a side for inference (channels-last, oneDNN's fast
        layout): the hidden maps are the size of the image times `channels`, so a tile bounds
        the peak memory. Each tile reads `halo` real neighbours, so the result is the same
        function up to the order of float sums."""
        h, w = x.shape[-2:]
        inp = torch.cat([x, prediction, self.quality_plane(quality, x)], 1)
        inp = inp.contiguous(memory_format=torch.channels_last)
        if h <= tile and w <= tile:
            return x + self.net(inp).contiguous()
        out = torch.empty_like(x)
        k = self.halo
        for r0 in range(0, h, tile):
            for c0 in range(0, w, tile):
                ra, ca = max(0, r0 - k), max(0, c0 - k)
                rb, cb = min(h, r0 + tile + k), min(w, c0 + tile + k)
                part = self.net(inp[..., ra:rb, ca:cb])
                rows, cols = min(h, r0 + tile) - r0, min(w, c0 + tile) - c0
                out[..., r0 : r0 + rows, c0 : c0 + cols] = part[
                    ..., r0 - ra : r0 - ra + rows, c0 - ca : c0 - ca + cols]
        return x + out


def deepen(old: PostFilter, new: PostFilter) -> None:
    """Load `old` (trained) into `new`, a filter of the same width with more layers, so that `new`
    computes the same function: the old hidden convolutions come first, the added ones start as
    the identity (a Dirac kernel, zero bias) and the old last convolution ends the stack. The
    identity is exact because each added convolution reads a ReLU's output, which the next ReLU
    leaves as it is. Training then grows the receptive field from a filter that already works."""
    a = [m for m in old.net if isinstance(m, nn.Conv2d)]
    b = [m for m in new.net if isinstance(m, nn.Conv2d)]
    hidden = a[0].out_channels
    if len(b) < len(a) or any(m.out_channels != hidden for m in b[:-1]) or (
            b[0].in_channels != a[0].in_channels):
        raise ValueError("deepen needs a filter of the same width with at least as many layers")
    with torch.no_grad():
        for src, dst in zip([*a[:-1], *[None] * (len(b) - len(a)), a[-1]], b, strict=True):
            if src is None:
                nn.init.dirac_(dst.weight)
                nn.init.zeros_(dst.bias)
            else:
                dst.weight.copy_(src.weight)
                dst.bias.copy_(src.bias)
