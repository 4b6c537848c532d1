"""Optimizers with the reference's no-weight-decay rule for normalisation layers."""
from __future__ import annotations

import torch
from torch import nn

from image_classification.errors import UserError

# Decided by module type, not by parameter name: the reference matched the substring "bn", which
# missed ResNet's `downsample.1` BatchNorm and would catch any parameter that happens to contain "bn".
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def parameter_groups(model: nn.Module, weight_decay: float, bn_weight_decay: bool) -> list[dict]:
    """Two groups: normalisation-layer parameters (decay 0 unless ``bn_weight_decay``) and the rest."""
    norm_params, other_params = [], []
    for module in model.modules():
        target = norm_params if isinstance(module, NORM_LAYERS) else other_params
        target.extend(p for p in module.parameters(recurse=False) if p.requires_grad)
    norm_decay = weight_decay if bn_weight_decay else 0.0
    return [{"params": other_params, "weight_decay": weight_decay},
            {"params": norm_params, "weight_decay": norm_decay}]


def build_optimizer(model: nn.Module, *, name: str, lr: float, momentum: float, weight_decay: float,
                    nesterov: bool = False, bn_weight_decay: bool = False, rmsprop_alpha: float = 0.9,
                    rmsprop_eps: float = 1e-3, device: torch.device = torch.device("cpu")) -> torch.optim.Optimizer:
    """The optimizer for ``model``, whose parameters are on ``device``.

    On CUDA, SGD uses PyTorch's fused kernel: a fused optimizer unscales and skips inf/NaN steps
    itself, so ``GradScaler.step`` does not read ``found_inf`` back to the host every step (it does
    for any other optimizer). PyTorch 2.14 has no fused RMSprop, so fp16 AMP with RMSprop keeps
    that one sync per optimizer step (bf16 AMP needs no GradScaler, hence no sync).
    """
    groups = parameter_groups(model, weight_decay, bn_weight_decay)
    if name == "sgd":
        if nesterov and momentum <= 0:
            raise UserError("--nesterov needs --momentum > 0")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=device.type == "cuda")
    if name == "rmsprop":
        # PyTorch adds eps outside the square root (v / (sqrt(s) + eps)); TensorFlow adds it inside
        # (sqrt(s + eps)). The reference recipes' eps 0.01 was tuned for the PyTorch form.
        return torch.optim.RMSprop(groups, lr=lr, alpha=rmsprop_alpha, eps=rmsprop_eps, momentum=momentum)
    raise UserError(f"unknown --optimizer {name!r}; choose sgd or rmsprop")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state, keeping this run's kernel choice (``fused``/``foreach``).

    ``Optimizer.load_state_dict`` takes every group setting from the checkpoint, so a checkpoint
    written on the CPU would switch fused SGD off on CUDA (and one from CUDA would switch it on).
    """
    kernels = [{key: group[key] for key in ("fused", "foreach") if key in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, kernels):
        group.update(kept)
