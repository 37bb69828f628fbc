"""Encoder-side latent refinement: spend encode time for fewer bits at the same quality.

The analysis transform is amortised: one forward pass guesses a latent for any image, and a
small or briefly trained transform leaves rate-distortion cost on the table for a given image.
Refinement optimises one layer's latent y for that image's own R + lambda * D by gradient descent
through the Gaussian conditional and the synthesis transform. The hyper-latent z, and so the
entropy parameters, stay those of the amortised y, and the decoder is untouched: a refined
stream is an ordinary stream, so it costs encode time only.

Rounding is relaxed by stochastic Gumbel annealing (SGA; Yang et al., NeurIPS 2020): with plain
straight-through rounding the loss rose from the first step. The Gumbel noise comes from a
seeded generator, so the same image and settings give the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from compressai.entropy_models import GaussianConditional


@dataclass(frozen=True)
class Refinement:
    """How hard the encoder works per layer; `steps=0` is the amortised encoder alone."""

    steps: int = 0
    lr: float = 0.005           # Adam on y (quantisation bin = 1)
    tau_start: float = 0.5      # SGA temperature: soft at first ...
    tau_end: float = 0.05       # ... nearly hard rounding at the end
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"refinement steps must be >= 0, got {self.steps}")

    def tau(self, step: int) -> float:
        t = step / max(1, self.steps - 1)
        return self.tau_start * (self.tau_end / self.tau_start) ** t


def sga_round(y: torch.Tensor, means: torch.Tensor, tau: float, gen: torch.Generator) -> torch.Tensor:
    """A soft sample between floor and ceil of y - means, pulled to the nearer one as tau -> 0."""
    v = y - means
    lo = torch.floor(v).detach()
    d = (v - lo).clamp(1e-5, 1 - 1e-5)  # distance to floor, in (0, 1)
    # Logits -atanh(distance)/tau for (floor, ceil); Gumbel noise makes the choice stochastic.
    gumbel = -torch.log(-torch.log(torch.rand((2, *v.shape), generator=gen).clamp_min(1e-10)))
    logit = (torch.atanh(d) - torch.atanh(1 - d)) / tau + gumbel[1] - gumbel[0]
    return lo + torch.sigmoid(logit) + means


def refine_latent(
    y: torch.Tensor, target: torch.Tensor, scales: torch.Tensor, means: torch.Tensor,
    synthesize: Callable[[torch.Tensor], torch.Tensor], conditional: GaussianConditional,
    lam: float, cfg: Refinement,
) -> torch.Tensor:
    """y minimising bits/pixel + lam * 255^2 * MSE(synthesize(y_hat), target); grads on y only."""
    gen = torch.Generator().manual_seed(cfg.seed)
    npix = target.shape[-1] * target.shape[-2]
    y = y.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([y], lr=cfg.lr)
    with torch.enable_grad():
        for step in range(cfg.steps):
            y_soft = sga_round(y, means, cfg.tau(step), gen)
            lik = conditional.likelihood_lower_bound(conditional._likelihood(y_soft, scales, means))
            loss = -torch.log2(lik).sum() / npix + lam * 255**2 * torch.mean(
                (synthesize(y_soft) - target) ** 2)
            (y.grad,) = torch.autograd.grad(loss, [y])  # no gradients into the weights
            opt.step()
    return y.detach()


def rd_cost(nbytes: int, recon: torch.Tensor, target: torch.Tensor, lam: float) -> float:
    """The true cost the refinement aims at, from coded bytes and the rounded reconstruction."""
    npix = target.shape[-1] * target.shape[-2]
    return nbytes * 8 / npix + lam * 255**2 * float(torch.mean((recon - target) ** 2))


__all__ = ["Refinement", "rd_cost", "refine_latent", "sga_round"]
