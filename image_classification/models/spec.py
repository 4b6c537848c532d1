"""The architectures' store: what a :class:`ModelSpec` is, and registering one.

The family modules (``resnet``, ``efficientnet``) register into it when imported; looking an
architecture up (:mod:`.registry`, which imports the families on first use) is kept apart so
that the families never import the module that imports them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from image_classification.errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    builder: Callable[..., nn.Module]
    default_image_size: int
    # Keyword arguments `builder` accepts, besides num_classes; used to validate model flags.
    options: frozenset[str] = frozenset()
    # Per-architecture defaults for those options (e.g. dropout 0.2 for B0, 0.4 for B4).
    defaults: dict[str, Any] = field(default_factory=dict)
    # Name used by the reference's torch.hub entry point, e.g. "nvidia_resnet50".
    hub_name: str | None = None
    # The reference's QAT names (efficientnet-quant-b0 ...): the same network, trained with --quantize.
    quantized: bool = False

    def build(self, num_classes: int = 1000, **options: Any) -> nn.Module:
        unknown = set(options) - self.options
        if unknown:
            raise UserError(
                f"--arch {self.name} does not take model option(s) {', '.join(sorted(unknown))}; "
                f"it takes: {', '.join(sorted(self.options)) or 'none'}"
            )
        kwargs = {**self.defaults, **{k: v for k, v in options.items() if v is not None}}
        return self.builder(num_classes=num_classes, **kwargs)


_REGISTRY: dict[str, ModelSpec] = {}
# Names users may type (e.g. from the reference README) that no architecture here stands for:
# name -> why not, and what to use instead.
_UNAVAILABLE: dict[str, str] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove the architecture registered as ``name`` (a plugin's or a test's)."""
    del _REGISTRY[name]


def register_unavailable(name: str, reason: str) -> None:
    """Make ``--arch name`` a one-line error carrying ``reason`` instead of "unknown --arch"."""
    _UNAVAILABLE[name] = reason
