"""How far a bfloat16 training step's gradient is from the float32 one (`train --precision bf16`).

Batches of the 3-layer chain (160-px crops of the training images, batch 8, one random chain of
sizes as the trainer draws them) through the shipped `lite` enhancement layers, forward and
backward as the joint stage runs them; prints cosine similarities of the LIFF + RC gradient:
float32 vs bfloat16 on the same batch and quantisation noise, against the two yardsticks that
set the scale: float32 with another draw of the quantisation noise, and float32 on another batch.

    .venv/bin/python benchmarks/bf16_gradient.py [--batches 3] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from compass_serve.codec.registry import load_model
from compass_serve.training.data import CropSampler, list_images, load_all, resize, split_holdout
from compass_serve.training.train import rd_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="../shared/data/train")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, info = load_model("lite")
    enh = model.enhancement.train()
    for p in enh.parameters():
        p.requires_grad_(True)
    lambdas = torch.tensor(model.cfg.lambdas)
    train_paths, _ = split_holdout(list_images(args.data))
    sampler = CropSampler(load_all(train_paths[:40], "images"), seed=0)
    sizes = sampler.chain(160)
    batches = []
    for _ in range(args.batches):
        crop = sampler.batch(8, 160)
        q = torch.randint(0, len(lambdas), (8,))
        batches.append(([resize(crop, s).clamp(0, 1) for s in sizes], q))

    def gradient(images: list[torch.Tensor], q: torch.Tensor, bf16: bool, noise_seed: int = 5
                 ) -> torch.Tensor:
        enh.zero_grad(set_to_none=True)
        torch.manual_seed(noise_seed)  # the quantisation noise drawn in the forward pass
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                lower = model.base.eval()(images[0], q)["x_hat"]
            loss = torch.zeros(())
            for image in images[1:]:
                out = enh(lower, image, q)
                loss = loss + rd_loss(out["likelihoods"], out["x_hat"], image, lambdas[q])[0].mean()
                lower = out["x_hat"]
        loss.backward()
        return torch.cat([p.grad.flatten() for p in enh.parameters() if p.grad is not None])

    def cos(a: torch.Tensor, b: torch.Tensor) -> str:
        return f"{float(F.cosine_similarity(a, b, dim=0)):.3f}"

    fp32 = [gradient(*b, bf16=False) for b in batches]
    bf16 = [gradient(*b, bf16=True) for b in batches]
    other_noise = gradient(*batches[0], bf16=False, noise_seed=6)
    print(f"model {info.name} ({info.sha256[:16]}), batch 8, chain {sizes}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("cosine, float32 vs bfloat16, same batch and noise:",
          ", ".join(cos(a, b) for a, b in zip(fp32, bf16, strict=True)))
    print("cosine, float32 vs float32 with other quantisation noise:", cos(fp32[0], other_noise))
    print("cosine, float32 on different batches:",
          ", ".join(cos(fp32[i], fp32[j]) for i in range(len(fp32)) for j in range(i + 1, len(fp32))))


if __name__ == "__main__":
    main()
