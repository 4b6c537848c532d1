"""Device, precision policy and seeding: decided once, here, and passed to everything else.

The same code runs on CUDA and on CPU:

=========  ================================  ===================================
``--amp``  CUDA                              CPU
=========  ================================  ===================================
on         fp16 autocast + GradScaler (see   bf16 autocast where the CPU has native
           ``Runtime.grad_scaler``), or      bf16, fp32 elsewhere (``precision.choose``);
           bf16 with --amp-dtype             no scaler (bf16 has fp32's exponent
                                             range); --amp-dtype bfloat16 forces bf16,
                                             float16 runs fp16 + GradScaler (slow: to
                                             test the fp16 path without a GPU)
off        fp32; TF32 on/off per --tf32      fp32
=========  ================================  ===================================

The precision and ``--memory-format auto`` are decided by ``image_classification.precision``.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from image_classification import allocator, denormals, precision
from image_classification.errors import UserError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp: bool
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    notes: tuple[str, ...] = ()   # lines for the log at start: why this precision (precision.choose)
    warnings: tuple[str, ...] = ()  # for stderr: forced emulated bf16
    tf32: bool = False  # fp32 matmuls and convolutions run as TF32 (CUDA only)

    @property
    def uses_grad_scaler(self) -> bool:
        return self.amp and self.amp_dtype == torch.float16

    @property
    def precision_name(self) -> str:
        if not self.amp:
            return "TF32" if self.tf32 else "FP32"
        return "AMP-fp16" if self.amp_dtype == torch.float16 else "AMP-bf16"

    def autocast(self):
        """The forward-pass context: autocast under AMP, nothing otherwise."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def synchronize(self) -> None:
        """Wait for queued device work (only for timing; a no-op on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def grad_scaler(self, static_loss_scale: float | None = None, dynamic: bool = False) -> torch.amp.GradScaler:
        """The loss scaler for ``--static-loss-scale`` / ``--dynamic-loss-scale`` (the seed's meaning):
        a static scale alone is fixed; ``dynamic`` starts from it; neither is dynamic from
        GradScaler's own initial scale (a fixed scale of 1 would let fp16 gradients underflow).
        Growth and backoff as the reference; disabled (a pass-through) unless fp16 AMP."""
        kwargs = {} if static_loss_scale is None else {"init_scale": static_loss_scale}
        kind = torch.amp.GradScaler if dynamic or static_loss_scale is None else FixedGradScaler
        return kind(self.device.type, growth_factor=2.0, backoff_factor=0.5, growth_interval=100,
                    enabled=self.uses_grad_scaler, **kwargs)


class FixedGradScaler(torch.amp.GradScaler):
    """A static loss scale: ``step`` still skips a step whose gradients overflowed (rather than
    write inf into the weights), but ``update`` never changes the scale."""

    def __init__(self, *args, init_scale: float, **kwargs):
        super().__init__(*args, init_scale=init_scale, **kwargs)
        self.fixed_scale = float(init_scale)

    def update(self, new_scale=None) -> None:
        super().update(self.fixed_scale if new_scale is None else new_scale)


def select_device(preference: str, local_rank: int) -> torch.device:
    """``auto`` → CUDA device ``local_rank mod count`` when CUDA is available, else CPU."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA device is available (use --device cpu)")
    if uses_cuda(preference):
        index = cuda_index(local_rank)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def uses_cuda(preference: str) -> bool:
    """Whether :func:`select_device` will choose a CUDA device (without creating a CUDA context)."""
    return preference in ("auto", "cuda") and torch.cuda.is_available()


def cuda_index(local_rank: int) -> int:
    """The visible CUDA device of local rank ``local_rank`` (one GPU per task under SLURM: 0)."""
    return local_rank % torch.cuda.device_count()


def pci_bus_id(index: int) -> str | None:
    """``0000:3b:00.0`` of visible CUDA device ``index`` (reads properties; creates no context).

    None with a torch too old to report it (the NGC images' builds may be).
    """
    properties = torch.cuda.get_device_properties(index)
    if not hasattr(properties, "pci_domain_id"):
        return None
    return f"{properties.pci_domain_id:04x}:{properties.pci_bus_id:02x}:{properties.pci_device_id:02x}.0"


def device_identity(index: int) -> str:
    """A name of physical GPU ``index`` that is the same in every process: PCI bus id, else UUID."""
    return pci_bus_id(index) or f"uuid {torch.cuda.get_device_properties(index).uuid}"


def prepare_cpu_process() -> None:
    """The process conditions a CPU run needs, set before its model's first buffers and before
    PyTorch's intra-op threads exist (which copy the denormal mode): the heap keeps what a step frees
    (:mod:`~image_classification.allocator`) and denormal floats compute as zero
    (:mod:`~image_classification.denormals`)."""
    allocator.keep_freed_memory()
    denormals.flush()


def build_runtime(*, device: torch.device, amp: bool, amp_dtype: str | None, memory_format: str,
                  tf32: bool, path: str = "train") -> Runtime:
    """``path`` ("train" or "infer") picks the row of ``--memory-format auto``'s table."""
    if device.type == "cuda":
        # Set explicitly for both precisions: torch's own defaults differ between cuDNN (on) and
        # matmul (off), and a "FP32" run must not silently use TF32.
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True
    chosen = precision.choose(device.type, amp, amp_dtype)
    return Runtime(device=device, amp=chosen.amp_dtype is not None, amp_dtype=chosen.amp_dtype,
                   memory_format=precision.memory_format(memory_format, device, path, chosen.amp_dtype),
                   notes=tuple(filter(None, [chosen.note])), warnings=tuple(filter(None, [chosen.warning])),
                   tf32=tf32 and device.type == "cuda")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Callers pass ``seed + global rank``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states to store in a checkpoint, so a resumed run draws the same random numbers."""
    # NumPy's state is stored as plain ints and a tensor: torch.load(weights_only=True) refuses
    # numpy arrays, and checkpoints are always loaded that way.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                     int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This process's device only: another launch may show it a different number of GPUs.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, local_rank: int = 0) -> None:
    random.setstate(_as_python_state(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per visible GPU, and this
        cuda = cuda[local_rank % len(cuda)] if cuda else None  # rank used GPU local_rank mod count
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)  # the current device


def _as_python_state(state):
    # weights_only loading returns lists where random.getstate() had tuples.
    version, internal, gauss = state
    return version, tuple(internal), gauss
