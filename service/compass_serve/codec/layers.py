"""Building blocks: stride-2 stages with layer-wise padding, and an exactly reproducible conv path.

Layer-wise padding (COMPASS): instead of padding the whole image to a multiple of 64, every
stride-2 convolution that would see an odd size gets one replicated row/column first, and the
matching transposed convolution crops it again. The crop sizes follow from the layer's (H, W)
alone, so the bitstream only needs each layer's size.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

Size = tuple[int, int]


def halvings(height: int, width: int, steps: int) -> list[Size]:
    """Sizes a stack of `steps` stride-2 stages sees: [(H, W), ceil(/2), ...] (steps+1 of them)."""
    sizes = [(height, width)]
    for _ in range(steps):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


class Down(nn.Module):
    """5x5 stride-2 convolution that replicate-pads an odd height or width by one first."""

    def __init__(self, cin: int, cout: int, kernel: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=2, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = x.shape[-2] % 2, x.shape[-1] % 2
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return self.conv(x)


class Up(nn.Module):
    """5x5 stride-2 transposed convolution that crops to the size its matching `Down` saw."""

    def __init__(self, cin: int, cout: int, kernel: int = 5) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(
            cin, cout, kernel, stride=2, padding=kernel // 2, output_padding=1
        )

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        return self.conv(x)[..., : size[0], : size[1]]


class _Stack(nn.Module):
    """Stride-2 stages with an activation between each two: what Analysis and Synthesis share."""

    stages: nn.ModuleList
    acts: nn.ModuleList

    @property
    def stride(self) -> int:
        return 2 ** len(self.stages)


class Analysis(_Stack):
    """Down-sampling stack: Down, act, Down, act, ..., Down (no activation after the last)."""

    def __init__(self, channels: list[int], act: type[nn.Module] | None, kernel: int = 5) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            Down(a, b, kernel) for a, b in pairwise(channels)
        )
        self.acts = nn.ModuleList(_make_act(act, c, False) for c in channels[1:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.acts):
                x = self.acts[i](x)
        return x

    def halo(self) -> int:
        """Input pixels a tile needs beyond its edge so that its latent equals the whole image's:
        each stage's zero padding at a cut spoils `ceil((spoilt + pad) / 2)` outputs there (the
        activations are pointwise in space), rounded up to whole latent cells."""
        spoilt = 0
        for stage in self.stages:
            spoilt = -(-(spoilt + stage.conv.padding[0]) // 2)
        return spoilt * self.stride

    def tiled(self, x: torch.Tensor, tile: int) -> torch.Tensor:
        """`forward` in tiles of about `tile` x `tile` input pixels, for inference on large images:
        the peak memory is a tile's activations (at 12 MP and 192 channels, the whole image's
        first activation alone is 2.3 GB) instead of the image's. Each tile reads a halo of
        real neighbours (`halo`) and keeps only its own latent cells, so the result is the same
        function; cuts lie on the stride grid, so the layer-wise padding of an odd edge happens
        where it does for the whole image. Float sums may differ in the last bits: fine for an
        encoder, whose latent is rounded and coded (the decoder never runs this)."""
        h, w = x.shape[-2:]
        step = max(self.stride, tile // self.stride * self.stride)
        if h <= step and w <= step:
            return self(x)
        halo = self.halo()
        lh, lw = halvings(h, w, len(self.stages))[-1]
        out: torch.Tensor | None = None
        for r0 in range(0, h, step):
            for c0 in range(0, w, step):
                ra, ca = max(0, r0 - halo), max(0, c0 - halo)
                part = self(x[..., ra : min(h, r0 + step + halo), ca : min(w, c0 + step + halo)])
                if out is None:
                    out = part.new_empty(*part.shape[:-2], lh, lw)
                lr, lc, s = r0 // self.stride, c0 // self.stride, self.stride
                rows, cols = min(lh, (r0 + step) // s) - lr, min(lw, (c0 + step) // s) - lc
                out[..., lr : lr + rows, lc : lc + cols] = part[
                    ..., (r0 - ra) // s : (r0 - ra) // s + rows, (c0 - ca) // s : (c0 - ca) // s + cols]
        assert out is not None
        return out


class Synthesis(_Stack):
    """Up-sampling stack mirroring `Analysis`; `sizes` lists the target size of each stage."""

    def __init__(self, channels: list[int], act: type[nn.Module] | None, kernel: int = 5) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            Up(a, b, kernel) for a, b in pairwise(channels)
        )
        self.acts = nn.ModuleList(_make_act(act, c, True) for c in channels[1:-1])

    def forward(self, x: torch.Tensor, sizes: list[Size]) -> torch.Tensor:
        for i, (stage, size) in enumerate(zip(self.stages, sizes, strict=True)):
            x = stage(x, size)
            if i < len(self.acts):
                x = self.acts[i](x)
        return x

    def halo(self) -> int:
        """Latent cells a tile needs beyond its edge so that its output equals the whole image's:
        a stride-2 transposed convolution spoils `2 * spoilt + max(pad, kernel - 1 - pad)`
        outputs next to a cut (the activations are pointwise in space), rounded up to whole latent cells."""
        spoilt = 0
        for stage in self.stages:
            conv = stage.conv
            pad = conv.padding[0]
            spoilt = 2 * spoilt + max(pad, conv.kernel_size[0] - 1 - pad)
        return -(-spoilt // self.stride)

    def tiled(self, x: torch.Tensor, sizes: list[Size], tile: int) -> torch.Tensor:
        """`forward` in tiles of about `tile` x `tile` output pixels, for inference on large
        images (the mirror of `Analysis.tiled`): each tile reads `halo` latent cells of real
        neighbours and keeps only its own pixels; a tile at the bottom or right edge is cropped
        at every stage as the whole image is, so the result is the same function up to the
        order of float sums."""
        lh, lw = x.shape[-2:]
        s = self.stride
        step = max(1, tile // s)
        if lh <= step and lw <= step:
            return self(x, sizes)
        halo, (h, w) = self.halo(), sizes[-1]
        out: torch.Tensor | None = None
        for r0 in range(0, lh, step):
            for c0 in range(0, lw, step):
                ra, rb = max(0, r0 - halo), min(lh, r0 + step + halo)
                ca, cb = max(0, c0 - halo), min(lw, c0 + step + halo)
                # Stage i scales by 2^(i+1); only a tile at the bottom/right edge is cropped.
                part = self(x[..., ra:rb, ca:cb], [
                    (sh - ra * 2 ** (i + 1) if rb == lh else (rb - ra) * 2 ** (i + 1),
                     sw - ca * 2 ** (i + 1) if cb == lw else (cb - ca) * 2 ** (i + 1))
                    for i, (sh, sw) in enumerate(sizes)])
                if out is None:
                    out = part.new_empty(*part.shape[:-2], h, w)
                rows, cols = min(h, (r0 + step) * s) - r0 * s, min(w, (c0 + step) * s) - c0 * s
                out[..., r0 * s : r0 * s + rows, c0 * s : c0 * s + cols] = part[
                    ..., (r0 - ra) * s : (r0 - ra) * s + rows, (c0 - ca) * s : (c0 - ca) * s + cols]
        assert out is not None
        return out


def _make_act(act: type[nn.Module] | None, channels: int, inverse: bool) -> nn.Module:
    from compressai.layers import GDN

    if act is None:
        return nn.Identity()
    if act is GDN:
        return GDN(channels, inverse=inverse)
    return act()


# --- Exactly reproducible evaluation -------------------------------------------------------------
# The hyper-synthesis picks the entropy coder's CDF indices; if encoder and decoder disagree on a
# single index, everything after it decodes to garbage. Float32 convolutions differ with thread
# count and device, so this path runs in float64 on a fixed grid: weights are multiples of
# 2**-WEIGHT_BITS, activations are rounded to 2**-ACT_BITS after each layer, and all partial sums
# are exact binary fractions far below 2**53. Summation order then cannot change the result.

WEIGHT_BITS = 12
ACT_BITS = 10


def snap(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round to the nearest multiple of 2**-bits (float64)."""
    scale = float(2**bits)
    return torch.round(x.double() * scale) / scale


@torch.no_grad()
def exact_conv(module: nn.Conv2d | nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """Apply a (transposed) convolution exactly: snapped float64 weights and inputs, on the CPU."""
    w = snap(module.weight.detach().cpu(), WEIGHT_BITS)
    b = None
    if module.bias is not None:
        b = snap(module.bias.detach().cpu(), WEIGHT_BITS + ACT_BITS)
    x = snap(x.detach().cpu(), ACT_BITS)
    if isinstance(module, nn.ConvTranspose2d):
        out = F.conv_transpose2d(
            x, w, b, module.stride, module.padding, module.output_padding, module.groups,
            module.dilation,
        )
    else:
        out = F.conv2d(x, w, b, module.stride, module.padding, module.dilation, module.groups)
    return snap(out, ACT_BITS)


@torch.no_grad()
def snap_weights_(module: nn.Module) -> None:
    """Put a module's conv weights on the exact grid, so training-time and exact paths agree."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            m.weight.copy_(snap(m.weight, WEIGHT_BITS).to(m.weight.dtype))
            if m.bias is not None:
                m.bias.copy_(snap(m.bias, WEIGHT_BITS + ACT_BITS).to(m.bias.dtype))
