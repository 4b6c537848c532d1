"""``--gpu-affinity``: pin each process to the CPU cores close to its GPU (NUMA locality).

pynvml is imported here only, so runs without the flag never need it. The modes follow the
reference's names:

* ``socket``: all cores NVML reports as local to the GPU;
* ``socket_single``: the first of those cores;
* ``socket_single_unique``: one core, different for each GPU sharing the socket;
* ``socket_unique_contiguous`` / ``socket_unique_interleaved``: the socket's cores split between
  the GPUs that share it, as contiguous blocks or round-robin.
"""
from __future__ import annotations

import os

from image_classification.errors import UserError


def split_cores(cores: list[int], gpus_on_socket: list[int], gpu: int, mode: str) -> list[int]:
    """The cores ``gpu`` gets out of its socket's ``cores`` (pure function; tested without a GPU)."""
    cores = sorted(cores)
    position, count = gpus_on_socket.index(gpu), len(gpus_on_socket)
    if mode == "socket":
        return cores
    if mode == "socket_single":
        return cores[:1]
    if mode == "socket_single_unique":
        return [cores[position % len(cores)]]
    if mode == "socket_unique_interleaved":
        return cores[position::count] or cores[:1]
    if mode == "socket_unique_contiguous":
        share = max(1, len(cores) // count)
        return cores[position * share:(position + 1) * share] or cores[-1:]
    raise UserError(f"unknown --gpu-affinity {mode!r}")


def _local_cores(pynvml, handle) -> list[int]:
    words = pynvml.nvmlDeviceGetCpuAffinity(handle, (os.cpu_count() + 63) // 64)
    return [64 * w + bit for w, word in enumerate(words) for bit in range(64) if word >> bit & 1]


def set_affinity(gpu: int, mode: str) -> list[int]:
    """Restrict this process to ``gpu``'s share of its socket's cores; returns the cores."""
    try:
        import pynvml
    except ImportError:
        raise UserError("--gpu-affinity needs pynvml: pip install nvidia-ml-py") from None
    pynvml.nvmlInit()
    try:
        socket = {gpu_index: tuple(_local_cores(pynvml, pynvml.nvmlDeviceGetHandleByIndex(gpu_index)))
                  for gpu_index in range(pynvml.nvmlDeviceGetCount())}
    finally:
        pynvml.nvmlShutdown()
    sharing = [index for index, cores in socket.items() if cores == socket[gpu]]
    chosen = split_cores(list(socket[gpu]), sharing, gpu, mode)
    os.sched_setaffinity(0, chosen)
    return chosen
