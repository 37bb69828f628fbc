"""Transform codecs used as the image codec (IC, base layer) and the residual codec (RC).

Both follow CompressAI's hyperprior models (Balle et al. 2018, Minnen et al. 2018) with three
changes this project needs:
- layer-wise padding (any H x W, no multiple-of-64 padding);
- no clamping anywhere: the RC reconstructs signed residuals;
- variable rate through per-quality gain vectors on the latent (Cui et al., "Asymmetric gained
  deep image compression"), so one set of weights serves a continuous quality knob; quality q in
  [1, Q] interpolates neighbouring gain vectors geometrically.
The mean-scale hyper-synthesis runs on an exact integer-like grid at coding time, so the
entropy coder's CDF indices are the same on every machine (see `layers.exact_conv`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import GDN
from torch import nn

from compass_serve.codec.layers import Analysis, Size, Synthesis, exact_conv, halvings
from compass_serve.codec.refine import Refinement, rd_cost, refine_latent

# CompressAI's scale table: 64 log-spaced scales from 0.11 to 256.
SCALES_MIN, SCALES_MAX, SCALES_LEVELS = 0.11, 256.0, 64


# Inference runs the analysis and synthesis transforms in tiles of this many image pixels a side
# (`Analysis.tiled`, `Synthesis.tiled`): their full-resolution activations are the largest tensors
# of an encode or a decode, so a tile bounds the peak memory at any image size.
TRANSFORM_TILE = 1024


def scale_table() -> list[float]:
    return torch.exp(
        torch.linspace(math.log(SCALES_MIN), math.log(SCALES_MAX), SCALES_LEVELS)
    ).tolist()


def quality_levels(quality: float, levels: int) -> tuple[int, int, float]:
    """Quality q in [1, levels] as (lower level, upper level, weight of the upper), 0-based:
    fractional qualities interpolate log-gains (and lambdas) between trained levels."""
    q = min(max(float(quality), 1.0), float(levels)) - 1.0
    lo = min(math.floor(q), levels - 1)
    return lo, min(lo + 1, levels - 1), q - lo


def regrid_gains(
    state: dict[str, torch.Tensor], old: Sequence[float], new: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Move every gain table in `state` from the rate ladder `old` (lambdas) to `new`.

    Each new level's log-gains are linear in log-lambda between the two old levels around it
    and extrapolated from the nearest two beyond the ends, so levels both ladders share keep
    their exact vectors: a model widened this way codes its old rate points as before, and its
    new ones start where the trained ones point (training then refines them)."""
    if len(old) < 2 or len(new) < 1:
        raise ValueError("regridding needs at least 2 old levels and 1 new one")
    logs = [math.log(v) for v in old]
    if logs != sorted(set(logs)):
        raise ValueError(f"the old ladder must rise strictly, got {list(old)}")
    where = []  # per new level: the old segment (i-1, i) and the position t along it
    for lam in new:
        x = math.log(lam)
        i = min(max(bisect.bisect_left(logs, x), 1), len(logs) - 1)
        where.append((i, (x - logs[i - 1]) / (logs[i] - logs[i - 1])))
    out = dict(state)
    for key, table in state.items():
        if key.endswith(("log_gain", "log_inv_gain")):
            # lerp returns either end exactly at t = 0 and t = 1 (shared levels stay bit-equal).
            out[key] = torch.stack([torch.lerp(table[i - 1], table[i], t) for i, t in where])
    return out


@dataclass(frozen=True)
class BackboneConfig:
    n: int = 64                      # transform channels
    m: int = 96                      # latent channels
    in_channels: int = 3
    qualities: int = 4               # number of trained gain vectors (quality 1..qualities)
    entropy: str = "hyperprior"      # "hyperprior" (mean-scale) or "factorized"
    # Hidden channels of the analysis / synthesis transforms where they differ from n: a wider
    # analysis costs encode time only, paid once per image; the synthesis is paid per decode.
    n_analysis: int | None = None
    n_synthesis: int | None = None

    @property
    def analysis_width(self) -> int:
        return self.n_analysis or self.n

    @property
    def synthesis_width(self) -> int:
        return self.n_synthesis or self.n


@dataclass
class Coded:
    """Result of coding one image with a backbone."""

    strings: list[bytes]
    x_hat: torch.Tensor


