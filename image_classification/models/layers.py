"""Building blocks shared by the model families.

Init lives here so every family follows one rule: convolutions are Kaiming-normal (mode chosen by
``--conv_init``) without bias, BatchNorm starts at gamma=1, beta=0.
"""
from __future__ import annotations

import torch
from torch import nn

from image_classification.errors import UserError

CONV_INIT_MODES = ("fan_in", "fan_out")


def check_conv_init(mode: str) -> str:
    """Reject a bad ``--conv_init`` at build time, with the accepted values in the message."""
    if mode not in CONV_INIT_MODES:
        raise UserError(f"--conv_init must be one of {', '.join(CONV_INIT_MODES)}, got {mode!r}")
    return mode


def conv2d(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1,
           conv_init: str = "fan_in", nonlinearity: str = "relu") -> nn.Conv2d:
    """Bias-free 'same'-padded conv (padding (k-1)//2), Kaiming-normal initialised."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=(kernel_size - 1) // 2,
                     groups=groups, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode=check_conv_init(conv_init), nonlinearity=nonlinearity)
    return conv


def batch_norm(channels: int, zero_init: bool = False, momentum: float = 0.1,
               eps: float = 1e-5) -> nn.BatchNorm2d:
    """BatchNorm with gamma=1 (or 0 for the last BN of a residual branch), beta=0.

    A zero gamma makes the residual branch start as identity, which helps large-batch training.
    """
    bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
    nn.init.constant_(bn.weight, 0.0 if zero_init else 1.0)
    nn.init.zeros_(bn.bias)
    return bn


class SqueezeExcitation(nn.Module):
    """Channel gate: global mean -> squeeze -> act -> expand -> sigmoid.

    Returns the gate (shape [N, C, 1, 1]) rather than the gated tensor, so the caller can fuse the
    multiply with its residual add. ``use_conv`` builds the squeeze/expand as 1x1 convolutions
    (TensorRT-friendly export); the parameters are the Linear ones reshaped to [out, in, 1, 1], so
    the state_dict names are the same either way.
    """

    def __init__(self, channels: int, hidden: int, activation: type[nn.Module] = nn.ReLU,
                 use_conv: bool = False) -> None:
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.squeeze: nn.Module = nn.Conv2d(channels, hidden, 1, bias=True)
            self.expand: nn.Module = nn.Conv2d(hidden, channels, 1, bias=True)
        else:
            self.squeeze = nn.Linear(channels, hidden)
            self.expand = nn.Linear(hidden, channels)
        self.activation = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_conv:
            s = nn.functional.adaptive_avg_pool2d(x, 1)
            return torch.sigmoid(self.expand(self.activation(self.squeeze(s))))
        s = x.mean(dim=(2, 3))
        gate = torch.sigmoid(self.expand(self.activation(self.squeeze(s))))
        return gate[:, :, None, None]


def check_bool(flag: str, value: object) -> bool:
    """Model booleans must be real booleans: the string "False" is truthy (reference defect 6)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise UserError(f"--{flag} must be true or false, got {value!r}")
