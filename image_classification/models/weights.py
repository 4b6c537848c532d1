"""Loading state dicts into models, shared by every family.

Reading a file is :func:`image_classification.checkpoints.contents.read_weights`' job (the wrapper
entries of the reference's and torchvision's files are picked out there). Here: the names of DDP
(``module.``) and torch.compile (``_orig_mod.``) are unwrapped, key renames that depend on the target
model live in :func:`adapt_state_dict`, and :func:`load_state_dict_into` loads strictly.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import torch
from torch import nn

from image_classification.errors import UserError
from image_classification.models import classifier

StateDict = dict[str, torch.Tensor]
# fn(state_dict, target_keys) -> converted state dict, or the input unchanged if it does not apply.
Converter = Callable[[StateDict, set[str]], StateDict]

_CONVERTERS: dict[str, list[Converter]] = {}

_PREFIXES = ("module.", "_orig_mod.")
_LAYER_RE = re.compile(r"^layer(\d+)\.")
_SE_SUFFIXES = ("squeeze.weight", "expand.weight")


def register_converter(family: str, fn: Converter) -> Converter:
    """Add a key converter for a model family (e.g. torchvision EfficientNet -> ours).

    Converters run in registration order after the generic ``layerN`` rename and before the SE
    reshape. They must return every entry they were given (renamed or not): dropping keys would
    hide a mismatch that the strict load is there to report.
    """
    _CONVERTERS.setdefault(family, []).append(fn)
    return fn


def unregister_converter(family: str, fn: Converter) -> None:
    """Remove a converter :func:`register_converter` added (a plugin's or a test's)."""
    _CONVERTERS[family].remove(fn)


# ---------------------------------------------------------------- names

def strip_prefixes(state_dict: Mapping[str, object], path: str) -> StateDict:
    """Drop leading ``module.`` (DDP) and ``_orig_mod.`` (torch.compile), in any nesting."""
    out: StateDict = {}
    for name, tensor in state_dict.items():
        new = name
        while new.startswith(_PREFIXES):
            new = new.split(".", 1)[1]
        if new in out:
            raise UserError(f"weights file {path} has key {new!r} twice (with and without a "
                            f"module./_orig_mod. prefix)")
        out[new] = tensor  # type: ignore[assignment]
    return out


def _first_sentence(exc: BaseException) -> str:
    text = str(exc).strip().split(". ")[0].splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------- matching a model

def adapt_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                     family: str | None = None) -> StateDict:
    """Rename/reshape keys so a file from NGC, torchvision or ourselves fits ``model``.

    Rules, in order: ``layerN.`` -> ``layers.(N-1).`` (NGC 20.06 files and torchvision ResNets),
    the family's registered converters, then SE squeeze/expand weights reshaped between Linear
    ``[out, in]`` and 1x1 conv ``[out, in, 1, 1]`` to whatever the model uses. A key is renamed
    only when the new name exists in the model and the old one does not; nothing is dropped.
    """
    target = model.state_dict()
    target_keys = set(target)
    out = _rename_layers(dict(state_dict), target_keys)
    for converter in _CONVERTERS.get(family or getattr(model, "family", ""), []):
        converted = converter(out, target_keys)
        if len(converted) != len(out):
            raise ValueError(f"weight converter {converter.__name__} changed the number of "
                             f"entries ({len(out)} -> {len(converted)}); "
                             f"converters must not drop keys")
        out = dict(converted)
    return _reshape_se(out, target)


def _rename_layers(state_dict: StateDict, target_keys: set[str]) -> StateDict:
    out: StateDict = {}
    for name, tensor in state_dict.items():
        new = name
        match = _LAYER_RE.match(name)
        if match and name not in target_keys and int(match.group(1)) >= 1:
            candidate = f"layers.{int(match.group(1)) - 1}.{name[match.end():]}"
            if candidate in target_keys:
                new = candidate
        out[new] = tensor
    return out


def _reshape_se(state_dict: StateDict, target: Mapping[str, torch.Tensor]) -> StateDict:
    out: StateDict = {}
    for name, tensor in state_dict.items():
        want = target.get(name)
        if (want is not None and name.endswith(_SE_SUFFIXES) and want.shape != tensor.shape
                and want.numel() == tensor.numel() and {tensor.dim(), want.dim()} == {2, 4}):
            tensor = tensor.reshape(want.shape)
        out[name] = tensor
    return out


# ---------------------------------------------------------------- loading

def load_state_dict_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str,
                         family: str | None = None, arch: str | None = None,
                         new_classifier: bool = False) -> str | None:
    """Adapt ``state_dict`` (NGC / torchvision / ours) to ``model`` and load it strictly.

    ``new_classifier`` (fine-tuning): when the classifier is the only part that does not fit (another
    number of classes, or a file without one), every other weight loads and the model keeps its own
    freshly initialised classifier; the returned line says what was left out. Anything else that
    does not fit is still one UserError naming the layer. Returns None when everything loaded.
    """
    state_dict = adapt_state_dict(strip_prefixes(state_dict, source), model, family)
    arch = arch or getattr(model, "arch", None) or type(model).__name__
    target = model.state_dict()
    note = None
    if new_classifier:
        state_dict, note = _replace_classifier(state_dict, target, classifier.classifier_name(model), source)
    problem = describe_mismatch(state_dict, target)
    if problem:
        raise UserError(f"weights in {source} do not fit --arch {arch}: {problem}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # anything the key/shape check above did not foresee
        raise UserError(f"weights in {source} do not fit --arch {arch}: "
                        f"{_first_sentence(exc)}") from None
    return note


def _replace_classifier(state_dict: StateDict, target: Mapping[str, torch.Tensor], head: str,
                        source: str) -> tuple[StateDict, str | None]:
    """The file's weights with the model's own classifier in place of the file's, when the
    classifier differs (whatever else differs is then left for the strict check to name)."""
    differs = ([k for k in target if k not in state_dict] + [k for k in state_dict if k not in target]
               + [k for k in target if k in state_dict and state_dict[k].shape != target[k].shape])
    if not any(classifier.in_classifier(k, head) for k in differs):
        return state_dict, None
    dropped = [k for k in state_dict if classifier.in_classifier(k, head)]
    kept = {k: v for k, v in state_dict.items() if not classifier.in_classifier(k, head)}
    kept.update({k: v for k, v in target.items() if classifier.in_classifier(k, head)})
    classes = target.get(f"{head}.weight")
    wanted = f"new classifier for {classes.shape[0]} classes" if classes is not None else "new classifier"
    if not dropped:
        return kept, f"{source} has no classifier ({head}): {wanted}"
    file_weight = state_dict.get(f"{head}.weight")
    had = f" ({file_weight.shape[0]} classes)" if file_weight is not None and file_weight.dim() == 2 else ""
    return kept, f"{'/'.join(dropped)} from {source}{had} left out: {wanted}"


def describe_mismatch(state_dict: Mapping[str, torch.Tensor],
                      target: Mapping[str, torch.Tensor]) -> str:
    """Summarise missing/unexpected keys and shape mismatches; empty string when they fit."""
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    shapes = [k for k in target if k in state_dict and state_dict[k].shape != target[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        hint = _classes_hint(shapes, state_dict, target)
        more = f" and {len(shapes) - 1} more" if len(shapes) > 1 and not hint else ""
        parts.append(f"shape mismatch at {k}: file {list(state_dict[k].shape)} vs model "
                     f"{list(target[k].shape)}{more}{hint}")
    return ", ".join(parts)


def _classes_hint(shapes: list[str], state_dict: Mapping[str, torch.Tensor],
                  target: Mapping[str, torch.Tensor]) -> str:
    """Suggest --num-classes when the classifier's output size is the only shape that differs."""
    weight = next((k for k in shapes if k.endswith("fc.weight")), None)
    if weight is None or any(k not in (weight, weight[:-len("weight")] + "bias") for k in shapes):
        return ""
    file_shape, model_shape = state_dict[weight].shape, target[weight].shape
    if len(file_shape) == 2 and len(model_shape) == 2 and file_shape[1] == model_shape[1]:
        return f" (use --num-classes {file_shape[0]})"
    return ""
