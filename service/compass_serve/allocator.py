"""Process heap tuning for torch's large, short-lived tensors (glibc only).

A decode or a training step allocates and frees hundreds of MB of feature maps and gradients.
glibc serves every block over 32 MiB (and, until its threshold adapts, over 128 KiB) as a
separate mapping and returns freed heap past 64 MiB to the kernel, so each decode or step
page-faults and zero-fills that memory again: ~350k page faults (1.4 GB) per joint training step
at batch 8, ~40k per 3-layer Kodak decode. Serving all blocks from one arena's heap and keeping
up to `retain_mib` of freed heap for reuse removes that work: 1.4x the training steps an hour
and 5-7 % off a decode on session 11's machine (`benchmarks/allocator.py`). Results are unchanged
(same arithmetic, other addresses). The cost: the process keeps up to `retain_mib` resident
between calls (a training process ~0.8 GB more), and a freed block below a live one is reused
rather than returned until the block above it is freed.

This is process-wide, so the library never does it on import: `compass-serve` (every command:
the service, the Celery worker, train, eval, encode, decode) calls `retain_freed_memory` at
start-up, before any thread allocates; an application that embeds the codec or the SDK may call
it itself, first thing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

#: Default amount of freed heap kept for reuse; `COMPASS_HEAP_RETAIN_MIB` overrides it, 0 keeps
#: the C library's defaults.
DEFAULT_RETAIN_MIB = 1024
ENV = "COMPASS_HEAP_RETAIN_MIB"

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def retain_mib_from_env() -> int:
    """`COMPASS_HEAP_RETAIN_MIB` as a number of MiB (the default when unset)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_RETAIN_MIB
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ENV} must be a whole number of MiB, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{ENV} must be >= 0, got {value}")
    return value


def retain_freed_memory(retain_mib: int | None = None) -> bool:
    """Keep up to `retain_mib` MiB of freed heap for reuse (None: from the environment).

    Returns True when the setting took effect, False on a C library without `mallopt`
    (musl, macOS, Windows) or when `retain_mib` is 0; there it changes nothing.
    """
    mib = retain_mib_from_env() if retain_mib is None else retain_mib
    if mib < 0:
        raise ValueError(f"retain_mib must be >= 0, got {mib}")
    if mib == 0:
        return False
    # No separate mappings (even a raised mmap threshold caps at 32 MiB, below the largest
    # maps), and one arena: a thread's own arena grows in 64 MiB heaps and maps anything larger
    # afresh, which is how the service decodes (in threads). Its allocations are few and large,
    # so sharing one arena's lock costs nothing measurable.
    trim = min(mib * 1024 * 1024, 2**31 - 1)  # mallopt takes a C int
    ok = all(mallopt(param, value) for param, value in
             ((M_MMAP_MAX, 0), (M_ARENA_MAX, 1), (M_TRIM_THRESHOLD, trim)))
    if ok:
        log.debug("heap: up to %d MiB of freed memory kept for reuse", mib)
    return ok


def mallopt(param: int, value: int) -> bool:
    """glibc's `mallopt(param, value)`; False where the C library has none or refuses."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn(param, value) == 1
