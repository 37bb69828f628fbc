"""How many of the residual codec's latent bits a richer entropy model could still save.

The shipped RC codes its latent y with a mean-scale hyperprior. Two richer conditionings, each
fitted here on top of it with the transforms frozen, start from exactly the hyperprior (their
last layer is zero) and learn corrections to its means and scales:
- channel: channel-wise autoregression (Minnen & Singh 2020): y in 4 slices of 48 channels, each
  slice conditioned on the decoded earlier ones (three 3x3 convolutions per slice);
- prediction: the LIFF prediction of the layer, which the decoder holds before it decodes the
  residual, through a stride-16 CNN to the latent grid (conditional coding's side information).

Rates are the ideal code lengths of the rounded latent (-log2 of the discretised Gaussian), on
16 held-out training images (never Kodak), 384-px centre crops on the 96 -> 192 -> 384 ladder,
both enhancement layers, qualities 1, 3, 5, 7; fitted on the first `--images` training images.
Printed after every pass: the held-out y-bits against the hyperprior's (negative = saved).
A transform trained jointly with such a model could move further, so these are lower bounds of
what each could save; a lower bound of zero with the transforms fixed says the hyperprior has
already taken what the conditioning carries.

    .venv/bin/python benchmarks/entropy_context.py [--images 64] [--seconds 480]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from compass_serve.allocator import retain_freed_memory
from compass_serve.codec.backbone import HyperpriorBackbone
from compass_serve.codec.registry import load_model
from compass_serve.training.data import list_images, load_all, resize, split_holdout

QUALITIES = (1.0, 3.0, 5.0, 7.0)
CROP = 384
SLICES = 4

Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]  # y, mu, sigma, pred, q


def latents(model: torch.nn.Module, images: list[torch.Tensor]) -> list[Sample]:
    """The RC's latent and hyperprior parameters for both enhancement layers of every image."""
    rc = model.enhancement.residual
    out = []
    with torch.no_grad():
        for img in images:
            s = min(CROP, *img.shape[-2:])
            s -= s % 16
            y0, x0 = (img.shape[-2] - s) // 2, (img.shape[-1] - s) // 2
            x = img[None, :, y0 : y0 + s, x0 : x0 + s].float() / 255
            chain = [resize(x, (s // 4, s // 4)).clamp(0, 1),
                     resize(x, (s // 2, s // 2)).clamp(0, 1), x]
            for q in QUALITIES:
                level = torch.tensor([int(q) - 1])
                lower = model.base.codec(chain[0], level)["x_hat"]
                for image in chain[1:]:
                    pred = model.enhancement.predict(lower, image.shape[-2:])
                    r = image - pred
                    y = rc.g_a(r) * rc.gain(q)
                    z_hat = torch.round(rc.h_a(y))
                    sigma, mu = rc._entropy_params(z_hat, (r.shape[-2], r.shape[-1]), exact=False)
                    out.append((y, mu, sigma.clamp_min(0.11), pred, q))
                    lower = pred + rc(r, level)["x_hat"]
    return out


class Rate(nn.Module):
    """Ideal code length of y under a Gaussian (noisy proxy while fitting, rounding to measure)."""

    def __init__(self, rc: HyperpriorBackbone) -> None:
        super().__init__()
        self.gc = rc.gaussian_conditional

    def forward(self, y: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, noise: bool
                ) -> torch.Tensor:
        y_hat = y + torch.empty_like(y).uniform_(-0.5, 0.5) if noise else torch.round(y - mu) + mu
        lik = self.gc.likelihood_lower_bound(self.gc._likelihood(y_hat, sigma, mu))
        return -torch.log2(lik).sum()


def _zero_last(net: nn.Sequential) -> nn.Sequential:
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


class ChannelContext(nn.Module):
    def __init__(self, rate: Rate, m: int) -> None:
        super().__init__()
        self.rate, self.ch = rate, m // SLICES
        ch = self.ch
        self.nets = nn.ModuleList(_zero_last(nn.Sequential(
            nn.Conv2d(2 * ch + s * ch, 128, 3, padding=1), nn.ReLU(),
            nn.Conv2d(128, 96, 3, padding=1), nn.ReLU(),
            nn.Conv2d(96, 2 * ch, 3, padding=1))) for s in range(1, SLICES))

    def forward(self, y: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, pred: torch.Tensor,
                noise: bool) -> torch.Tensor:
        ys, mus, sigmas = y.split(self.ch, 1), mu.split(self.ch, 1), sigma.split(self.ch, 1)
        total, decoded = y.new_zeros(()), []
        for s in range(SLICES):
            m, sd = mus[s], sigmas[s]
            if s:
                dm, dl = self.nets[s - 1](torch.cat([m, sd.log(), *decoded], 1)).chunk(2, 1)
                m, sd = m + dm, sd * dl.exp()
            total = total + self.rate(ys[s], m, sd, noise)
            y_hat = ys[s] + torch.empty_like(ys[s]).uniform_(-0.5, 0.5) if noise else (
                torch.round(ys[s] - m) + m)
            decoded.append(y_hat - m)
        return total


class PredictionContext(nn.Module):
    def __init__(self, rate: Rate, m: int, c: int = 64) -> None:
        super().__init__()
        self.rate = rate
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 5, 2, 2), nn.ReLU(), nn.Conv2d(c, c, 5, 2, 2), nn.ReLU(),
            nn.Conv2d(c, c, 5, 2, 2), nn.ReLU(), nn.Conv2d(c, c, 5, 2, 2))
        self.head = _zero_last(nn.Sequential(
            nn.Conv2d(c + 2 * m, 256, 1), nn.ReLU(), nn.Conv2d(256, 2 * m, 1)))

    def forward(self, y: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, pred: torch.Tensor,
                noise: bool) -> torch.Tensor:
        f = self.features(pred)[..., : y.shape[-2], : y.shape[-1]]
        dm, dl = self.head(torch.cat([f, mu, sigma.log()], 1)).chunk(2, 1)
        return self.rate(y, mu + dm, sigma * dl.exp(), noise)


def fit(name: str, net: nn.Module, rate: Rate, train: list[Sample], held: list[Sample],
        seconds: float) -> None:
    def saved() -> dict[float, float]:
        with torch.no_grad():
            out = {}
            for q in QUALITIES:
                part = [s for s in held if s[4] == q]
                base = sum(float(rate(y, mu, sd, False)) for y, mu, sd, _, _ in part)
                new = sum(float(net(y, mu, sd, p, False)) for y, mu, sd, p, _ in part)
                out[q] = (new / base - 1) * 100
            return out

    params = [p for n, p in net.named_parameters() if not n.startswith("rate.")]
    opt = torch.optim.Adam(params, lr=5e-4)
    t0, it = time.time(), 0
    while time.time() - t0 < seconds:
        for i in torch.randperm(len(train)).tolist():
            y, mu, sd, p, _ = train[i]
            loss = net(y, mu, sd, p, True) / y.numel()
            opt.zero_grad()
            loss.backward()
            opt.step()
            it += 1
        per_q = saved()
        print(f"{name:10} {time.time() - t0:5.0f} s, {it} steps: held-out y-bits "
              f"{sum(per_q.values()) / len(per_q):+.2f} % (mean over qualities)", flush=True)
    print(f"{name:10} per quality: " + ", ".join(f"q{q:g} {v:+.2f} %" for q, v in saved().items()),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="lite")
    ap.add_argument("--data", default="../shared/data/train")
    ap.add_argument("--images", type=int, default=64, help="training images to fit on")
    ap.add_argument("--seconds", type=float, default=480, help="fitting time per conditioning")
    a = ap.parse_args()
    retain_freed_memory()  # as every compass-serve process runs (compass_serve.allocator)
    torch.manual_seed(0)
    model, info = load_model(a.model)
    model.eval()
    rc = model.enhancement.residual
    assert isinstance(rc, HyperpriorBackbone)
    fit_paths, held_paths = split_holdout(list_images(a.data))
    train = latents(model, load_all(fit_paths[: a.images], "fitting images"))
    held = latents(model, load_all(held_paths[:16], "held-out images"))
    print(f"model {info.name} ({info.sha256[:16]}): fitted on {len(train)} layers, "
          f"measured on {len(held)} held-out layers", flush=True)
    rate = Rate(rc)
    fit("channel", ChannelContext(rate, rc.cfg.m), rate, train, held, a.seconds)
    fit("prediction", PredictionContext(rate, rc.cfg.m), rate, train, held, a.seconds)


if __name__ == "__main__":
    main()
