"""Keep the memory a CPU training step frees for the next step (glibc's ``malloc``).

A training step on the CPU allocates and frees the same large activation and gradient buffers
every step. With glibc's defaults, a buffer above the (dynamic) mmap threshold is a fresh
``mmap`` each time, and a free at the top of the heap above the trim threshold hands the pages
back to the kernel, so the next step touches them again: page faults inside every kernel. Measured
on 2 cores of an Intel Xeon (AMX, bf16), ResNet18 at 128 px, batch 64, bf16 + channels_last,
``main.py --data-backend synthetic``: 121 img/s with the defaults, 137-139 with the settings below
(``benchmarks/bench_loader_share.py``, docs/performance.md). PyTorch's CPU allocator has no cache of
its own; jemalloc or tcmalloc (``LD_PRELOAD``) do the same job but must be chosen before the process
starts, which ``python main.py`` cannot do, so this sets glibc's own knobs with ``mallopt`` instead.

The cost: the process keeps up to ``TOP_PAD`` more and does not shrink its heap below its peak,
which a training process reaches in its first step anyway.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20   # glibc's maximum on 64-bit: buffers up to 32 MiB come from the heap
TRIM_THRESHOLD = 1 << 30    # free heap top returned to the kernel only beyond 1 GiB
TOP_PAD = 256 << 20         # and grown 256 MiB at a time


def keep_freed_memory() -> bool:
    """Apply the settings above where the C library is glibc; ``True`` when all three took."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:  # not glibc (musl, macOS, Windows): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    taken = [mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD),
             mallopt(M_TOP_PAD, TOP_PAD)]
    if not all(taken):
        log.debug("mallopt refused some settings: %s", taken)
    return all(taken)