class Backbone(nn.Module):
    """Analysis/synthesis transforms and per-quality gains; entropy model in subclasses."""

    # Stride-2 stages of g_a and g_s, a class constant so that latent sizes follow from the
    # image size alone (no instance needed).
    HALVINGS = 4

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        na, ns, m, c = cfg.analysis_width, cfg.synthesis_width, cfg.m, cfg.in_channels
        self.g_a = Analysis([c, *[na] * (self.HALVINGS - 1), m], GDN)
        self.g_s = Synthesis([m, *[ns] * (self.HALVINGS - 1), c], GDN)
        # Gains start spread so that quality levels begin at different rates.
        spread = torch.linspace(-1.0, 1.0, cfg.qualities)[:, None].expand(cfg.qualities, m)
        self.log_gain = nn.Parameter(spread.clone())
        self.log_inv_gain = nn.Parameter(-spread.clone())

    # -- gains ------------------------------------------------------------------------------------
    def _gain(self, table: torch.Tensor, quality: torch.Tensor | float) -> torch.Tensor:
        """Gains [B, M, 1, 1]: an int tensor picks trained levels (0-based), a float is q (1..Q)."""
        if isinstance(quality, torch.Tensor):
            return table[quality].exp()[:, :, None, None]
        lo, hi, t = quality_levels(quality, self.cfg.qualities)
        return ((1 - t) * table[lo] + t * table[hi]).exp()[None, :, None, None]

    def gain(self, quality: torch.Tensor | float) -> torch.Tensor:
        return self._gain(self.log_gain, quality)

    def inv_gain(self, quality: torch.Tensor | float) -> torch.Tensor:
        return self._gain(self.log_inv_gain, quality)

    @classmethod
    def latent_sizes(cls, size: Size) -> list[Size]:
        return halvings(size[0], size[1], cls.HALVINGS)

    def synthesize(self, y_hat: torch.Tensor, size: Size) -> torch.Tensor:
        sizes = self.latent_sizes(size)
        if not self.training:
            # NHWC transposed convs are ~20% faster with oneDNN; the decoder only adds the result
            # to a prediction, so bit-exactness is not needed here (unlike the hyper-synthesis).
            y_hat = y_hat.contiguous(memory_format=torch.channels_last)
            return self.g_s.tiled(y_hat, sizes[::-1][1:], TRANSFORM_TILE).contiguous()
        return self.g_s(y_hat, sizes[::-1][1:]).contiguous()

    def aux_loss(self) -> torch.Tensor:
        return sum(m.loss() for m in self.modules() if isinstance(m, EntropyBottleneck))

    def update(self, force: bool = True) -> None:
        """Refresh the entropy coder's CDF tables (must run before saving weights for coding)."""
        for m in self.modules():
            if isinstance(m, EntropyBottleneck):
                m.update(force=force)
            elif isinstance(m, GaussianConditional):
                m.update_scale_table(scale_table(), force=force)

    def forward(self, x: torch.Tensor, quality: torch.Tensor) -> dict[str, object]:
        raise NotImplementedError

    def compress(self, x: torch.Tensor, quality: float, lam: float = 0.0,
                 refine: Refinement | None = None) -> Coded:
        """Entropy-code x; with `refine`, the latent is first optimised for R + lam * D."""
        raise NotImplementedError

    def decompress(self, strings: list[bytes], size: Size, quality: float) -> torch.Tensor:
        raise NotImplementedError


def full_precision(x: torch.Tensor) -> torch.autocast:
    """Autocast off: inside, the entropy models run in float32 even when training autocasts the
    transforms to bfloat16 (`train --precision bf16`). A likelihood is a difference of two CDF
    values, which bfloat16's 8-bit mantissa would round to noise, and the factorized prior's
    CDF is a matmul, an op autocast would otherwise lower. Transform outputs are cast back with
    `.float()` (a no-op on float32 tensors) before they reach an entropy model or the loss."""
    return torch.autocast(x.device.type, enabled=False)


def _ste_round(x: torch.Tensor, means: torch.Tensor | None) -> torch.Tensor:
    """Rounding with a straight-through gradient (decoder input during training)."""
    if means is None:
        return x + (torch.round(x) - x).detach()
    return means + (torch.round(x - means) - (x - means)).detach() + (x - means)


