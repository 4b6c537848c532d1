"""Which precision and memory format a run uses, from what the CPU computes natively: the one owner.

bf16 is fast on a CPU only where it has bf16 instructions. Elsewhere PyTorch emulates it
(converts to fp32 around every operation), and bf16 autocast ran 2-3x *slower* than fp32 on an
Intel Xeon with AVX-512 but without AVX512-BF16 (issue 18). So on the CPU ``--amp`` means bf16
where one of :data:`NATIVE_BF16_FEATURES` is present, and fp32 elsewhere; ``--amp-dtype bfloat16``
still forces bf16 (with a warning where it is emulated). ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``
cannot decide this: it says True on any AVX-512 CPU.

The capability names are those of ``torch.cpu.get_capabilities()`` (PyTorch's ``torch/cpu/__init__.py``
lists them: x86 ``avx512_bf16``, ``amx_bf16``; ARM64 ``bf16`` (NEON BF16) and ``sve_bf16``).
:func:`cpu_capabilities` is the only place that reads the table, so tests fake it there. It also
honours oneDNN's own cap, ``ONEDNN_MAX_CPU_ISA`` (PyTorch's CPU convolutions run on oneDNN): capped
below ``AVX512_CORE_BF16`` the convolutions emulate bf16 as on a CPU without it, so the bf16
features count as absent -- which also lets one machine measure both kinds of CPU.

The memory format of ``--memory-format auto`` (the default; also classify.py's and the benchmarks')
comes from :data:`MEMORY_FORMAT_TABLE`, filled from ``benchmarks/bench_precision.py`` measurements on
the CPU and from what a GPU computes natively on CUDA (:func:`cuda_capability`, the one read of it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch

#: Capabilities that make bf16 native, best first (the first one present is named in the log line).
NATIVE_BF16_FEATURES = ("amx_bf16", "avx512_bf16", "sve_bf16", "bf16")

#: (device type, path, dtype) -> memory format of ``auto``; path is "train" or "infer".
#: CPU: measured with ``benchmarks/bench_precision.py`` (batch 32, 64 px, eager; docs/performance.md) on
#: 2 cores of an AMD EPYC (Zen 4): channels_last was faster in every bf16 case (ResNet18/50,
#: EfficientNet-B0; train 1.04-1.11x, infer 1.14-1.46x) and in fp32 in 10 of 12 cases (1.04-1.84x,
#: EfficientNet-B0's depthwise convolutions most; ResNet18/50 fp32 with native bf16 present:
#: 0.97-0.98x), both with native bf16 and with oneDNN capped below it (``ONEDNN_MAX_CPU_ISA``), so
#: ``auto`` is channels_last on the CPU (fp16, a test path on the CPU, as fp32).
#: CUDA: channels_last under fp16/bf16 AMP, which cuDNN runs on tensor cores in NHWC natively (NCHW
#: costs a transpose around every convolution) -- the layout every AMP preset of the reference's
#: configs.yml asks for; only where the GPU has tensor cores (:data:`TENSOR_CORE_CAPABILITY`), NCHW
#: elsewhere and for fp32/TF32, as the reference's FP32/TF32 presets.
MEMORY_FORMAT_TABLE: dict[tuple[str, str, str], str] = {
    **{("cpu", path, dtype): "nhwc" for path in ("train", "infer") for dtype in ("fp32", "bf16", "fp16")},
    **{("cuda", path, dtype): "nhwc" for path in ("train", "infer") for dtype in ("fp16", "bf16")},
}
#: CUDA compute capability from which the GPU has tensor cores (Volta): ``auto``'s CUDA rows need it.
TENSOR_CORE_CAPABILITY = (7, 0)
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
#: ``ONEDNN_MAX_CPU_ISA`` values that leave oneDNN no bf16 instructions (oneDNN's ISA names).
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def cpu_capabilities(environ: Mapping[str, str] | None = None) -> Mapping[str, object]:
    """torch's table of this CPU's features (cached by torch), less the bf16 features that
    ``ONEDNN_MAX_CPU_ISA`` switches off; the one read of it."""
    capabilities = torch.cpu.get_capabilities()
    isa = (os.environ if environ is None else environ).get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa not in ONEDNN_ISAS_WITHOUT_BF16:
        return capabilities
    return {**capabilities, **{name: False for name in NATIVE_BF16_FEATURES}, "onednn_max_cpu_isa": isa}


def native_bf16_feature(capabilities: Mapping[str, object] | None = None) -> str | None:
    """The CPU feature that makes bf16 native here, or None where bf16 is emulated."""
    capabilities = cpu_capabilities() if capabilities is None else capabilities
    return next((name for name in NATIVE_BF16_FEATURES if capabilities.get(name)), None)


@dataclass(frozen=True)
class Precision:
    """The autocast dtype of a run (None: fp32) and the lines to show at start."""
    amp_dtype: torch.dtype | None
    note: str | None = None       # why, naming the deciding CPU feature (CPU --amp only)
    warning: str | None = None    # forced bf16 that this CPU emulates

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]


def choose(device_type: str, amp: bool, requested: str | None = None) -> Precision:
    """The autocast dtype for ``--amp`` [``--amp-dtype requested``] on ``device_type``.

    CUDA: fp16 unless requested otherwise. CPU: ``requested`` as given (bf16 forced on a CPU
    without native bf16 gets a warning); otherwise bf16 where native, fp32 elsewhere.
    """
    if not amp:
        return Precision(None)
    if device_type != "cpu":
        return Precision(getattr(torch, requested or "float16"))
    capabilities = cpu_capabilities()
    feature = native_bf16_feature(capabilities)
    if requested == "bfloat16":
        warning = None if feature else (f"warning: --amp-dtype bfloat16 forces bf16 on this CPU, which has no native "
                                        f"bf16 ({_missing(capabilities)}): it is emulated and usually slower than fp32")
        return Precision(torch.bfloat16, warning=warning)
    if requested is not None:
        return Precision(getattr(torch, requested))
    if feature:
        return Precision(torch.bfloat16, note=f"--amp: bf16 autocast (this CPU has {feature})")
    return Precision(None, note=f"--amp: fp32 (this CPU has no native bf16: {_missing(capabilities)}; emulated "
                                "bf16 is slower than fp32; --amp-dtype bfloat16 forces it)")


def _missing(capabilities: Mapping[str, object]) -> str:
    if capabilities.get("onednn_max_cpu_isa"):
        return f"ONEDNN_MAX_CPU_ISA={capabilities['onednn_max_cpu_isa']}"
    return "no " + "/".join(NATIVE_BF16_FEATURES)


def format_name(memory_format: torch.memory_format) -> str:
    """``nchw`` or ``nhwc``: the flag value of ``memory_format``."""
    return next(name for name, value in MEMORY_FORMATS.items() if value == memory_format)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of CUDA ``device``; the one read of it, so tests fake it here."""
    return torch.cuda.get_device_capability(device)


def memory_format(choice: str, device: str | torch.device, path: str, amp_dtype: torch.dtype | None
                  ) -> torch.memory_format:
    """``nchw``/``nhwc`` as given; ``auto`` from :data:`MEMORY_FORMAT_TABLE` (NCHW where it has no entry,
    and on a GPU without tensor cores)."""
    if choice == "auto":
        device = torch.device(device)
        choice = MEMORY_FORMAT_TABLE.get((device.type, path, Precision(amp_dtype).name), "nchw")
        if device.type == "cuda" and cuda_capability(device) < TENSOR_CORE_CAPABILITY:
            choice = "nchw"
    return MEMORY_FORMATS[choice]
