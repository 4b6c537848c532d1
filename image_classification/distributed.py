"""Process-group setup from the environment, and the few collectives the engine needs.

A run is distributed when ``WORLD_SIZE`` > 1 (set by ``torchrun``, ``multiproc.py``) or when SLURM
started several tasks (``SLURM_NTASKS`` > 1 with ``MASTER_ADDR`` set). The backend is NCCL on CUDA
and gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context_from_env(env: os._Environ | dict | None = None) -> DistributedContext:
    """Read rank and world size as torchrun sets them, falling back to SLURM's variables."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        return DistributedContext(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                                  world_size=int(env["WORLD_SIZE"]))
    if int(env.get("SLURM_NTASKS", 1)) > 1 and "MASTER_ADDR" in env:
        return DistributedContext(rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", 0)),
                                  world_size=int(env["SLURM_NTASKS"]))
    return DistributedContext()


def init(context: DistributedContext, device: torch.device) -> None:
    """Join the process group (no-op for a single process)."""
    if not context.enabled or dist.is_initialized():
        return
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    store, _, _ = next(dist.rendezvous("env://", rank=context.rank, world_size=context.world_size))
    # After a torchrun restart the store can still hold the dead group's addresses; keys of each
    # attempt get their own prefix so the new group never connects to a dead rank.
    store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend=backend, store=store, rank=context.rank, world_size=context.world_size,
                            **kwargs)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (identity for a single process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor

