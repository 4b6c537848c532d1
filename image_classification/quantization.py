"""Quantization-aware training (QAT) with NVIDIA Model Optimizer (``nvidia-modelopt``).

QAT is a transformation of any trained network, not an architecture: :func:`calibrate` puts fake
INT8 quantizers in front of every convolution and linear layer (weights per output channel,
activations per tensor, the library's ``INT8_DEFAULT_CFG``), sets their ranges (``amax``) from
the maximum seen over a few training batches, and training then continues through the fake
quantization. The quantizer layout (``modelopt_state``, plain Python values and tensors) is
saved next to the weights, whose ``*_quantizer._amax`` buffers are part of the state dict, so a
checkpoint restores with ``torch.load(weights_only=True)``: :func:`restore` re-inserts the
quantizers, then the weights load strictly.

modelopt is imported lazily: it takes seconds to import and only QAT needs it.
"""
from __future__ import annotations

import contextlib
import copy
import io
import itertools
import sys
import warnings
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from image_classification.errors import UserError

DEFAULT_CALIBRATION_BATCHES = 16


def _modelopt():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no transformers / CUDA" notices about plugins we do not use
            import modelopt.torch.opt as mto
            import modelopt.torch.quantization as mtq
    except ImportError as error:
        raise UserError(f"quantization needs NVIDIA Model Optimizer ({error}); "
                        "install it with: python -m pip install -r requirements.txt") from None
    return mto, mtq


def int8_config() -> dict[str, Any]:
    """INT8 weights per output channel (axis 0), INT8 activations per tensor, max calibration."""
    return copy.deepcopy(_modelopt()[1].INT8_DEFAULT_CFG)


def calibrate(model: nn.Module, batches: Iterable, num_batches: int = DEFAULT_CALIBRATION_BATCHES) -> nn.Module:
    """Insert the INT8 fake quantizers into ``model`` and calibrate them on ``num_batches`` of
    ``batches`` ((images, target) pairs or bare image tensors); returns the quantized model."""
    _, mtq = _modelopt()
    seen = []

    def forward_loop(module: nn.Module) -> None:
        with torch.no_grad():
            for batch in itertools.islice(batches, num_batches):
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                module(images)
                seen.append(images.shape[0])

    was_training = model.training
    model.eval()  # BatchNorm uses its running statistics while the ranges are measured
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        model = mtq.quantize(model, int8_config(), forward_loop)
    if not seen:
        raise UserError("the calibration set is empty: quantization needs at least one batch of training images")
    model.train(was_training)
    return model


def is_quantized(model: nn.Module) -> bool:
    if "modelopt.torch.opt" not in sys.modules:  # nothing can be quantized before modelopt is imported
        return False
    return _modelopt()[0].ModeloptStateManager.is_converted(model)


def state(model: nn.Module) -> dict[str, Any]:
    """What :func:`restore` needs besides the state dict (a checkpoint stores it as ``modelopt_state``)."""
    mto, _ = _modelopt()
    return mto.modelopt_state(model)


def restore(model: nn.Module, saved: Mapping[str, Any] | None) -> nn.Module:
    """Re-insert the quantizers a checkpoint was trained with (``saved``: its quantizer layout,
    ``SavedRun.quantizers``), before its weights are loaded; None returns ``model`` unchanged."""
    if saved is None:
        return model
    mto, _ = _modelopt()
    # modelopt prints "Inserted N quantizers" on stdout, which would corrupt e.g. classify.py --json.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return mto.restore_from_modelopt_state(model, dict(saved))
