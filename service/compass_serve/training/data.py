"""Training data: photos held in memory, random crops, layer chains at random scale factors."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def list_images(root: str | Path) -> list[Path]:
    return sorted(p for p in Path(root).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def split_holdout(paths: Sequence[Path], every: int = 20) -> tuple[list[Path], list[Path]]:
    """Deterministic split: every `every`-th image is held out for model selection."""
    train = [p for i, p in enumerate(paths) if i % every != every // 2]
    held = [p for i, p in enumerate(paths) if i % every == every // 2]
    return train, held


def load_all(paths: Sequence[Path], desc: str = "loading") -> list[torch.Tensor]:
    """Decode images to uint8 CHW tensors kept in memory (the whole set is ~300 MB)."""
    out = []
    for p in tqdm(paths, desc=desc, leave=False):
        with Image.open(p) as im:
            out.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1))
    return out


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize with antialiasing (close to Pillow's BICUBIC used at evaluation)."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)


class CropSampler:
    """Random crops (with random down-scaling first, so content density varies) and flips."""

    def __init__(self, images: list[torch.Tensor], seed: int) -> None:
        self.images = images
        self.rng = random.Random(seed)

    def batch(self, n: int, crop: int, min_scale: float = 0.35) -> torch.Tensor:
        out = []
        for _ in range(n):
            img = self.images[self.rng.randrange(len(self.images))]
            h, w = img.shape[-2:]
            # Pick a region of side crop/s and scale it to crop: s in [min_scale, 1].
            s = self.rng.uniform(min_scale, 1.0)
            side = min(h, w, max(crop, round(crop / s)))
            y = self.rng.randrange(h - side + 1)
            x = self.rng.randrange(w - side + 1)
            patch = img[None, :, y : y + side, x : x + side].float() / 255.0
            patch = resize(patch, (crop, crop))
            if self.rng.random() < 0.5:
                patch = patch.flip(-1)
            out.append(patch)
        return torch.cat(out).clamp(0, 1)

    def chain(self, crop: int) -> list[tuple[int, int]]:
        """Layer sizes of one training chain (paper: BL 0.25, EL1 U(.25,.5), EL2 U(.5,1)).

        A third of the chains are two-layer (BL -> one EL at 1.2x..4x) so every factor between
        neighbouring layers from 1.2x to 4x is trained.
        """
        bl = round(crop * 0.25)
        # Sizes on a grid of 4 px: the factor stays continuous enough, and repeated shapes let
        # oneDNN reuse its compiled convolutions (random shapes cost ~40% more per step).
        if self.rng.random() < 1 / 3:
            top = _grid(bl * self.rng.uniform(1.2, 4.0))
            return [(bl, bl), (top, top)]
        el1 = _grid(crop * self.rng.uniform(0.25 * 1.2, 0.5))
        el2 = _grid(crop * self.rng.uniform(max(0.5, el1 / crop * 1.2), 1.0))
        return [(bl, bl), (el1, el1), (el2, el2)]


def _grid(size: float, step: int = 4) -> int:
    return max(step, step * round(size / step))
