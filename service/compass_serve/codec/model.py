"""The COMPASS model: one base layer and ONE enhancement layer applied recursively.

    layer 0:  X0 = IC(I0)
    layer k:  P_k = LIFF(X_{k-1}, size of I_k),   X_k = P_k + RC(I_k - P_k)
    shown:    X_k itself, or with a post-filter F(X_k, P_k) (the chain reads X_k either way)

Reconstructions are never clamped inside the chain (clamping would destroy negative
residuals); callers clamp for display and PSNR only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from compass_serve.codec.backbone import (
    TRANSFORM_TILE,
    Backbone,
    BackboneConfig,
    build_backbone,
    quality_levels,
)
from compass_serve.codec.layers import Size
from compass_serve.codec.liff import Liff, LiffConfig
from compass_serve.codec.postfilter import PostFilter, PostFilterConfig
from compass_serve.codec.refine import Refinement

# Rate-distortion trade-offs of the trained quality levels (CompressAI's qualities 1-4, which the
# paper uses); quality q in [1, len] interpolates between them.
DEFAULT_LAMBDAS = (0.0018, 0.0035, 0.0067, 0.013)
# The paper's four plus two halvings below and two doublings above: on the lite model the four
# span only ~0.22-0.54 bpp on Kodak; this ladder is meant to reach about 0.1-1 bpp.
WIDE_LAMBDAS = (0.00045, 0.0009, *DEFAULT_LAMBDAS, 0.026, 0.05)
# The default quality is the trained level nearest this trade-off (quality 3 of the four).
DEFAULT_LAMBDA = 0.0067


@dataclass(frozen=True)
class CompassConfig:
    base: BackboneConfig = field(default_factory=BackboneConfig)
    residual: BackboneConfig = field(default_factory=BackboneConfig)
    liff: LiffConfig = field(default_factory=LiffConfig)
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    predictor: str = "liff"  # "liff" or "bicubic" (the ablation's inter-layer predictor)
    post_filter: PostFilterConfig = field(default_factory=PostFilterConfig)

    def __post_init__(self) -> None:
        levels = {len(self.lambdas), self.base.qualities, self.residual.qualities}
        if len(levels) != 1:
            raise ValueError(f"{len(self.lambdas)} lambdas but gain tables for "
                             f"{self.base.qualities} (base) / {self.residual.qualities} qualities")

    def with_lambdas(self, lambdas: tuple[float, ...]) -> CompassConfig:
        """The same model on another rate ladder (gain tables sized to match)."""
        q = len(lambdas)
        return replace(self, base=replace(self.base, qualities=q),
                       residual=replace(self.residual, qualities=q), lambdas=tuple(lambdas))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CompassConfig:
        return cls(
            base=BackboneConfig(**d["base"]),
            residual=BackboneConfig(**d["residual"]),
            liff=LiffConfig(**d["liff"]),
            lambdas=tuple(d["lambdas"]),
            predictor=d.get("predictor", "liff"),
            post_filter=PostFilterConfig(**d.get("post_filter", {})),
        )


class BaseLayer(nn.Module):
    """Layer 0: the image codec (IC) on the smallest image."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.codec: Backbone = build_backbone(cfg)

    def forward(self, image: torch.Tensor, quality: torch.Tensor) -> dict[str, object]:
        return self.codec(image, quality)


class EnhancementLayer(nn.Module):
    """Layer k >= 1: LIFF prediction from the layer below plus the residual codec (RC)."""

    def __init__(self, cfg: CompassConfig) -> None:
        super().__init__()
        self.predictor = cfg.predictor
        self.liff = Liff(cfg.liff)
        self.residual = build_backbone(cfg.residual)
        self.post_filter = (PostFilter(cfg.post_filter, len(cfg.lambdas))
                            if cfg.post_filter.channels else None)

    def predict(self, lower: torch.Tensor, size: Size) -> torch.Tensor:
        if self.predictor == "bicubic":
            return F.interpolate(lower, size=size, mode="bicubic", align_corners=False)
        return self.liff(lower, size)

    def forward(
        self, lower: torch.Tensor, image: torch.Tensor, quality: torch.Tensor
    ) -> dict[str, object]:
        pred = self.predict(lower, (image.shape[-2], image.shape[-1]))
        out = self.residual(image - pred, quality)
        return {
            "x_hat": pred + out["x_hat"],
            "prediction": pred,
            "likelihoods": out["likelihoods"],
        }

    def show(self, x_hat: torch.Tensor, pred: torch.Tensor,
             quality: torch.Tensor | float) -> torch.Tensor:
        """The image the decoder shows for this layer: the post-filter's, else x_hat."""
        if self.post_filter is None:
            return x_hat
        if isinstance(quality, torch.Tensor) or self.training:
            return self.post_filter(x_hat, pred, quality)
        return self.post_filter.tiled(x_hat, pred, quality, TRANSFORM_TILE)


