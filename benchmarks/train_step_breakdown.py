"""Where a training step's time goes: joint (LIFF + RC trained) vs residual (RC only, LIFF frozen),
in float32 and with the forward pass autocast to bfloat16 (`train --precision bf16`).

One batch of a 3-layer chain (BL 40 -> 72 -> 140 px of a 160-px crop, batch 8, the shipped
`lite` weights) through the enhancement layers, forward and backward, timed as in each stage;
the ratios say how many more RC updates per hour the residual stage buys, and how many more
steps per hour bfloat16 buys over float32 (same process, same batch).

    .venv/bin/python benchmarks/train_step_breakdown.py [--threads 2] [--repeats 3]
        [--precision fp32,bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator

import torch

from compass_serve.allocator import retain_freed_memory
from compass_serve.codec.registry import load_model
from compass_serve.training.data import resize


def timed(fn: Callable[[], None], repeats: int, precision: str = "fp32") -> float:
    with autocast(precision):
        fn()  # warm-up: oneDNN compiles its kernels for these shapes
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats


@contextlib.contextmanager
def autocast(precision: str) -> Iterator[None]:
    """The forward passes as `Trainer.step` runs them (its backward runs outside autocast, but
    autograd replays each op in its forward dtype, so the context makes no difference there)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield


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
    ap.add_argument("--precision", default="fp32,bf16",
                    help="comma-separated: fp32 (the baseline) and/or bf16")
    args = ap.parse_args()
    retain_freed_memory()  # as every compass-serve process runs (compass_serve.allocator)
    torch.set_num_threads(args.threads)
    name, steps = build_steps()
    print(f"model {name}, batch 8, chain 40->72->140, torch threads {args.threads}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    joint: dict[str, float] = {}
    for precision in args.precision.split(","):
        t_liff, t_joint, t_res = (timed(steps[k], args.repeats, precision)
                                  for k in ("liff", "joint", "residual"))
        joint[precision] = t_joint
        print(f"[{precision}] LIFF forward+backward (both layers): {t_liff:.2f} s")
        print(f"[{precision}] joint step (LIFF + RC trained):      {t_joint:.2f} s")
        print(f"[{precision}] residual step (RC only, LIFF frozen): {t_res:.2f} s")
        print(f"[{precision}] residual / joint steps per hour: {t_joint / t_res:.2f}x")
    if {"fp32", "bf16"} <= joint.keys():
        print(f"bf16 / fp32 joint steps per hour: {joint['fp32'] / joint['bf16']:.2f}x")


if __name__ == "__main__":
    main()
