"""Inference-only model preparation: the fast CPU path that classify.py uses by default.

BatchNorm folded into the preceding convolutions, the memory format and precision of the runtime
(``image_classification.precision``: bf16 weights under bf16 autocast and channels_last where the
CPU has native bf16; fp32 elsewhere). ``benchmarks/inference_sweep.py --paths`` measures PyTorch
fp32, this path and ONNX Runtime fp32 / INT8 side by side; see README "Quantization and deployment".
"""
from __future__ import annotations

import warnings

import torch
from torch import nn


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every Conv2d→BatchNorm2d pair folded into one
    convolution (torch.fx's ``fuse``). A model torch.fx cannot trace is returned unchanged
    (only slower), never approximated."""
    from torch.fx.experimental.optimization import fuse

    model = model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fuse(model)
    except Exception:  # noqa: BLE001 - any tracing failure: keep the unfolded model
        return model


def cpu_fast_path(model: nn.Module, amp_dtype: torch.dtype | None, memory_format: torch.memory_format) -> nn.Module:
    """BatchNorm folded, in ``memory_format``, and -- under bf16 AMP when every BatchNorm could be
    folded -- bf16 weights.

    Run it under the runtime's autocast with inputs in ``memory_format``. Autocast alone casts
    every convolution's fp32 weights to bf16 again on every call; weights stored in bf16 skip that
    (ResNet50, batch 8 on 2 cores: 1-10 % more img/s, the same predictions). A model with a
    normalisation layer left (not traceable by torch.fx) keeps fp32 weights: autocast runs
    normalisation in fp32, which needs fp32 parameters.
    """
    folded = fold_batchnorm(model).to(memory_format=memory_format)
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    if amp_dtype != torch.bfloat16 or any(isinstance(module, norms) for module in folded.modules()):
        return folded
    return folded.to(torch.bfloat16)