class Compass(nn.Module):
    def __init__(self, cfg: CompassConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.base = BaseLayer(cfg.base)
        self.enhancement = EnhancementLayer(cfg)

    @property
    def qualities(self) -> int:
        return len(self.cfg.lambdas)

    @property
    def default_quality(self) -> float:
        """The trained level whose lambda is nearest `DEFAULT_LAMBDA`, as a quality 1..Q."""
        gap = [abs(math.log(lam / DEFAULT_LAMBDA)) for lam in self.cfg.lambdas]
        return float(gap.index(min(gap)) + 1)

    def forward(self, images: list[torch.Tensor], quality: torch.Tensor) -> list[dict[str, object]]:
        """Training pass over a layer chain (smallest first) with noisy quantisation."""
        outs = [self.base(images[0], quality)]
        for image in images[1:]:
            outs.append(self.enhancement(self._chained(outs[-1], quality), image, quality))
        return outs

    def _chained(self, out: dict[str, object], quality: torch.Tensor) -> torch.Tensor:
        """What the next layer predicts from: the layer as shown where the filter is in the loop
        (the base layer has no filter), else the unfiltered reconstruction."""
        x = out["x_hat"]
        assert isinstance(x, torch.Tensor)
        if not self.cfg.post_filter.in_loop or "prediction" not in out:
            return x
        pred = out["prediction"]
        assert isinstance(pred, torch.Tensor)
        return self.enhancement.show(x, pred, quality)

    # -- real coding --------------------------------------------------------------------------
    def lambda_at(self, quality: float) -> float:
        """The rate-distortion trade-off of quality q in [1, Q]: geometric between trained levels,
        as the gain vectors are."""
        lo, hi, t = quality_levels(quality, len(self.cfg.lambdas))
        return self.cfg.lambdas[lo] ** (1 - t) * self.cfg.lambdas[hi] ** t

    @torch.no_grad()
    def compress(
        self, images: list[torch.Tensor], quality: float, refine: Refinement | None = None
    ) -> list[list[bytes]]:
        """Entropy-code a layer chain; each layer is predicted from the DECODED layer below.
        `refine` optimises each layer's latent for that layer's own R + lambda * D, in order."""
        lam = self.lambda_at(quality)
        in_loop = self.cfg.post_filter.in_loop
        coded = self.base.codec.compress(images[0], quality, lam, refine)
        strings, x_prev = [coded.strings], coded.x_hat
        for image in images[1:]:
            pred = self.enhancement.predict(x_prev, (image.shape[-2], image.shape[-1]))
            coded = self.enhancement.residual.compress(image - pred, quality, lam, refine)
            strings.append(coded.strings)
            x_prev = pred + coded.x_hat
            if in_loop:
                x_prev = self.enhancement.show(x_prev, pred, quality)
        return strings

    @torch.no_grad()
    def decompress(
        self, strings: list[list[bytes]], sizes: list[Size], quality: float, *,
        top_only: bool = False,
    ) -> list[torch.Tensor]:
        """Decode layers 0..len(strings)-1; returns every layer's (unclamped) image as shown
        (post-filtered where the model has a filter; the chain reads the unfiltered ones unless
        the filter is in the loop). `top_only`: a decoder that displays one layer returns [the
        top layer] alone, sparing the post-filter on the layers below where the chain does not
        read it."""
        in_loop = self.cfg.post_filter.in_loop
        x = self.base.codec.decompress(strings[0], sizes[0], quality)
        recons = [x]
        for i, (s, size) in enumerate(zip(strings[1:], sizes[1:], strict=True), 1):
            pred = self.enhancement.predict(x, size)
            x = pred + self.enhancement.residual.decompress(s, size, quality)
            if in_loop:
                x = self.enhancement.show(x, pred, quality)
                recons.append(x)
            elif not top_only or i == len(strings) - 1:
                recons.append(self.enhancement.show(x, pred, quality))
        return recons[-1:] if top_only else recons

    @torch.no_grad()
    def upscale(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        """Predict a layer larger than any coded one (no residual): LIFF from the top layer."""
        return self.enhancement.predict(x, size)

    def update(self) -> None:
        self.base.codec.update()
        self.enhancement.residual.update()

    def aux_loss(self) -> torch.Tensor:
        return self.base.codec.aux_loss() + self.enhancement.residual.aux_loss()
