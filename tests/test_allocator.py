"""Heap tuning: freed tensor memory is reused instead of page-faulted in again (glibc)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from compass_serve.allocator import DEFAULT_RETAIN_MIB, ENV, retain_freed_memory, retain_mib_from_env

REPO = Path(__file__).resolve().parents[1]

# A fresh process, tuned at start-up as the command line does, then the shape of LIFF's largest
# op: a 3x3 conv to 192 channels at 384x256, whose 75 MB output is over glibc's 32 MiB mmap
# ceiling; page faults per call after a warm-up, on the main thread or, as the service decodes,
# on a pool thread.
PROBE = textwrap.dedent("""
    import resource, sys, torch
    import torch.nn.functional as F
    from concurrent.futures import ThreadPoolExecutor
    from compass_serve.allocator import retain_freed_memory

    took = retain_freed_memory(int(sys.argv[1]))
    x, w = torch.rand(1, 32, 256, 384), torch.rand(192, 32, 3, 3)

    def faults_per_call():
        with torch.inference_mode():
            F.conv2d(x, w, padding=1).sum()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(3):
                F.conv2d(x, w, padding=1).sum()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 3

    if sys.argv[2] == "thread":
        with ThreadPoolExecutor(1) as pool:
            print(took, pool.submit(faults_per_call).result())
    else:
        print(took, faults_per_call())
""")


def probe(retain_mib: int, where: str) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(retain_mib), where], capture_output=True,
                         text=True, check=True, timeout=120, cwd=REPO).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is glibc's mallopt")
@pytest.mark.parametrize("where", ["main", "thread"])
def test_freed_tensors_are_reused_without_page_faults(where: str) -> None:
    took_default, faults_default = probe(0, where)  # 0: glibc's own behaviour
    took, faults = probe(256, where)
    assert (took_default, took) == (False, True)
    # glibc's defaults: the 75 MB output (and oneDNN's scratch) mapped and zero-filled afresh
    # every call, ~38k pages here.
    assert faults_default > 15_000, faults_default
    assert faults < faults_default / 20, (faults, faults_default)


def test_retain_setting_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert retain_mib_from_env() == DEFAULT_RETAIN_MIB
    monkeypatch.setenv(ENV, " 512 ")
    assert retain_mib_from_env() == 512
    for bad in ("lots", "1.5", "-1"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=ENV):
            retain_mib_from_env()
    with pytest.raises(ValueError, match="retain_mib"):
        retain_freed_memory(-5)


def test_cli_rejects_a_bad_setting_with_a_reason() -> None:
    env = {**os.environ, ENV: "plenty"}
    res = subprocess.run([sys.executable, "-m", "compass_serve.cli", "models"], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=120)
    assert res.returncode == 2
    assert f"{ENV} must be a whole number of MiB, got 'plenty'" in res.stderr
    assert "Traceback" not in res.stderr
