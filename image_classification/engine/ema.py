"""Exponential moving average of the model weights (``--use-ema DECAY``).

Hand-written rather than ``torch.optim.swa_utils.AveragedModel`` because the reference's warmup
rule ``decay_t = min(decay, (1 + t) / (10 + t))`` needs the step count on the host (no device
sync), BN buffers are averaged too, and the checkpoint must keep the model's own key names
(``state_dict_ema``) so an EMA state dict loads into a plain model.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def effective_decay(decay: float, step: int) -> float:
    """The decay used for update number ``step`` (0-based)."""
    return min(decay, (1 + step) / (10 + step))


class ModelEma:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self._pairs = self._tensor_pairs(model)

    def _tensor_pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # Every floating-point entry of the state dict (weights and BN running statistics);
        # integer buffers such as num_batches_tracked are copied, not averaged.
        ema_state, model_state = self.module.state_dict(), model.state_dict()
        keys = [k for k, v in ema_state.items() if v.is_floating_point()]
        return [ema_state[k] for k in keys], [model_state[k] for k in keys]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - effective_decay(self.decay, self.updates)
        ema_tensors, model_tensors = self._pairs
        torch._foreach_lerp_(ema_tensors, model_tensors, weight)  # ema += (1-decay) * (model - ema)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()
