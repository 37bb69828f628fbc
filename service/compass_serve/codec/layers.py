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


class Analysis(nn.Module):
    """Down-sampling stack: Down, act, Down, act, ..., Down (no activation after the last)."""

    def __init__(self, channels: list[int], act: type[nn.Module] | None, kernel: int = 5) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            Down(a, b, kernel) for a, b in pairwise(channels)
        )
        n = len(self.stages) - 1
        self.acts = nn.ModuleList(_make_act(act, c, False) for c in channels[1:-1])
        assert len(self.acts) == n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.acts):
                x = self.acts[i](x)
        return x


class Synthesis(nn.Module):
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
