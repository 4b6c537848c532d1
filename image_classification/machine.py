"""One line naming the machine a figure was measured on: every benchmark prints it first, so
two figures from different machines are never compared as if alike.

    machine: AMD EPYC (x86_64), 2 of 2 cores usable, bf16 native (avx512_bf16), AMX none, VNNI avx512_vnni,
    torch 2.14.1, DALI 2.4.0, GPU none
"""
from __future__ import annotations

import os
import re
from importlib import metadata
from typing import Mapping

import torch

from image_classification import precision

AMX_FEATURES = ("amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
VNNI_FEATURES = ("avx512_vnni", "avx_vnni", "avx_vnni_int8", "i8mm", "dot")  # x86 VNNI; ARM64 int8 matmul / dot


def describe(capabilities: Mapping[str, object] | None = None) -> str:
    """CPU model, usable/total cores, bf16/AMX/VNNI capability, torch and DALI versions, GPU(s)."""
    caps = precision.cpu_capabilities() if capabilities is None else capabilities
    bf16 = precision.native_bf16_feature(caps)
    parts = [f"machine: {caps.get('cpu_name') or 'unknown CPU'} ({caps.get('architecture', '?')})",
             f"{usable_cores()} of {os.cpu_count()} cores usable",
             f"bf16 native ({bf16})" if bf16 else "bf16 emulated (no native bf16"
             + (f", oneDNN capped at {caps['onednn_max_cpu_isa']})" if caps.get("onednn_max_cpu_isa") else ")"),
             f"AMX {_present(caps, AMX_FEATURES)}", f"VNNI {_present(caps, VNNI_FEATURES)}",
             f"torch {torch.__version__}", f"DALI {dali_version() or 'not installed'}", f"GPU {_gpus()}"]
    return ", ".join(parts)


def _present(caps: Mapping[str, object], names: tuple[str, ...]) -> str:
    found = [name for name in names if caps.get(name)]
    return "/".join(found) if found else "none"


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: SLURM, ``docker --cpuset-cpus``, taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def memory_bytes() -> int:
    """This machine's physical memory in bytes (what the page cache can at most hold)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def local_processes(env: Mapping[str, str] | None = None) -> int:
    """Training processes on this node: torchrun's ``LOCAL_WORLD_SIZE``, else SLURM's tasks per node
    (``SLURM_NTASKS_PER_NODE``, e.g. ``4`` or ``4(x2)``), else 1."""
    env = os.environ if env is None else env
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        leading = re.match(r"\d+", env.get(name, ""))
        if leading and int(leading.group()) > 0:
            return int(leading.group())
    return 1


def cores_per_process(env: Mapping[str, str] | None = None) -> int:
    """This process's share of the cores it may use, when the node's training processes share them."""
    return max(1, usable_cores() // local_processes(env))


def dali_version() -> str | None:
    """The installed DALI wheel's version (read from its metadata: importing DALI takes seconds)."""
    for distribution in metadata.distributions():
        if (distribution.metadata["Name"] or "").lower().startswith("nvidia-dali"):
            return distribution.version
    return None


def _gpus() -> str:
    if not torch.cuda.is_available():
        return "none"
    names = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    return f"{len(names)}x {names[0]}" if len(set(names)) == 1 else " + ".join(names)
