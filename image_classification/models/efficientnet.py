"""EfficientNet B0-B7 and WideSE B0-B7.

Module names follow the reference (``stem.conv``, ``layers.{s}.block{b}.{expand,depsep,se,proj}``,
``features.conv``, ``classifier.fc``) so NGC checkpoints load without renaming. torchvision's
``efficientnet_b0``..``b7`` are the same networks under other names; :func:`convert_torchvision`
renames their keys and is registered with :mod:`image_classification.models.weights`.

Two deliberate differences from the reference, both switchable:

* stochastic depth drops whole *samples* by default (``stochastic_depth_mode="row"``, as timm and
  torchvision do); the reference drew one Bernoulli per forward for the whole batch, which is
  ``stochastic_depth_mode="batch"``. Per-sample masks give the same expectation with much lower
  gradient variance, and neither needs a host sync.
* option values are validated when the model is built (UserError instead of odd training).
"""
from __future__ import annotations

import functools
import math
import numbers
import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from image_classification.errors import UserError
from image_classification.models import spec, weights
from image_classification.models.layers import (
    SqueezeExcitation,
    batch_norm,
    check_bool,
    check_conv_init,
    conv2d,
)

FAMILY = "efficientnet"
STOCHASTIC_DEPTH_MODES = ("row", "batch")
OPTIONS = frozenset({"dropout", "survival_prob", "bn_momentum", "bn_epsilon", "conv_init", "trt",
                     "stochastic_depth_mode"})
SE_RATIO = 0.25


# ---------------------------------------------------------------- configuration

@dataclass(frozen=True)
class StageConfig:
    """One stage of MBConv blocks; the first block takes the stride and changes the width."""

    kernel: int
    stride: int
    repeats: int
    expansion: int
    channels: int


# EfficientNet-B0, the base every other variant is scaled from.
BASE_STAGES = (
    StageConfig(kernel=3, stride=1, repeats=1, expansion=1, channels=16),
    StageConfig(kernel=3, stride=2, repeats=2, expansion=6, channels=24),
    StageConfig(kernel=5, stride=2, repeats=2, expansion=6, channels=40),
    StageConfig(kernel=3, stride=2, repeats=3, expansion=6, channels=80),
    StageConfig(kernel=5, stride=1, repeats=3, expansion=6, channels=112),
    StageConfig(kernel=5, stride=2, repeats=4, expansion=6, channels=192),
    StageConfig(kernel=3, stride=1, repeats=1, expansion=6, channels=320),
)
BASE_STEM = 32
BASE_FEATURES = 1280


