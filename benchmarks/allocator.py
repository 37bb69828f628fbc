"""Decode and training-step time with glibc's heap defaults against the tuned heap
(`compass_serve.allocator.retain_freed_memory`).

    .venv/bin/python benchmarks/allocator.py [--workload decode,train,service] [--rounds 6]

`decode` (a 3-layer decode of one Kodak image, shipped weights, on the main thread as the CLI
and the eval decode) and `train` (the joint step of `benchmarks/train_step_breakdown.py`: LIFF +
RC forward and backward on a 40 -> 72 -> 140 px chain, batch 8, as `compass-serve train --crop
160 --batch 8` runs, gradients freed after it): each in
a fresh process, first with the untouched defaults (what every process ran before session 11),
then alternating two settings set explicitly, so that drift in the machine's speed hits both
equally: glibc's adapted defaults (what its own adaptation converges to after the first large
frees: blocks over 32 MiB mapped separately, heap trimmed past 64 MiB) and the tuned heap.
`service` (two decodes at once on pool threads, one torch thread each, as the HTTP service
runs them): glibc fixes its arena count on the first thread's allocation, so this one
alternates fresh processes, untouched and tuned at start-up.
Prints medians, their ratio, resident memory, and page faults per call (a count, not a timing).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from train_step_breakdown import build_steps  # this folder: the joint step it times

from compass_serve.allocator import (
    DEFAULT_RETAIN_MIB,
    M_MMAP_MAX,
    M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD,
    mallopt,
    retain_freed_memory,
)
from compass_serve.codec.coder import Codec
from compass_serve.imageio import load_rgb

MIB = 1024 * 1024


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / MIB


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def decode_workload(image: str) -> Callable[[], None]:
    codec = Codec.load("lite")
    data = codec.encode(load_rgb(image))
    return lambda: codec.decode(data)


def service_child(image: str, retain_mib: int, rounds: int) -> None:
    """Child process: tuned (or not) at start-up, then `rounds` pairs of concurrent decodes."""
    from concurrent.futures import ThreadPoolExecutor

    retain_freed_memory(retain_mib)
    torch.set_num_threads(1)
    decode = decode_workload(image)
    times: list[float] = []
    with ThreadPoolExecutor(2) as pool:
        for rep in range(rounds + 1):
            f0, t = faults(), time.perf_counter()
            for f in [pool.submit(decode) for _ in range(2)]:
                f.result()
            if rep:  # the first pair warms up
                times.append(time.perf_counter() - t)
                count = (faults() - f0) // 2
    print(statistics.median(times), count, rss_mib())


def compare_service(image: str, rounds: int, retain_mib: int) -> None:
    runs: dict[int, list[tuple[float, int, float]]] = {0: [], retain_mib: []}
    for _ in range(3):
        for setting in runs:
            out = subprocess.run([sys.executable, __file__, "--service-child", str(setting),
                                  "--image", image, "--rounds", str(rounds)],
                                 capture_output=True, text=True, check=True).stdout.split()
            runs[setting].append((float(out[0]), int(out[1]), float(out[2])))
    print(f"service: 2 concurrent decodes of {image} on pool threads, 1 torch thread each "
          f"(3 processes per setting, median of {rounds} pairs each):")
    med = {}
    for setting, label in ((0, "glibc defaults"), (retain_mib, f"tuned heap (retain {retain_mib} MiB)")):
        v = runs[setting]
        med[setting] = statistics.median(t for t, _, _ in v)
        print(f"  {label:34} median {med[setting]:.3f} s a pair, "
              f"{statistics.median(c for _, c, _ in v):>7.0f} page faults a decode, "
              f"RSS after {statistics.median(r for _, _, r in v):.0f} MiB")
    print(f"  ratio tuned / defaults: {med[retain_mib] / med[0]:.3f}")


def glibc_adapted_defaults() -> None:
    import ctypes
    import ctypes.util

    mallopt(M_MMAP_MAX, 65536)
    mallopt(M_MMAP_THRESHOLD, 32 * MIB)
    mallopt(M_TRIM_THRESHOLD, 64 * MIB)
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def compare(name: str, fn: Callable[[], None], rounds: int, retain_mib: int) -> None:
    fn()  # warm-up: weights paged in, oneDNN primitives built
    counts: dict[str, int] = {}

    def timed(setting: str) -> float:
        f0, t = faults(), time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        counts[setting] = faults() - f0
        return dt

    times: dict[str, list[float]] = {"untouched": [timed("untouched") for _ in range(rounds)],
                                     "adapted": [], "retained": []}
    rss = {"untouched": rss_mib()}
    for _ in range(rounds):
        for setting in ("adapted", "retained"):
            if setting == "adapted":
                glibc_adapted_defaults()
            else:
                retain_freed_memory(retain_mib)
            fn()  # the first call after a switch refills (or trims) the heap
            times[setting].append(timed(setting))
            rss[setting] = rss_mib()
    print(f"{name}:")
    labels = {"untouched": "glibc defaults, untouched", "adapted": "glibc adapted defaults",
              "retained": f"tuned heap (retain {retain_mib} MiB)"}
    for setting, label in labels.items():
        v = times[setting]
        print(f"  {label:34} median {statistics.median(v):.3f} s, min {min(v):.3f} s, "
              f"{counts[setting]:>7} page faults a call, RSS after {rss[setting]:.0f} MiB")
    ratio = statistics.median(times["retained"]) / statistics.median(times["adapted"])
    print(f"  ratio tuned / adapted defaults: {ratio:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workload", default="decode,train,service",
                    help="comma-separated: decode, train, service")
    ap.add_argument("--image", default="../shared/data/kodak/kodim23.png")
    ap.add_argument("--rounds", type=int, default=6, help="timed calls per setting")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--retain-mib", type=int, default=DEFAULT_RETAIN_MIB)
    ap.add_argument("--service-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["decode", "train"], default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.service_child is not None:
        service_child(a.image, a.service_child, a.rounds)
        return
    if a.child is not None:
        # A fresh process per workload: "untouched" must be glibc's state at start-up.
        torch.set_num_threads(a.threads)
        if a.child == "decode":
            compare(f"3-layer decode of {a.image}", decode_workload(a.image), a.rounds,
                    a.retain_mib)
        else:
            compare("joint training step (benchmarks/train_step_breakdown.py's)",
                    build_steps()[1]["joint"], a.rounds, a.retain_mib)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"  peak RSS of the process {peak:.0f} MiB")
        return
    work = a.workload.split(",")
    print(f"{a.threads} torch threads (service: 1 each), shipped weights, {a.rounds} timed calls per setting")
    for name in work:
        if name == "service":
            compare_service(a.image, a.rounds, a.retain_mib)
        else:
            sys.stdout.write(subprocess.run(
                [sys.executable, __file__, "--child", name, "--image", a.image, "--rounds",
                 str(a.rounds), "--threads", str(a.threads), "--retain-mib", str(a.retain_mib)],
                capture_output=True, text=True, check=True).stdout)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