class HyperSynthesis(nn.Module):
    """h_s of the mean-scale hyperprior; `exact=True` evaluates it on the reproducible grid."""

    def __init__(self, n: int, m: int) -> None:
        super().__init__()
        mid = m * 3 // 2
        self.up1 = nn.ConvTranspose2d(n, m, 5, stride=2, padding=2, output_padding=1)
        self.up2 = nn.ConvTranspose2d(m, mid, 5, stride=2, padding=2, output_padding=1)
        self.out = nn.Conv2d(mid, 2 * m, 3, padding=1)

    def forward(self, z: torch.Tensor, sizes: list[Size], exact: bool = False) -> torch.Tensor:
        (h1, w1), (h0, w0) = sizes
        if exact:
            x = exact_conv(self.up1, z)[..., :h1, :w1].clamp_min(0)
            x = exact_conv(self.up2, x)[..., :h0, :w0].clamp_min(0)
            return exact_conv(self.out, x).float()
        x = torch.relu(self.up1(z)[..., :h1, :w1])
        x = torch.relu(self.up2(x)[..., :h0, :w0])
        return self.out(x)


class HyperpriorBackbone(Backbone):
    """Mean-scale hyperprior backbone (CompressAI's "mbt2018-mean" structure)."""

    # Stride-2 stages of h_a; HyperSynthesis's two up-samplings mirror it (not built from it).
    HYPER_HALVINGS = 2

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(cfg)
        n, m = cfg.n, cfg.m
        self.h_a = nn.Sequential(
            nn.Conv2d(m, n, 3, padding=1),
            nn.ReLU(),
            Analysis([n] * (self.HYPER_HALVINGS + 1), nn.ReLU),
        )
        self.h_s = HyperSynthesis(n, m)
        self.entropy_bottleneck = EntropyBottleneck(n)
        self.gaussian_conditional = GaussianConditional(None)

    @classmethod
    def hyper_sizes(cls, size: Size) -> list[Size]:
        latent = cls.latent_sizes(size)[-1]
        return halvings(latent[0], latent[1], cls.HYPER_HALVINGS)

    def _entropy_params(
        self, z_hat: torch.Tensor, size: Size, exact: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hs = self.hyper_sizes(size)
        params = self.h_s(z_hat, [hs[1], hs[0]], exact=exact).to(z_hat.device)
        scales, means = params.chunk(2, 1)
        return scales, means

    def forward(self, x: torch.Tensor, quality: torch.Tensor) -> dict[str, object]:
        size = (x.shape[-2], x.shape[-1])
        y = self.g_a(x).float() * self.gain(quality)
        z = self.h_a(y).float()
        with full_precision(x):
            z_hat, z_lik = self.entropy_bottleneck(z)
        scales, means = (t.float() for t in self._entropy_params(z_hat, size, exact=False))
        with full_precision(x):
            _, y_lik = self.gaussian_conditional(y, scales, means)
        y_hat = _ste_round(y, means) if self.training else torch.round(y - means) + means
        x_hat = self.synthesize(y_hat * self.inv_gain(quality), size).float()
        return {"x_hat": x_hat, "likelihoods": {"y": y_lik, "z": z_lik}}

    @torch.no_grad()
    def compress(self, x: torch.Tensor, quality: float, lam: float = 0.0,
                 refine: Refinement | None = None) -> Coded:
        size = (x.shape[-2], x.shape[-1])
        y = self.g_a.tiled(x, TRANSFORM_TILE) * self.gain(quality)
        z = self.h_a(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        scales, means = self._entropy_params(z_hat, size, exact=True)
        indexes = self.gaussian_conditional.build_indexes(scales)
        inv_gain = self.inv_gain(quality)

        def code(y: torch.Tensor) -> Coded:
            y_strings = self.gaussian_conditional.compress(y, indexes, means)
            y_hat = torch.round(y - means) + means
            return Coded([z_strings[0], y_strings[0]], self.synthesize(y_hat * inv_gain, size))

        coded = code(y)
        if refine is None or refine.steps == 0:
            return coded
        y_ref = refine_latent(y, x, scales, means, lambda v: self.synthesize(v * inv_gain, size),
                              self.gaussian_conditional, lam, refine)
        refined = code(y_ref)
        # Keep the refined latent only if it lowers the real (coded) cost: never a regression.
        cost = [rd_cost(sum(map(len, c.strings)), c.x_hat, x, lam) for c in (coded, refined)]
        return refined if cost[1] < cost[0] else coded

    @torch.no_grad()
    def decode_latent(self, strings: list[bytes], size: Size) -> torch.Tensor:
        """The entropy-decoding half of `decompress`: a layer's strings to its (gained) y_hat."""
        if len(strings) != 2:
            raise ValueError(f"hyperprior layer needs 2 entropy-coded strings, got {len(strings)}")
        z_size = self.hyper_sizes(size)[-1]
        z_hat = self.entropy_bottleneck.decompress([strings[0]], z_size).to(self.log_gain.device)
        scales, means = self._entropy_params(z_hat, size, exact=True)
        indexes = self.gaussian_conditional.build_indexes(scales)
        return self.gaussian_conditional.decompress([strings[1]], indexes, means=means)

    @torch.no_grad()
    def decompress(self, strings: list[bytes], size: Size, quality: float) -> torch.Tensor:
        return self.synthesize(self.decode_latent(strings, size) * self.inv_gain(quality), size)


class FactorizedBackbone(Backbone):
    """Factorized-prior backbone (Balle et al. 2017): the latent coded with a fixed density."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(cfg)
        self.entropy_bottleneck = EntropyBottleneck(cfg.m)

    def forward(self, x: torch.Tensor, quality: torch.Tensor) -> dict[str, object]:
        size = (x.shape[-2], x.shape[-1])
        y = self.g_a(x).float() * self.gain(quality)
        with full_precision(x):
            y_noisy, y_lik = self.entropy_bottleneck(y)
        if self.training:
            medians = self.entropy_bottleneck._get_medians().detach().reshape(1, -1, 1, 1)
            y_hat = _ste_round(y, medians)
        else:
            y_hat = y_noisy
        x_hat = self.synthesize(y_hat * self.inv_gain(quality), size).float()
        return {"x_hat": x_hat, "likelihoods": {"y": y_lik}}

    @torch.no_grad()
    def compress(self, x: torch.Tensor, quality: float, lam: float = 0.0,
                 refine: Refinement | None = None) -> Coded:
        if refine is not None and refine.steps > 0:
            raise ValueError("latent refinement needs the hyperprior entropy model")
        size = (x.shape[-2], x.shape[-1])
        y = (self.g_a.tiled(x, TRANSFORM_TILE) * self.gain(quality)).cpu()
        strings = self.entropy_bottleneck.compress(y)
        y_hat = self.entropy_bottleneck.decompress(strings, y.shape[-2:])
        x_hat = self.synthesize(y_hat.to(x.device) * self.inv_gain(quality), size)
        return Coded([strings[0]], x_hat)

    @torch.no_grad()
    def decompress(self, strings: list[bytes], size: Size, quality: float) -> torch.Tensor:
        if len(strings) != 1:
            raise ValueError(f"factorized layer needs 1 entropy-coded string, got {len(strings)}")
        y_size = self.latent_sizes(size)[-1]
        y_hat = self.entropy_bottleneck.decompress([strings[0]], y_size)
        device = self.log_gain.device
        return self.synthesize(y_hat.to(device) * self.inv_gain(quality), size)


@torch.no_grad()
def _copy_leading(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy `src` into the leading block of `dst`, a tensor as large or larger on every axis: how
    a widened module keeps its old units' parameters (equal shapes: a plain copy)."""
    dst[tuple(slice(0, s) for s in src.shape)] = src


@torch.no_grad()
def widen_latent(old: HyperpriorBackbone, new: HyperpriorBackbone) -> None:
    """Load `old` into `new`, a hyperprior backbone with more latent channels (same n and levels).

    `new` then codes as `old` did: the extra channels start switched off. Their analysis rows are
    so small that the latent rounds to 0, and their entropy parameters start at scale 0 (the
    coder's lower bound: a 0 costs ~0 bits) and mean 0, so the synthesis sees zeros there; its
    rows for them are random at the old rows' scale, so that the distortion's straight-through
    gradient reaches the analysis rows (zero synthesis rows would never let them grow). The
    hyper-analysis reads nothing from them yet, and the hyper-synthesis's new hidden units feed
    only new outputs. Training then decides what the extra capacity is worth."""
    m, m2 = old.cfg.m, new.cfg.m
    if not (isinstance(old, HyperpriorBackbone) and isinstance(new, HyperpriorBackbone)) or (
            old.cfg.n, old.cfg.qualities, old.cfg.in_channels) != (
            new.cfg.n, new.cfg.qualities, new.cfg.in_channels) or m2 <= m:
        raise ValueError(f"can only widen a hyperprior latent ({old.cfg} -> {new.cfg})")
    mid = old.h_s.up2.out_channels
    src = dict(old.named_parameters())
    for key, value in new.named_parameters():
        _copy_leading(value, src[key])
    ga = new.g_a.stages[-1].conv
    ga.weight[m:] = torch.randn_like(ga.weight[m:]) * 0.02 * ga.weight[:m].std()
    ga.bias[m:] = 0
    gs = new.g_s.stages[0].conv.weight
    gs[m:] = torch.randn_like(gs[m:]) * gs[:m].std()
    for table in (new.log_gain, new.log_inv_gain):
        table[:, m:] = table[:, :m].mean(dim=1, keepdim=True)
    new.h_a[0].weight[:, m:] = 0
    new.h_s.up2.weight[m:, :mid] = 0
    # h_s.out emits [scales | means]: the old rows move to the front of each half.
    out, old_out = new.h_s.out, old.h_s.out
    out.weight.zero_()
    out.bias.zero_()
    out.weight[:m, :mid] = old_out.weight[:m]
    out.weight[m2 : m2 + m, :mid] = old_out.weight[m:]
    out.bias[:m] = old_out.bias[:m]
    out.bias[m2 : m2 + m] = old_out.bias[m:]
    new.update()  # the coder's tables follow from the copied quantiles and the scale table


@torch.no_grad()
def _widen_stack(old: Analysis | Synthesis, new: Analysis | Synthesis) -> None:
    """Load `old` into `new`, the same stack with more hidden channels, as the same function.

    Old units read nothing from new ones (zero weights, zero GDN couplings), so every old
    activation and the output stay as they were. New units read the old ones through random
    weights at the old ones' scale and feed the next layer through zeros: that next layer's
    gradient is then non-zero at once (new activation x upstream gradient), so they grow in."""
    for o, n in zip(old.stages, new.stages, strict=True):
        w, v = o.conv.weight, n.conv.weight
        out_axis = 1 if isinstance(o.conv, nn.ConvTranspose2d) else 0
        fresh = torch.randn_like(v) * w.std()
        keep = [slice(None)] * 4
        keep[out_axis] = slice(0, w.shape[out_axis])
        fresh[tuple(keep)] = 0  # old units: zero weight from the new inputs ...
        _copy_leading(fresh, w)  # ... and their own weights as before
        v.copy_(fresh)
        n.conv.bias.zero_()
        _copy_leading(n.conv.bias, o.conv.bias)
    for o, n in zip(old.acts, new.acts, strict=True):
        if isinstance(o, GDN):  # fresh GDN: beta 1, gamma 0.1 on the diagonal, exactly 0 off it
            _copy_leading(n.beta, o.beta)
            _copy_leading(n.gamma, o.gamma)


@torch.no_grad()
def widen_transforms(old: Backbone, new: Backbone) -> None:
    """Load `old` into `new`, a backbone whose analysis and/or synthesis transforms have more
    hidden channels (all else equal): `new` then codes as `old` did, up to float rounding
    (`_widen_stack`), and training decides what the extra units are worth."""
    same = ("n", "m", "in_channels", "qualities", "entropy")
    a, b = old.cfg, new.cfg
    if (type(old) is not type(new) or [getattr(a, k) for k in same] != [getattr(b, k) for k in same]
            or b.analysis_width < a.analysis_width or b.synthesis_width < a.synthesis_width
            or (b.analysis_width, b.synthesis_width) == (a.analysis_width, a.synthesis_width)):
        raise ValueError(f"can only widen the transforms' hidden channels ({a} -> {b})")
    src = dict(old.named_parameters())
    for key, value in new.named_parameters():
        if not key.startswith(("g_a.", "g_s.")):
            value.copy_(src[key])
    _widen_stack(old.g_a, new.g_a)
    _widen_stack(old.g_s, new.g_s)
    new.update()


def widen(old: Backbone, new: Backbone) -> None:
    """Load `old` into the wider `new`: more latent channels (`widen_latent`), then wider
    transforms (`widen_transforms`), whichever of the two the configs ask for."""
    if new.cfg.m != old.cfg.m:
        if new.cfg == replace(old.cfg, m=new.cfg.m):
            widen_latent(old, new)  # type: ignore[arg-type]
            return
        step = build_backbone(replace(old.cfg, m=new.cfg.m))
        widen_latent(old, step)  # type: ignore[arg-type]
        old = step
    widen_transforms(old, new)


def build_backbone(cfg: BackboneConfig) -> Backbone:
    if cfg.entropy == "hyperprior":
        return HyperpriorBackbone(cfg)
    if cfg.entropy == "factorized":
        return FactorizedBackbone(cfg)
    raise ValueError(f"unknown entropy model {cfg.entropy!r} (hyperprior or factorized)")
