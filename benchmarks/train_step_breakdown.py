"""Where a training step's time goes: joint (LIFF + RC trained) vs residual (RC only, LIFF frozen).

One batch of a 3-layer chain (BL 40 -> 72 -> 140 px of a 160-px crop, batch 8, the shipped
`lite` weights) through the enhancement layers, forward and backward, timed as in each stage;
the ratio says how many more RC updates per hour the residual stage buys.

    .venv/bin/python benchmarks/train_step_breakdown.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from compass_serve.allocator import retain_freed_memory
from compass_serve.codec.registry import load_model
from compass_serve.training.data import resize


def timed(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up: oneDNN compiles its kernels for these shapes
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def build_steps() -> tuple[str, dict[str, Callable[[], None]]]:
    """The shipped model's name and sha, and one forward+backward of each kind (seeded)."""
    torch.manual_seed(0)
    model, info = load_model("lite")
    model.train()
    enh = model.enhancement
    for p in enh.parameters():
        p.requires_grad_(True)
    x = torch.rand(8, 3, 160, 160)
    q = torch.randint(0, model.qualities, (8,))
    images = [resize(x, s) for s in ((40, 40), (72, 72), (140, 140))]
    with torch.no_grad():
        base = model.base(images[0], q)["x_hat"]

    def rd(out: dict) -> torch.Tensor:
        return sum(lik.log().sum() for lik in out["likelihoods"].values()) + out["x_hat"].square().sum()

    def liff_only() -> None:
        mid = enh.liff(base, (72, 72))
        (enh.liff(mid, (140, 140)).sum() + mid.sum()).backward()
        enh.zero_grad(set_to_none=True)  # as the optimizer loop does: gradients freed each step

    def joint() -> None:
        lo = enh(base, images[1], q)
        hi = enh(lo["x_hat"], images[2], q)
        (rd(lo) + rd(hi)).backward()
        enh.zero_grad(set_to_none=True)

    def residual() -> None:  # the residual stage: LIFF's prediction without a graph
        lower, loss = base, torch.zeros(())
        for image in images[1:]:
            with torch.no_grad():
                pred = enh.predict(lower, image.shape[-2:])
            out = enh.residual(image - pred, q)
            loss = loss + rd(out)
            lower = pred + out["x_hat"]
        loss.backward()
        enh.zero_grad(set_to_none=True)

    return f"{info.name} ({info.sha256[:16]})", {"liff": liff_only, "joint": joint,
                                                 "residual": residual}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    retain_freed_memory()  # as every compass-serve process runs (compass_serve.allocator)
    torch.set_num_threads(args.threads)
    name, steps = build_steps()
    t_liff, t_joint, t_res = (timed(steps[k], args.repeats) for k in ("liff", "joint", "residual"))
    print(f"model {name}, batch 8, chain 40->72->140, "
          f"torch threads {args.threads}")
    print(f"LIFF forward+backward (both layers): {t_liff:.2f} s")
    print(f"joint step (LIFF + RC trained):      {t_joint:.2f} s")
    print(f"residual step (RC only, LIFF frozen): {t_res:.2f} s")
    print(f"residual / joint steps per hour: {t_joint / t_res:.2f}x")


if __name__ == "__main__":
    main()
