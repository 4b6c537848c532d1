"""ResNet v1.5 family: ResNet-18..152, ResNeXt50-32x4d, ResNeXt101-32x4d/-32x8d, SE-ResNeXt101-32x4d.

v1.5 differs from the original ResNet in one place: a downsampling bottleneck puts its stride on
the 3x3 conv instead of the first 1x1, which costs a little speed and gains ~0.5% top-1.
Module names follow the reference (``layers.{stage}.{block}...``, SE at ``squeeze.squeeze`` /
``squeeze.expand``) so NGC checkpoints load without renaming; torchvision checkpoints only need
``layerN`` -> ``layers.(N-1)``, done by :mod:`image_classification.models.weights`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from image_classification.errors import UserError
from image_classification.models import spec
from image_classification.models.layers import (
    SqueezeExcitation,
    batch_norm,
    check_bool,
    check_conv_init,
    conv2d,
)

FAMILY = "resnet"
SE_HIDDEN = 16  # absolute width, not C/16: the NGC SE-ResNeXt weights are shaped for it
OPTIONS = frozenset({"last_bn_0_init", "conv_init", "trt", "fused_se"})
DEFAULTS = {"last_bn_0_init": False, "conv_init": "fan_in", "trt": False, "fused_se": True}
# -c/--model-config CONF: presets of the init options, as the reference's config table had them
# (all four use ReLU; none zero-inits the last BN of a block).
INIT_PRESETS: dict[str, dict[str, Any]] = {
    "classic": {"conv_init": "fan_out", "last_bn_0_init": False},
    "fanin": {"conv_init": "fan_in", "last_bn_0_init": False},
    "grp-fanin": {"conv_init": "fan_in", "last_bn_0_init": False},
    "grp-fanout": {"conv_init": "fan_out", "last_bn_0_init": False},
}


@dataclass(frozen=True)
class ResNetConfig:
    """Shape of one architecture; widths are the per-stage inner (pre-expansion) widths."""

    bottleneck: bool
    depths: tuple[int, int, int, int]
    widths: tuple[int, int, int, int]
    expansion: int
    groups: int = 1
    squeeze_excitation: bool = False
    stem_width: int = 64


@dataclass(frozen=True)
class BlockOptions:
    """Per-model switches every block needs; bundled to keep constructor signatures short."""

    conv_init: str = "fan_in"
    last_bn_0_init: bool = False
    trt: bool = False
    fused_se: bool = True


class _ResidualBlock(nn.Module):
    """Shared tail of both block types: optional SE gate, shortcut add, ReLU."""

    def _make_tail(self, in_ch: int, out_ch: int, stride: int, se: bool,
                   opts: BlockOptions) -> None:
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                conv2d(in_ch, out_ch, 1, stride=stride, conv_init=opts.conv_init),
                batch_norm(out_ch),
            )
        self.squeeze: nn.Module | None = (
            SqueezeExcitation(out_ch, SE_HIDDEN, use_conv=opts.trt) if se else None
        )
        self.fused_se = opts.fused_se

    def _finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        if self.squeeze is None:
            out = out + residual
        elif self.fused_se:
            out = torch.addcmul(residual, out, self.squeeze(out))
        else:
            out = out * self.squeeze(out) + residual
        return self.relu(out)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs (ResNet-18/34); the first one takes the stride."""

    def __init__(self, in_ch: int, width: int, expansion: int, stride: int, groups: int,
                 se: bool, opts: BlockOptions) -> None:
        super().__init__()
        out_ch = width * expansion
        self.conv1 = conv2d(in_ch, width, 3, stride=stride, groups=groups, conv_init=opts.conv_init)
        self.bn1 = batch_norm(width)
        self.conv2 = conv2d(width, out_ch, 3, conv_init=opts.conv_init)
        self.bn2 = batch_norm(out_ch, zero_init=opts.last_bn_0_init)
        self._make_tail(in_ch, out_ch, stride, se, opts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self._finish(out, x)


class Bottleneck(_ResidualBlock):
    """1x1 reduce -> 3x3 (grouped, strided: the v1.5 change) -> 1x1 expand."""

    def __init__(self, in_ch: int, width: int, expansion: int, stride: int, groups: int,
                 se: bool, opts: BlockOptions) -> None:
        super().__init__()
        out_ch = width * expansion
        self.conv1 = conv2d(in_ch, width, 1, conv_init=opts.conv_init)
        self.bn1 = batch_norm(width)
        self.conv2 = conv2d(width, width, 3, stride=stride, groups=groups, conv_init=opts.conv_init)
        self.bn2 = batch_norm(width)
        self.conv3 = conv2d(width, out_ch, 1, conv_init=opts.conv_init)
        self.bn3 = batch_norm(out_ch, zero_init=opts.last_bn_0_init)
        self._make_tail(in_ch, out_ch, stride, se, opts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self._finish(out, x)


class ResNet(nn.Module):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) -> 4 stages -> global average pool -> fc."""

    def __init__(self, config: ResNetConfig, num_classes: int = 1000, last_bn_0_init: bool = False,
                 conv_init: str = "fan_in", trt: bool = False, fused_se: bool = True,
                 arch: str | None = None) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise UserError(f"--num_classes must be a positive integer, got {num_classes!r}")
        opts = BlockOptions(
            conv_init=check_conv_init(conv_init),
            last_bn_0_init=check_bool("last_bn_0_init", last_bn_0_init),
            trt=check_bool("trt", trt),
            fused_se=check_bool("fused_se", fused_se),
        )
        # Plain attributes (not in the state_dict) so weight loading can name the model in errors.
        self.arch = arch or "resnet"
        self.family = FAMILY
        self.conv1 = conv2d(3, config.stem_width, 7, stride=2, conv_init=opts.conv_init)
        self.bn1 = batch_norm(config.stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layers, out_ch = _make_stages(config, opts)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(out_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _make_stages(config: ResNetConfig, opts: BlockOptions) -> tuple[nn.Sequential, int]:
    """Build ``layers`` (a Sequential of per-stage Sequentials); return it and its out channels."""
    block = Bottleneck if config.bottleneck else BasicBlock
    in_ch = config.stem_width
    stages = []
    for index, (depth, width) in enumerate(zip(config.depths, config.widths)):
        blocks = []
        for b in range(depth):
            stride = 2 if index > 0 and b == 0 else 1
            blocks.append(block(in_ch, width, config.expansion, stride, config.groups,
                                config.squeeze_excitation, opts))
            in_ch = width * config.expansion
        stages.append(nn.Sequential(*blocks))
    return nn.Sequential(*stages), in_ch


_BASIC_WIDTHS = (64, 128, 256, 512)
_RESNEXT_WIDTHS = (128, 256, 512, 1024)  # 32 groups x 4 channels in the first stage
_RESNEXT_8D_WIDTHS = (256, 512, 1024, 2048)  # 32 groups x 8 channels

CONFIGS: dict[str, tuple[ResNetConfig, str | None]] = {
    "resnet18": (ResNetConfig(False, (2, 2, 2, 2), _BASIC_WIDTHS, 1), None),
    "resnet34": (ResNetConfig(False, (3, 4, 6, 3), _BASIC_WIDTHS, 1), None),
    "resnet50": (ResNetConfig(True, (3, 4, 6, 3), _BASIC_WIDTHS, 4), "nvidia_resnet50"),
    "resnet101": (ResNetConfig(True, (3, 4, 23, 3), _BASIC_WIDTHS, 4), None),
    "resnet152": (ResNetConfig(True, (3, 8, 36, 3), _BASIC_WIDTHS, 4), None),
    "resnext50-32x4d": (ResNetConfig(True, (3, 4, 6, 3), _RESNEXT_WIDTHS, 2, groups=32), None),
    "resnext101-32x4d": (
        ResNetConfig(True, (3, 4, 23, 3), _RESNEXT_WIDTHS, 2, groups=32),
        "nvidia_resnext101_32x4d",
    ),
    "resnext101-32x8d": (ResNetConfig(True, (3, 4, 23, 3), _RESNEXT_8D_WIDTHS, 1, groups=32), None),
    "se-resnext101-32x4d": (
        ResNetConfig(True, (3, 4, 23, 3), _RESNEXT_WIDTHS, 2, groups=32, squeeze_excitation=True),
        "nvidia_se_resnext101_32x4d",
    ),
}


def _register_all() -> None:
    for name, (config, hub_name) in CONFIGS.items():
        spec.register(spec.ModelSpec(
            name=name,
            family=FAMILY,
            builder=functools.partial(ResNet, config, arch=name),
            default_image_size=224,
            options=OPTIONS,
            defaults=dict(DEFAULTS),
            hub_name=hub_name,
        ))
    # The reference README's --help lists it, but neither the reference's code (any version), nor
    # torchvision, timm or the ResNeXt paper defines it: refuse rather than guess an architecture.
    spec.register_unavailable(
        "resnext101-32x8d-basic",
        "listed in the reference README's --help, but no public source defines it (not the reference's "
        "code, torchvision, timm or the ResNeXt paper); nearest: resnext101-32x8d (same depth, 32 groups "
        "of 8 channels, bottleneck blocks), resnext101-32x4d, resnet34 (basic blocks)")


_register_all()
