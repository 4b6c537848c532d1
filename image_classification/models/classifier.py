"""Which part of a model is its classifier: the head that fine-tuning replaces and trains apart.

Found by a plain module walk rather than a per-family table: the classifier is the model's last
``nn.Linear`` in registration order (ResNet ``fc``, EfficientNet ``classifier.fc``; SE layers are
Linear too but come earlier). A model may name it itself with a ``classifier_name`` attribute
(timm's ``default_cfg["classifier"]`` plays this role there).
"""
from __future__ import annotations

from torch import nn

from image_classification.errors import UserError


def classifier_name(model: nn.Module) -> str:
    """The qualified name of ``model``'s classifier module, e.g. ``"fc"`` or ``"classifier.fc"``."""
    named = getattr(model, "classifier_name", None)
    if isinstance(named, str):
        return named
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise UserError(f"{type(model).__name__} has no Linear classifier to fine-tune")
    return linear[-1]


def in_classifier(key: str, head: str) -> bool:
    """Whether state-dict or parameter name ``key`` belongs to the classifier ``head``."""
    return key.startswith(head + ".")


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(classifier parameters, backbone parameters): every parameter of ``model`` in one of them."""
    head = classifier_name(model)
    classifier, backbone = [], []
    for name, parameter in model.named_parameters():
        (classifier if in_classifier(name, head) else backbone).append(parameter)
    return classifier, backbone
