"""How much spatial context is left in each codec's latents once the hyperprior has spoken.

For a checkerboard split (anchors where row + col is even), the correlation between a
non-anchor symbol round(y - mu) and the mean of its four anchor neighbours' symbols: what a
checkerboard context model could exploit for the means. Held-out training images (never
Kodak), 256-px centre crops, one quality: the backbone (the base layer's codec) on the crop,
and the residual codec on the top layer of the 64 -> 128 -> 256 ladder.

    .venv/bin/python benchmarks/latent_context.py [--images 8] [--quality 3]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from compass_serve.allocator import retain_freed_memory
from compass_serve.codec.backbone import HyperpriorBackbone
from compass_serve.codec.registry import load_model
from compass_serve.training.data import list_images, load_all, resize, split_holdout

CROSS = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])[None, None] / 4


def symbols_and_neighbours(codec: HyperpriorBackbone, x: torch.Tensor,
                           quality: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-anchor symbols and the mean of their anchor neighbours' symbols, flattened."""
    y = codec.g_a(x) * codec.gain(quality)
    z_hat, _ = codec.entropy_bottleneck(codec.h_a(y))
    _, means = codec._entropy_params(z_hat, (x.shape[-2], x.shape[-1]), exact=False)
    sym = torch.round(y - means)
    h, w = sym.shape[-2:]
    anchors = (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 == 0
    nb = F.conv2d((sym * anchors).reshape(-1, 1, h, w), CROSS, padding=1).reshape_as(sym)
    return sym[..., ~anchors].flatten(), nb[..., ~anchors].flatten()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="lite")
    ap.add_argument("--data", default="../shared/data/train")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--quality", type=float, default=3.0)
    a = ap.parse_args()
    retain_freed_memory()  # as every compass-serve process runs (compass_serve.allocator)
    model, info = load_model(a.model)
    base, rc = model.base.codec, model.enhancement.residual
    assert isinstance(base, HyperpriorBackbone) and isinstance(rc, HyperpriorBackbone)
    _, held = split_holdout(list_images(a.data))
    pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"backbone": [], "RC, top layer": []}
    with torch.no_grad():
        for img in load_all(held[: a.images], "held-out images"):
            s = min(256, *img.shape[-2:])
            y0, x0 = (img.shape[-2] - s) // 2, (img.shape[-1] - s) // 2
            x = img[None, :, y0 : y0 + s, x0 : x0 + s].float() / 255
            chain = [resize(x, (s // 4, s // 4)).clamp(0, 1), resize(x, (s // 2, s // 2)).clamp(0, 1), x]
            pairs["backbone"].append(symbols_and_neighbours(base, x, a.quality))
            lower = model.base.codec(chain[0], torch.tensor([int(a.quality) - 1]))["x_hat"]
            for image in chain[1:]:
                pred = model.enhancement.predict(lower, (image.shape[-2], image.shape[-1]))
                if image is chain[-1]:
                    pairs["RC, top layer"].append(symbols_and_neighbours(rc, image - pred, a.quality))
                lower = pred + rc(image - pred, torch.tensor([int(a.quality) - 1]))["x_hat"]
    print(f"model {info.name} ({info.sha256[:16]}), {a.images} held-out images, quality {a.quality:g}")
    for name, ps in pairs.items():
        sym, nb = torch.cat([p[0] for p in ps]), torch.cat([p[1] for p in ps])
        corr = float(torch.corrcoef(torch.stack([sym, nb]))[0, 1])
        print(f"{name:14} corr(non-anchor symbol, mean of 4 anchor neighbours) = {corr:.3f}; "
              f"zero symbols {float((sym == 0).float().mean()):.1%}")


if __name__ == "__main__":
    main()
