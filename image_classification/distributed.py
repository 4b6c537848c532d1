"""Process-group setup from the environment, and the few collectives the engine needs.

A run is distributed when ``WORLD_SIZE`` > 1 (set by ``torchrun``, ``multiproc.py``) or when SLURM
started several tasks (``SLURM_NTASKS`` > 1 with ``MASTER_ADDR`` set). The backend is NCCL on CUDA
and gloo on CPU.
"""
from __future__ import annotations

import gc
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from image_classification.errors import UserError


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
    _bind_import_time_defaults()
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    store, _, _ = next(dist.rendezvous("env://", rank=context.rank, world_size=context.world_size))
    # After a torchrun restart the store can still hold the dead group's addresses; keys of each
    # attempt get their own prefix so the new group never connects to a dead rank.
    store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    if device.type == "cuda":
        from image_classification.runtime import device_identity
        check_one_process_per_device(store, context, f"{socket.gethostname()} {device_identity(device.index)}",
                                     visible=torch.cuda.device_count())
    dist.init_process_group(backend=backend, store=store, rank=context.rank, world_size=context.world_size,
                            **kwargs)


def check_one_process_per_device(store, context: DistributedContext, device_key: str, visible: int) -> None:
    """Every rank stops with one line when two processes would share a GPU.

    NCCL would otherwise fail later with "Duplicate GPU detected" (or hang). Each rank records its
    ``device_key`` ("host GPU-identity") in the rendezvous store, waits for all ranks, then checks.
    """
    ranks_key = f"device/{device_key}"
    store.append(ranks_key, f"{context.rank} ")
    if store.add(f"count/{device_key}", 1) > 1:
        store.add("shared_devices", 1)
    store.set(f"checked/{context.rank}", "1")
    store.wait([f"checked/{rank}" for rank in range(context.world_size)])
    if store.add("shared_devices", 0) == 0:
        return
    sharing = store.get(ranks_key).decode().split()
    store.set(f"read/{context.rank}", "1")
    if context.rank == 0:  # rank 0 may host the store: leave only once every rank has read it
        store.wait([f"read/{rank}" for rank in range(context.world_size)])
    host, gpu = device_key.split(" ", 1)
    if len(sharing) > 1:
        raise UserError(f"ranks {', '.join(sorted(sharing, key=int))} all use CUDA device {gpu} on {host}: "
                        f"more processes on this node than its {visible} visible GPU(s); start at most {visible} "
                        "per node (--nproc_per_node) or give each process its own GPU (CUDA_VISIBLE_DEVICES)")
    raise UserError("other ranks share a GPU (more processes than GPUs on a node); see their error")


#: What gloo and NCCL say when a collective's peer process is gone (killed, crashed, lost its node).
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "remote process exited",
              "NCCL communicator was aborted")


def peer_lost(error: BaseException) -> str | None:
    """The reason, when ``error`` is a collective failing because another rank's process is gone."""
    if not isinstance(error, RuntimeError) or not dist.is_initialized():
        return None
    return next((marker for marker in _PEER_LOST if marker in str(error)), None)


def _bind_import_time_defaults() -> None:
    """Import, before the process group exists, the torch modules that bind it at import time.

    ``torch.distributed.nn.functional`` declares ``group=group.WORLD`` as a default argument of
    ten functions, evaluated when the module is first imported -- which DDP's constructor does
    (through ``torch._dynamo``, FSDP and ``_shard``). Imported after ``init_process_group``, those
    defaults hold the default group for the life of the interpreter: ``destroy_process_group``
    then leaves the gloo group (and its worker threads) alive until the interpreter is torn down,
    and a rank that had finished its work could die at exit with "terminate called without an
    active exception" (SIGABRT). Imported first, the defaults are None.
    """
    import torch.distributed.nn.functional  # noqa: F401


def shutdown() -> None:
    """Destroy the process group while the interpreter is whole. Every rank calls it on every
    path out of ``main`` (no collective is in flight by then: see ``GracefulStop.restore``)."""
    if dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()  # what a reference cycle (a DDP model in a traceback) still holds of it goes now


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

