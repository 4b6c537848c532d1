"""Inference-only model preparation: the fast CPU path that classify.py uses by default.

``benchmarks/inference_sweep.py --paths`` measures PyTorch fp32, this path (bf16 weights under
bf16 autocast, channels_last, BatchNorm folded into the preceding convolutions) and ONNX Runtime fp32 / INT8 side
by side; see README "Quantization and deployment" for the numbers.
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


def cpu_fast_path(model: nn.Module) -> nn.Module:
    """BatchNorm folded, channels_last, and -- when every BatchNorm could be folded -- bf16 weights.

    Run it under bf16 autocast with NHWC inputs. Autocast alone casts every convolution's fp32
    weights to bf16 again on every call; weights stored in bf16 skip that (ResNet50, batch 8 on 2
    cores: 1-10 % more img/s, the same predictions). A model with a normalisation layer left
    (not traceable by torch.fx) keeps fp32 weights: autocast runs normalisation in fp32, which
    needs fp32 parameters.
    """
    folded = fold_batchnorm(model).to(memory_format=torch.channels_last)
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    if any(isinstance(module, norms) for module in folded.modules()):
        return folded
    return folded.to(torch.bfloat16)
