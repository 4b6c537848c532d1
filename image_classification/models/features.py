"""A classifier's stages as a backbone: the feature maps a detection or segmentation head needs.

    from image_classification.models import backbone
    net = backbone("resnet50", weights="resnet50:IMAGENET1K_V2")    # or a weights file / checkpoint
    maps = net(images)                  # [N, 256, H/4, W/4], [N, 512, H/8, W/8], ... (a list)
    net.feature_info                    # [FeatureInfo(index=0, module='layers.0', channels=256, stride=4), ...]

Built with torchvision's ``create_feature_extractor`` (torch.fx) rather than a second, hand-written
copy of each network: the graph is the classifier's own forward, cut after the last stage asked
for, so the maps are exactly the classifier's activations (tested with forward hooks) and the
classifier's weight loading (files, checkpoints, the catalogue) applies unchanged. The feature
points are the outputs of the stages in ``model.layers`` (ResNet: 4 stages at strides 4, 8, 16, 32;
EfficientNet: 7 stages at strides 2, 4, 8, 16, 16, 32, 32). ``out_indices`` picks stages; the
default is the last stage of each stride (all 4 for ResNet, stages 0, 1, 2, 4, 6 for EfficientNet),
as timm's ``features_only=True`` does. torchvision's ``IntermediateLayerGetter`` needs the stages
as direct children of the model, which ours (``layers.N``) are not.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from image_classification.errors import UserError

#: Input side of the shape probe (meta device: no compute); every stride here divides it.
_PROBE_SIZE = 64


@dataclass(frozen=True)
class FeatureInfo:
    index: int        # the stage's position in model.layers
    module: str       # the stage's module name in the classifier, e.g. "layers.2"
    channels: int
    stride: int       # input pixels per feature-map pixel


class Backbone(nn.Module):
    """``forward(images)`` returns the list of feature maps described by :attr:`feature_info`.

    ``arch`` and ``preprocessing`` (the weights' evaluation preprocessing, when known) say what it
    was built from."""

    def __init__(self, body: nn.Module, feature_info: list[FeatureInfo], arch: str, preprocessing=None):
        super().__init__()
        self.body = body
        self.feature_info = feature_info
        self.arch = arch
        self.preprocessing = preprocessing

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.body(x)
        return [maps[info.module] for info in self.feature_info]

    @property
    def channels(self) -> list[int]:
        return [info.channels for info in self.feature_info]

    @property
    def strides(self) -> list[int]:
        return [info.stride for info in self.feature_info]


def stage_names(model: nn.Module) -> list[str]:
    stages = getattr(model, "layers", None)
    if not isinstance(stages, nn.Sequential):
        raise UserError(f"{getattr(model, 'arch', type(model).__name__)} has no stages (model.layers) to take "
                        "feature maps from")
    return [f"layers.{index}" for index in range(len(stages))]


def feature_extractor(model: nn.Module, modules: Sequence[str]) -> nn.Module:
    """``model``'s forward cut after ``modules``, returning ``{name: output}`` (torch.fx)."""
    from torchvision.models.feature_extraction import create_feature_extractor
    from image_classification.models.efficientnet import StochasticDepth
    # StochasticDepth draws its mask from the input's runtime shape, which symbolic tracing cannot
    # follow: it stays a module call in the graph (train and eval graphs alike).
    return create_feature_extractor(model, return_nodes=list(modules),
                                    tracer_kwargs={"leaf_modules": [StochasticDepth]})


def describe(model: nn.Module) -> list[FeatureInfo]:
    """Channels and stride of every stage output, from a forward pass on the meta device."""
    names = stage_names(model)
    probe = copy.deepcopy(feature_extractor(model, names)).to("meta").eval()
    with torch.no_grad():
        maps = probe(torch.empty(1, 3, _PROBE_SIZE, _PROBE_SIZE, device="meta"))
    return [FeatureInfo(index, name, maps[name].shape[1], _PROBE_SIZE // maps[name].shape[-1])
            for index, name in enumerate(names)]


def default_indices(info: list[FeatureInfo]) -> tuple[int, ...]:
    """The last stage of each stride (timm's ``features_only`` choice)."""
    return tuple(i for i, item in enumerate(info) if i == len(info) - 1 or info[i + 1].stride != item.stride)


def from_model(model: nn.Module, out_indices: Sequence[int] | None = None, preprocessing=None) -> Backbone:
    """A :class:`Backbone` over an already built (and loaded) classifier ``model``."""
    info = describe(model)
    indices = default_indices(info) if out_indices is None else tuple(out_indices)
    wrong = [i for i in indices if not isinstance(i, int) or not 0 <= i < len(info)]
    if wrong or not indices or len(set(indices)) != len(indices):
        raise UserError(f"out_indices {list(indices)}: give distinct stage indices in 0..{len(info) - 1} "
                        f"({', '.join(f'{i.index}: stride {i.stride}' for i in info)})")
    chosen = [info[i] for i in indices]
    body = feature_extractor(model, [item.module for item in chosen])
    body.train(model.training)
    return Backbone(body, chosen, getattr(model, "arch", type(model).__name__), preprocessing)


def backbone(arch: str, weights: str | None = None, out_indices: Sequence[int] | None = None, *,
             ema: bool = False, **options: Any) -> Backbone:
    """``arch``'s stages as a backbone (eval mode, CPU), with the weights a classifier of it loads:
    a weights file or training checkpoint (``ema``: its EMA weights), a catalogue name such as
    ``"resnet50:IMAGENET1K_V2"`` (downloaded once into torch.hub's cache, hash-checked), or None
    for a random initialisation. ``options`` are model options (``bn_epsilon``, ...)."""
    from image_classification.deploy import loading
    loaded = loading.load_source(arch, weights, ema=ema, options=options)
    return from_model(loaded.model, out_indices, loaded.preprocessing)