def scale_width(channels: int, coef: float) -> int:
    """Round ``channels * coef`` to a multiple of 8, never losing more than 10% of it.

    Multiples of 8 keep tensor-core/vector kernels on their fast paths; the 10% guard stops the
    rounding from shrinking small layers too much.
    """
    target = channels * coef
    rounded = max(8, int(target + 4) // 8 * 8)
    if rounded < 0.9 * target:
        rounded += 8
    return rounded


def scale_depth(repeats: int, coef: float) -> int:
    """Compound depth scaling rounds up, so a stage never loses a block."""
    return int(math.ceil(repeats * coef))


@dataclass(frozen=True)
class EfficientNetConfig:
    """Compound-scaling coefficients of one variant, plus its per-variant defaults."""

    width_coef: float
    depth_coef: float
    image_size: int
    dropout: float
    wide_se: bool = False  # SE squeeze width from the expanded (hidden) channels, not the input

    @property
    def stem_channels(self) -> int:
        return scale_width(BASE_STEM, self.width_coef)

    @property
    def feature_channels(self) -> int:
        return scale_width(BASE_FEATURES, self.width_coef)

    def stages(self) -> tuple[StageConfig, ...]:
        return tuple(replace(s, repeats=scale_depth(s.repeats, self.depth_coef),
                             channels=scale_width(s.channels, self.width_coef))
                     for s in BASE_STAGES)


@dataclass(frozen=True)
class BlockOptions:
    """Per-model switches every block needs; bundled to keep constructor signatures short."""

    conv_init: str = "fan_in"
    bn_momentum: float = 0.01
    bn_epsilon: float = 1e-3
    trt: bool = False
    stochastic_depth_mode: str = "row"


# ---------------------------------------------------------------- option validation

def _check_real(flag: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UserError(f"--{flag} must be a number, got {value!r}")
    return float(value)


def check_dropout(value: object) -> float:
    p = _check_real("dropout", value)
    if not 0.0 <= p < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {value!r}")
    return p


def check_survival_prob(value: object) -> float:
    p = _check_real("survival_prob", value)
    if not 0.0 < p <= 1.0:
        raise UserError(f"--survival_prob must be in (0, 1] (1 disables stochastic depth), "
                        f"got {value!r}")
    return p


def check_stochastic_depth_mode(value: object) -> str:
    if value not in STOCHASTIC_DEPTH_MODES:
        raise UserError(f"--stochastic_depth_mode must be one of "
                        f"{', '.join(STOCHASTIC_DEPTH_MODES)}, got {value!r}")
    return str(value)


def _check_bn(momentum: object, epsilon: object) -> tuple[float, float]:
    m = _check_real("bn_momentum", momentum)
    if not 0.0 <= m <= 1.0:
        raise UserError(f"--bn_momentum must be in [0, 1] (torch convention: weight of the new "
                        f"batch statistic; the reference default is 0.01), got {momentum!r}")
    eps = _check_real("bn_epsilon", epsilon)
    if eps <= 0.0:
        raise UserError(f"--bn_epsilon must be positive, got {epsilon!r}")
    return m, eps


def _check_num_classes(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"--num_classes must be a positive integer, got {value!r}")
    return value


# ---------------------------------------------------------------- layers

class StochasticDepth(nn.Module):
    """Drops a residual branch with probability ``1 - survival_prob`` during training.

    Kept branches are scaled by ``1 / survival_prob`` so the expectation equals the input, and
    eval is the identity. ``mode="row"`` draws one Bernoulli per sample; ``mode="batch"`` draws
    one for the whole batch (the reference). The mask is drawn on the input's device and applied
    by multiplication, so there is no host sync and no data-dependent control flow.
    """

    def __init__(self, survival_prob: float, mode: str = "row") -> None:
        super().__init__()
        self.survival_prob = check_survival_prob(survival_prob)
        self.mode = check_stochastic_depth_mode(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.survival_prob == 1.0:
            return x
        shape = (x.shape[0],) + (1,) * (x.dim() - 1) if self.mode == "row" else (1,) * x.dim()
        mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(self.survival_prob)
        return x * mask.div_(self.survival_prob)

    def extra_repr(self) -> str:
        return f"survival_prob={self.survival_prob:.4g}, mode={self.mode}"


def conv_bn(in_ch: int, out_ch: int, kernel_size: int, opts: BlockOptions, stride: int = 1,
            groups: int = 1, activation: bool = True) -> nn.Sequential:
    """conv -> BN [-> SiLU], with children named ``conv``/``bn`` as in the reference."""
    parts: OrderedDict[str, nn.Module] = OrderedDict(
        conv=conv2d(in_ch, out_ch, kernel_size, stride=stride, groups=groups,
                    conv_init=opts.conv_init),
        bn=batch_norm(out_ch, momentum=opts.bn_momentum, eps=opts.bn_epsilon),
    )
    if activation:
        parts["activation"] = nn.SiLU(inplace=True)
    return nn.Sequential(parts)


def se_squeeze_channels(in_ch: int, hidden: int, wide_se: bool) -> int:
    """SE bottleneck: a quarter of the block input (original) or of the hidden width (WideSE)."""
    return max(1, int((hidden if wide_se else in_ch) * SE_RATIO))


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> depthwise kxk -> SE gate -> 1x1 project [+ input].

    The projection has no activation (a linear bottleneck): a ReLU/SiLU on the narrow tensor would
    throw information away. The residual exists only when stride is 1 and the width is unchanged;
    only then does stochastic depth apply.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expansion: int,
                 wide_se: bool, survival_prob: float, opts: BlockOptions) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.expand: nn.Module | None = (
            conv_bn(in_ch, hidden, 1, opts) if expansion != 1 else None
        )
        self.depsep = conv_bn(hidden, hidden, kernel, opts, stride=stride, groups=hidden)
        self.se = SqueezeExcitation(hidden, se_squeeze_channels(in_ch, hidden, wide_se),
                                    activation=nn.SiLU, use_conv=opts.trt)
        self.proj = conv_bn(hidden, out_ch, 1, opts, activation=False)
        self.residual = stride == 1 and in_ch == out_ch
        self.stochastic_depth: nn.Module | None = (
            StochasticDepth(survival_prob, opts.stochastic_depth_mode)
            if self.residual and survival_prob < 1.0 else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.depsep(out)
        out = self.proj(out * self.se(out))
        if not self.residual:
            return out
        if self.stochastic_depth is not None:
            out = self.stochastic_depth(out)
        return x + out


# ---------------------------------------------------------------- model

class EfficientNet(nn.Module):
    """Stem (3x3/2 conv) -> 7 MBConv stages -> 1x1 ``features`` conv -> pool/dropout/``fc``."""

    def __init__(self, config: EfficientNetConfig, num_classes: int = 1000,
                 dropout: float | None = None, survival_prob: float = 1.0,
                 bn_momentum: float = 0.01, bn_epsilon: float = 1e-3, conv_init: str = "fan_in",
                 trt: bool = False, stochastic_depth_mode: str = "row",
                 arch: str | None = None) -> None:
        super().__init__()
        num_classes = _check_num_classes(num_classes)
        dropout = check_dropout(config.dropout if dropout is None else dropout)
        survival_prob = check_survival_prob(survival_prob)
        momentum, epsilon = _check_bn(bn_momentum, bn_epsilon)
        opts = BlockOptions(
            conv_init=check_conv_init(conv_init),
            bn_momentum=momentum,
            bn_epsilon=epsilon,
            trt=check_bool("trt", trt),
            stochastic_depth_mode=check_stochastic_depth_mode(stochastic_depth_mode),
        )
        # Plain attributes (not in the state_dict) so weight loading can name the model in errors.
        self.arch = arch or "efficientnet"
        self.family = FAMILY
        self.stem = conv_bn(3, config.stem_channels, 3, opts, stride=2)
        self.layers, out_ch = _make_stages(config, survival_prob, opts)
        self.features = conv_bn(out_ch, config.feature_channels, 1, opts)
        self.classifier = nn.Sequential(OrderedDict(
            pooling=nn.AdaptiveAvgPool2d(1),
            squeeze=nn.Flatten(),
            dropout=nn.Dropout(dropout),
            fc=nn.Linear(config.feature_channels, num_classes),
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.layers(self.stem(x))))


def block_survival_probs(total_blocks: int, survival_prob: float) -> list[float]:
    """Linear decay over the network depth: block b of N keeps its branch with 1 - (1-p)*b/N.

    Early blocks compute low-level features every later block depends on, so they are dropped
    least. (Non-residual blocks ignore their value: they have no identity path to fall back on.)
    """
    return [1.0 - (1.0 - survival_prob) * b / total_blocks for b in range(total_blocks)]


def _make_stages(config: EfficientNetConfig, survival_prob: float,
                 opts: BlockOptions) -> tuple[nn.Sequential, int]:
    """Build ``layers`` (stages of ``block{b}`` children); return it and its output width."""
    stages = config.stages()
    probs = block_survival_probs(sum(s.repeats for s in stages), survival_prob)
    in_ch, index, built = config.stem_channels, 0, []
    for stage in stages:
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        for b in range(stage.repeats):
            blocks[f"block{b}"] = MBConv(in_ch, stage.channels, stage.kernel,
                                         stage.stride if b == 0 else 1, stage.expansion,
                                         config.wide_se, probs[index], opts)
            in_ch, index = stage.channels, index + 1
        built.append(nn.Sequential(blocks))
    return nn.Sequential(*built), in_ch


# ---------------------------------------------------------------- torchvision weights

# torchvision: features.0 = stem, features.1..7 = stages, features.8 = head conv. A
# Conv2dNormActivation holds conv at ".0." and BN at ".1."; an MBConv's ``block`` is
# [expand], depthwise, SE (fc1, fc2), project.
_TV_BLOCK_RE = re.compile(r"^features\.(\d+)\.(\d+)\.block\.(\d+)\.(.+)$")
_TV_UNIT_RE = re.compile(
    r"^features\.(\d+)\.([01])\.(weight|bias|running_mean|running_var|num_batches_tracked)$")
_TV_CLASSIFIER_RE = re.compile(r"^classifier\.1\.(.+)$")
_TV_UNIT_PARTS = {"0": "conv", "1": "bn"}
_TV_SE_PARTS = {"fc1": "squeeze", "fc2": "expand"}


def convert_torchvision(state_dict: weights.StateDict, target_keys: set[str]) -> weights.StateDict:
    """Rename a torchvision ``efficientnet_b0``..``b7`` state dict to this module's names.

    Anything else (NGC files, our own checkpoints) is returned unchanged; a key the mapping does
    not understand keeps its name so the strict load reports it.
    """
    if ("features.0.0.weight" not in state_dict or "classifier.1.weight" not in state_dict
            or "stem.conv.weight" not in target_keys):
        return state_dict
    head = max(int(m.group(1)) for k in state_dict if (m := _TV_UNIT_RE.match(k)))
    expands = _blocks_with_expand(state_dict)
    out = {_torchvision_name(k, head, expands) or k: v for k, v in state_dict.items()}
    return out if len(out) == len(state_dict) else state_dict


def _blocks_with_expand(state_dict: weights.StateDict) -> set[tuple[int, int]]:
    """(stage, block) pairs whose ``block`` has 4 parts: an expand conv before the depthwise."""
    parts: dict[tuple[int, int], set[int]] = {}
    for key in state_dict:
        if m := _TV_BLOCK_RE.match(key):
            parts.setdefault((int(m.group(1)), int(m.group(2))), set()).add(int(m.group(3)))
    return {blk for blk, seen in parts.items() if len(seen) == 4}


def _torchvision_name(key: str, head: int, expands: set[tuple[int, int]]) -> str | None:
    if m := _TV_CLASSIFIER_RE.match(key):
        return f"classifier.fc.{m.group(1)}"
    if m := _TV_BLOCK_RE.match(key):
        stage, block, part, rest = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
        names = ("expand", "depsep", "se", "proj") if (stage, block) in expands else (
            "depsep", "se", "proj")
        if part >= len(names):
            return None
        sub, _, leaf = rest.partition(".")
        inner = _TV_SE_PARTS.get(sub) if names[part] == "se" else _TV_UNIT_PARTS.get(sub)
        return f"layers.{stage - 1}.block{block}.{names[part]}.{inner}.{leaf}" if inner else None
    if m := _TV_UNIT_RE.match(key):
        unit = {0: "stem", head: "features"}.get(int(m.group(1)))
        return f"{unit}.{_TV_UNIT_PARTS[m.group(2)]}.{m.group(3)}" if unit else None
    return None


# ---------------------------------------------------------------- registry

CONFIGS: dict[str, EfficientNetConfig] = {
    "b0": EfficientNetConfig(1.0, 1.0, 224, 0.2),
    "b1": EfficientNetConfig(1.0, 1.1, 240, 0.2),
    "b2": EfficientNetConfig(1.1, 1.2, 260, 0.3),
    "b3": EfficientNetConfig(1.2, 1.4, 300, 0.3),
    "b4": EfficientNetConfig(1.4, 1.8, 380, 0.4),
    "b5": EfficientNetConfig(1.6, 2.2, 456, 0.4),
    "b6": EfficientNetConfig(1.8, 2.6, 528, 0.5),
    "b7": EfficientNetConfig(2.0, 3.1, 600, 0.5),
}
# Only the B4 variants were trained with stochastic depth by the reference.
_SURVIVAL_PROB = {"b4": 0.8}
_HUB_VARIANTS = ("b0", "b4")


def _defaults(config: EfficientNetConfig, variant: str) -> dict[str, Any]:
    return {"dropout": config.dropout, "survival_prob": _SURVIVAL_PROB.get(variant, 1.0),
            "bn_momentum": 0.01, "bn_epsilon": 1e-3, "conv_init": "fan_in", "trt": False,
            "stochastic_depth_mode": "row"}


def _register_all() -> None:
    for wide_se, prefix, hub_prefix in ((False, "efficientnet-", "nvidia_efficientnet_"),
                                        (True, "efficientnet-widese-",
                                         "nvidia_efficientnet_widese_")):
        for variant, base in CONFIGS.items():
            config = replace(base, wide_se=wide_se)
            name = prefix + variant
            spec.register(spec.ModelSpec(
                name=name,
                family=FAMILY,
                builder=functools.partial(EfficientNet, config, arch=name),
                default_image_size=config.image_size,
                options=OPTIONS,
                defaults=_defaults(config, variant),
                hub_name=hub_prefix + variant if variant in _HUB_VARIANTS else None,
            ))
    for variant, config in CONFIGS.items():  # the reference's QAT archs: B0-B7 that imply --quantize
        name = "efficientnet-quant-" + variant
        spec.register(spec.ModelSpec(
            name=name, family=FAMILY, builder=functools.partial(EfficientNet, config, arch=name),
            default_image_size=config.image_size, options=OPTIONS, defaults=_defaults(config, variant),
            quantized=True))


_register_all()
weights.register_converter(FAMILY, convert_torchvision)
