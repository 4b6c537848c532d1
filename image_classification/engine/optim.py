"""Optimizers with the reference's no-weight-decay rule for normalisation layers (and biases, for
the large-batch optimizers)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from image_classification.engine.layerwise import Lamb, Lars
from image_classification.errors import UserError
from image_classification.models import classifier

# Decided by module type, not by parameter name: the reference matched the substring "bn", which
# missed ResNet's `downsample.1` BatchNorm and would catch any parameter that happens to contain "bn".
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def parameter_groups(model: nn.Module, weight_decay: float, bn_weight_decay: bool,
                     exclude_biases: bool = False, backbone_lr_scale: float = 1.0) -> list[dict]:
    """Pairs of groups: the parameters with weight decay, then the excluded ones (normalisation
    layers, and with ``exclude_biases`` every other module's ``bias``; decay 0 unless
    ``bn_weight_decay``). One pair for the whole model; with a ``backbone_lr_scale`` other than 1
    (fine-tuning), one pair for the classifier, then one for the rest, whose groups carry
    ``lr_scale`` (the LR schedule multiplies it in: ``engine/schedules.py``)."""
    if backbone_lr_scale == 1.0:
        parts = [(None, None)]
    else:
        head, backbone = classifier.split_parameters(model)
        parts = [(1.0, {id(p) for p in head}), (backbone_lr_scale, {id(p) for p in backbone})]
    groups = []
    for scale, members in parts:
        excluded, other_params = [], []
        for module in model.modules():
            for name, parameter in module.named_parameters(recurse=False):
                if parameter.requires_grad and (members is None or id(parameter) in members):
                    skip = isinstance(module, NORM_LAYERS) or (exclude_biases and name == "bias")
                    (excluded if skip else other_params).append(parameter)
        norm_decay = weight_decay if bn_weight_decay else 0.0
        pair = [{"params": other_params, "weight_decay": weight_decay},
                {"params": excluded, "weight_decay": norm_decay}]
        if scale is not None:
            for group in pair:
                group["lr_scale"] = scale
        groups += pair
    return groups


#: The optimizers for large batches: BatchNorm *and bias* parameters are excluded from weight decay
#: and (LARS, LAMB) from the trust ratio, as the MLPerf reference's skip list and the LAMB paper do.
LARGE_BATCH_OPTIMIZERS = ("lars", "lamb", "adamw")
OPTIMIZERS = ("sgd", "rmsprop", *LARGE_BATCH_OPTIMIZERS)
#: --optimizer-eps when not given: MLPerf's TF2 LARS passes 0, which Keras replaces by its 1e-7;
#: the LAMB paper / NVLAMB 1e-6; PyTorch's AdamW 1e-8.
DEFAULT_EPS = {"lars": 1e-7, "lamb": 1e-6, "adamw": 1e-8}


@dataclass(frozen=True)
class OptimizerOptions:
    """``--optimizer`` and the settings it reads (the LR comes from the run's :class:`Batching`)."""
    name: str
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    bn_weight_decay: bool = False
    rmsprop_alpha: float = 0.9
    rmsprop_eps: float = 1e-3
    trust_coefficient: float = 0.001
    trust_clip: bool = False
    betas: Sequence[float] = (0.9, 0.999)
    eps: float | None = None
    max_grad_norm: float = 0.0
    backbone_lr_scale: float = 1.0


def build_optimizer(model: nn.Module, options: OptimizerOptions, *, lr: float,
                    device: torch.device = torch.device("cpu")) -> torch.optim.Optimizer:
    """The optimizer for ``model``, whose parameters are on ``device``.

    On CUDA, SGD and AdamW use PyTorch's fused kernels: a fused optimizer unscales and skips
    inf/NaN steps itself, so ``GradScaler.step`` does not read ``found_inf`` back to the host every
    step (it does for any other optimizer). PyTorch 2.14 has no fused RMSprop, so fp16 AMP with
    RMSprop, LARS or LAMB keeps that one sync per optimizer step (bf16 AMP needs no GradScaler,
    hence no sync).
    """
    if options.name not in OPTIMIZERS:
        raise UserError(f"unknown --optimizer {options.name!r}; choose from {', '.join(OPTIMIZERS)}")
    layerwise = options.name in LARGE_BATCH_OPTIMIZERS
    groups = parameter_groups(model, options.weight_decay, options.bn_weight_decay, exclude_biases=layerwise,
                              backbone_lr_scale=options.backbone_lr_scale)
    for group in groups:
        group.setdefault("lr", lr * group.get("lr_scale", 1.0))
    eps = DEFAULT_EPS.get(options.name) if options.eps is None else options.eps
    fused = device.type == "cuda"
    if options.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=options.momentum, nesterov=options.nesterov, fused=fused)
    if options.name == "rmsprop":
        # PyTorch adds eps outside the square root (v / (sqrt(s) + eps)); TensorFlow adds it inside
        # (sqrt(s + eps)). The reference recipes' eps 0.01 was tuned for the PyTorch form.
        return torch.optim.RMSprop(groups, lr=lr, alpha=options.rmsprop_alpha, eps=options.rmsprop_eps,
                                   momentum=options.momentum)
    if options.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(options.betas), eps=eps, fused=fused)
    for group in groups[1::2]:
        group["adapt"] = options.bn_weight_decay  # excluded from decay = excluded from the trust ratio
    if options.name == "lars":
        return Lars(groups, lr=lr, momentum=options.momentum, trust_coefficient=options.trust_coefficient, eps=eps,
                    nesterov=options.nesterov, trust_clip=options.trust_clip)
    return Lamb(groups, lr=lr, betas=tuple(options.betas), eps=eps, max_grad_norm=options.max_grad_norm,
                trust_clip=options.trust_clip)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state, keeping this run's kernel choice (``fused``/``foreach``).

    ``Optimizer.load_state_dict`` takes every group setting from the checkpoint, so a checkpoint
    written on the CPU would switch fused SGD off on CUDA (and one from CUDA would switch it on).
    """
    kernels = [{key: group[key] for key in ("fused", "foreach") if key in group} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except ValueError:  # parameter groups of another optimizer (e.g. biases excluded by lars, not by sgd)
        raise UserError(f"the checkpoint's optimizer state does not fit --optimizer "
                        f"{type(optimizer).__name__.lower()}; resume with the optimizer it was trained with") from None
    for group, kept in zip(optimizer.param_groups, kernels):
        group.update(kept)
