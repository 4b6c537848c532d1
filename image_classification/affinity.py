"""``--gpu-affinity``: pin each process to the CPU cores close to its GPU (NUMA locality).

pynvml is imported here only, so runs without the flag never need it. The modes follow the
reference's names:

* ``socket``: all cores NVML reports as local to the GPU;
* ``socket_single``: the first of those cores;
* ``socket_single_unique``: one core, different for each GPU sharing the socket;
* ``socket_unique_contiguous`` / ``socket_unique_interleaved``: the socket's cores split between
  the GPUs that share it, as contiguous blocks or round-robin.

A "core" is a physical core with all its hyperthread siblings: Linux numbers the second thread
of each core after all the first ones (0-19 and 40-59 on a 20-core socket), so splitting logical
CPUs would hand one GPU's process the siblings of another's cores.

Hand-written rather than ``torchrun --numa-binding`` because that offers other modes (NUMA node,
exclusive, core complex), not the reference's, and the recipes name these. The same facts are
used: the GPU is found by PCI bus id (NVML enumerates every GPU of the node and ignores
``CUDA_VISIBLE_DEVICES``), siblings come from sysfs, and the result stays inside the CPUs the
process may use (``os.sched_getaffinity``: SLURM, ``docker --cpuset-cpus``).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from image_classification.errors import UserError


@dataclass(frozen=True)
class Topology:
    """What the split needs to know about the node (read by :func:`read_topology`; faked in tests)."""

    gpu_cores: dict[str, tuple[int, ...]]  # PCI bus id -> NVML-local logical CPUs, every GPU in NVML order
    siblings: dict[int, tuple[int, ...]]   # logical CPU -> the logical CPUs of its physical core
    allowed: frozenset[int]                # CPUs this process may run on


def normalize_bus_id(bus_id: str) -> str:
    """``0000:3b:00.0`` and NVML's ``00000000:3B:00.0`` name the same device."""
    domain, rest = bus_id.strip().lower().split(":", 1)
    return f"{int(domain, 16):08x}:{rest}"


def physical_cores(cpus: list[int], siblings: dict[int, tuple[int, ...]]) -> list[list[int]]:
    """``cpus`` grouped by physical core, cores ordered by their first logical CPU."""
    wanted, groups = set(cpus), {}
    for cpu in cpus:
        group = sorted(wanted & set(siblings.get(cpu, (cpu,))) | {cpu})
        groups[group[0]] = group
    return [groups[first] for first in sorted(groups)]


def split_cores(cores: list[list[int]], position: int, count: int, mode: str) -> list[list[int]]:
    """The physical cores the GPU at ``position`` of the ``count`` sharing a socket gets."""
    if mode == "socket":
        return cores
    if mode == "socket_single":
        return cores[:1]
    if mode == "socket_single_unique":
        return [cores[position % len(cores)]]
    if mode == "socket_unique_interleaved":
        return cores[position::count] or [cores[position % len(cores)]]
    if mode == "socket_unique_contiguous":
        share = len(cores) // count
        if share == 0:  # fewer cores than GPUs: one each, shared round-robin
            return [cores[position % len(cores)]]
        return cores[position * share:(position + 1) * share]
    raise UserError(f"unknown --gpu-affinity {mode!r}")


def _local_cpus(topology: Topology, bus_id: str) -> tuple[dict[str, tuple[int, ...]], tuple[int, ...]]:
    gpus = {normalize_bus_id(bus): tuple(sorted(cpus)) for bus, cpus in topology.gpu_cores.items()}
    if normalize_bus_id(bus_id) not in gpus:
        raise UserError(f"--gpu-affinity: NVML does not list the GPU at PCI bus id {bus_id}")
    return gpus, gpus[normalize_bus_id(bus_id)]


def choose_cpus(topology: Topology, bus_id: str, mode: str) -> list[int]:
    """The logical CPUs for the GPU at ``bus_id`` under ``mode``, within ``topology.allowed``."""
    gpus, local = _local_cpus(topology, bus_id)
    bus_id = normalize_bus_id(bus_id)
    sharing = [bus for bus, cpus in gpus.items() if cpus == local]
    cores = physical_cores(list(local), topology.siblings)
    chosen = [cpu for core in split_cores(cores, sharing.index(bus_id), len(sharing), mode) for cpu in core]
    # Split first, then restrict, so every process computes the same split whatever its own limits.
    for candidates in (chosen, local):
        allowed = sorted(set(candidates) & topology.allowed)
        if allowed:
            return allowed
    return sorted(topology.allowed)


def _cpu_list(text: str) -> tuple[int, ...]:
    """sysfs list syntax: ``0,40`` or ``0-1``."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return tuple(cpus)


def read_topology() -> Topology:
    """The node's GPUs (NVML), hyperthread siblings (sysfs) and this process's allowed CPUs."""
    try:
        import pynvml
    except ImportError:
        raise UserError("--gpu-affinity needs pynvml: pip install nvidia-ml-py") from None
    pynvml.nvmlInit()
    try:
        gpu_cores = {}
        words = (os.cpu_count() + 63) // 64
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:  # a GPU this process may not access (cgroups) is simply not one of the sharers
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                bus_id = pynvml.nvmlDeviceGetPciInfo(handle).busId
                mask = pynvml.nvmlDeviceGetCpuAffinity(handle, words)
            except pynvml.NVMLError:
                continue
            bus_id = bus_id.decode() if isinstance(bus_id, bytes) else bus_id
            gpu_cores[bus_id] = tuple(64 * w + bit for w, word in enumerate(mask) for bit in range(64) if word >> bit & 1)
    finally:
        pynvml.nvmlShutdown()
    siblings = {}
    for cpu in {cpu for cpus in gpu_cores.values() for cpu in cpus}:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as handle:
                siblings[cpu] = _cpu_list(handle.read())
        except OSError:
            siblings[cpu] = (cpu,)
    return Topology(gpu_cores=gpu_cores, siblings=siblings, allowed=frozenset(os.sched_getaffinity(0)))


def set_affinity(bus_id: str, mode: str, topology: Topology | None = None) -> list[int]:
    """Pin this process to ``mode``'s CPUs for the GPU at ``bus_id``; returns them.

    Call it before the CUDA context and the data loader's threads and workers exist: threads
    inherit the affinity of the thread that starts them. Threads already running are moved too.
    """
    topology = topology or read_topology()
    cpus = choose_cpus(topology, bus_id, mode)
    if not set(cpus) & set(_local_cpus(topology, bus_id)[1]):
        print(f"warning: --gpu-affinity {mode}: none of the GPU's local CPUs is allowed for this process; "
              "keeping its CPU set", file=sys.stderr)
    for thread in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread), cpus)
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile
            pass
    return cpus
