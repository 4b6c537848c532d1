"""Compute denormal floats as zero on the CPU (x86 FTZ/DAZ, Arm FZ), for the whole process.

A float below 1.2e-38 in magnitude (fp32 and bf16 share that exponent range) is "denormal", and x86
computes with it through a microcode path tens of times slower than the normal one. Training makes
them: once a batch is learnt, the loss's gradients shrink towards zero and every kernel of the
backward pass and the optimizer crawls. Measured on 2 cores of an Intel Xeon (AMX, bf16): the
synthetic backend's fixed batch, learnt to a loss of 0, took fp32 steps from 0.9 s to 60 s, and in
bf16 put two 1.0-1.2 s steps among 0.5 s ones (docs/performance.md). Treating them as zero changes
no value a network can tell from zero.

The mode is a register of each thread (MXCSR on x86) and ``torch.set_flush_denormal`` sets only the
calling thread's. A new thread starts with a copy of its creator's, so the one call covers the
intra-op pool only if it comes before the pool's threads exist: they are made by the first operator
large enough to split, which in a ``main.py`` process comes after :func:`flush` (the CLI calls it
before the model is built). A caller that has already run such operators in this process (a
notebook, a test) gets the mode on its own thread only; :func:`threads_flushing` tells.
"""
from __future__ import annotations

import torch

DENORMAL_BITS = 0x00400000  # fp32 5.9e-39, written as bits: a float conversion would flush it itself
PROBE_ELEMENTS = 1 << 24    # large enough that every intra-op thread computes a part of it


def flush() -> bool:
    """Denormals as zero from now on, in this thread and the threads it creates; ``False`` where
    the CPU has no such mode (then nothing changes)."""
    return torch.set_flush_denormal(True)


def threads_flushing() -> list[bool]:
    """For each of 16 equal parts of one large operator, whether its thread computed a denormal as
    zero: all ``True`` when every intra-op thread flushes (the parts are split among them)."""
    denormal = torch.full((PROBE_ELEMENTS,), DENORMAL_BITS, dtype=torch.int32).view(torch.float32)
    product = denormal * 0.5  # a denormal, or 0 on a flushing thread
    # compared as bits: a float comparison on a flushing thread would call any denormal zero
    return (product.view(torch.int32) == 0).view(16, -1).all(dim=1).tolist()
