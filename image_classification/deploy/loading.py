"""A trained model outside the training loop: the model flags, reading the weights file once, and
building the model with what the file knows about it.

:func:`load_model` builds ``--arch`` and fills it from a plain weights file (ours, NGC,
torchvision) or from a training checkpoint (optionally its EMA weights), read once with
``weights_only=True`` (:func:`image_classification.checkpoints.contents.read_weights`). A training
checkpoint also supplies the architecture, the number of classes, the class names and the
evaluation preprocessing it was trained with.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, Collection, Mapping

import torch
from torch import nn

from image_classification import config, models, preprocessing, quantization, settings
from image_classification.checkpoints.contents import ModelRecord, SavedRun, read_weights
from image_classification.errors import UserError
from image_classification.models import weights
from image_classification.models.registry import ModelSpec
from image_classification.preprocessing import EvalPreprocessing


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """main.py's model flags (both spellings), plus ``--weights`` and ``--ema``, worded for tools
    that load a trained model."""
    parser.add_argument("--weights", dest="pretrained_from_file", default=None, metavar="PATH",
                        help="same as --pretrained-from-file")
    parser.add_argument("--ema", action="store_true",
                        help="use the EMA weights (state_dict_ema) of a training checkpoint")
    config.add_model_flags(parser, helps={
        "num_classes": "output classes (default: the checkpoint's, else the classifier size in the "
                       "weights file, else 1000)",
        "pretrained_from_file": "weights file (ours, NGC or torchvision) or training checkpoint",
    })


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode, on the CPU) and what is known about it."""

    model: nn.Module
    spec: ModelSpec
    num_classes: int
    # From a training checkpoint (None for plain weights or random init).
    class_names: list[str] | None = None
    checkpoint: SavedRun | None = None
    # The evaluation preprocessing saved with the model (checkpoint or ONNX metadata), if any.
    preprocessing: EvalPreprocessing | None = None
    # The input size the model is fixed to (an ONNX file's), if any: the default crop.
    input_size: int | None = None

    @property
    def arch(self) -> str:
        return self.spec.name


def resolve_preprocessing(loaded: LoadedModel, *, image_size: int | None = None, resize_size: int | None = None,
                          interpolation: str | None = None,
                          interpolations: Collection[str] | None = None) -> EvalPreprocessing:
    """``preprocessing.resolve`` for ``loaded``: flags, else the model's saved record, else its
    default size (a fixed input size, else the architecture's)."""
    default_size = loaded.input_size or loaded.spec.default_image_size
    return preprocessing.resolve(loaded.preprocessing, default_size, image_size=image_size, resize_size=resize_size,
                                 interpolation=interpolation, interpolations=interpolations)


def infer_num_classes(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The classifier's output size, when the file has exactly one ``...fc.weight`` matrix."""
    found = [t.shape[0] for k, t in state_dict.items() if k.endswith("fc.weight") and t.dim() == 2]
    return found[0] if len(found) == 1 else None


def load_model(arch: str | None, weights_path: str | None = None, *, ema: bool = False,
               num_classes: int | None = None, options: Mapping[str, Any] | None = None,
               state_dict: Mapping[str, torch.Tensor] | None = None, source: str | None = None,
               new_classifier: bool = False) -> LoadedModel:
    """Build ``arch`` (or the checkpoint's arch when ``arch`` is None) and load its weights strictly.

    The number of classes is, in order: ``num_classes``, the checkpoint's, the classifier shape
    in the file, 1000. Model options: ``options``, else those the checkpoint was trained with.
    ``state_dict`` (with ``source`` naming it) replaces ``weights_path`` for weights already in
    memory (torch.hub downloads). ``new_classifier``: weights of another class count load all but
    the classifier (fine-tuning, :func:`image_classification.models.weights.load_state_dict_into`).
    """
    file = None
    if weights_path is not None:
        file = read_weights(weights_path, ema=ema)
        state_dict, source = file.state_dict, weights_path
    elif ema:
        raise UserError("--ema needs a training checkpoint (--pretrained-from-file CKPT)")
    saved = file.checkpoint if file else None
    record = saved.model if saved is not None else ModelRecord(None, None, None)
    if arch is None:
        arch = record.arch or "resnet50"
    elif record.arch and record.arch != arch:
        raise UserError(f"{weights_path} was trained with --arch {record.arch}, not --arch {arch}")
    spec = models.get(arch)
    num_classes = num_classes or record.num_classes or (infer_num_classes(state_dict) if state_dict else None) or 1000
    options = {**record.options, **dict(options or {})}
    model = quantization.restore(spec.build(num_classes=num_classes, **options), file.quantizers if file else None)
    if state_dict is not None:
        note = weights.load_state_dict_into(model, state_dict, source=source or "state dict", family=spec.family,
                                            arch=arch, new_classifier=new_classifier)
        if note:
            print(f"=> {note}", file=sys.stderr)
    model.eval()
    names = record.class_names if record.class_names and len(record.class_names) == num_classes else None
    return LoadedModel(model=model, spec=spec, num_classes=num_classes, class_names=names, checkpoint=saved,
                       preprocessing=saved.preprocessing if saved is not None else None)


def load_source(arch: str | None, source: str | None = None, *, ema: bool = False, num_classes: int | None = None,
                options: Mapping[str, Any] | None = None, new_classifier: bool = False) -> LoadedModel:
    """:func:`load_model` from ``source``: a weights file or training checkpoint, a published
    weights name (``resnet50:IMAGENET1K_V2``, :mod:`image_classification.models.catalogue`), or None
    (random initialisation). A name brings its preprocessing and the model options its weights need."""
    from image_classification.models import catalogue
    if source is None or not catalogue.NAME_PATTERN.match(source) or os.path.exists(source):
        return load_model(arch, source, ema=ema, num_classes=num_classes, options=options,
                          new_classifier=new_classifier)
    return load_published(catalogue.find(source, arch), num_classes=num_classes, options=options, ema=ema,
                          new_classifier=new_classifier)


def load_published(entry, *, num_classes: int | None = None, options: Mapping[str, Any] | None = None,
                   ema: bool = False, new_classifier: bool = False) -> LoadedModel:
    """A catalogue entry's model: its weights downloaded (hash-checked), its model options and its
    evaluation preprocessing (explicit ``options`` win)."""
    from image_classification.models import catalogue
    if ema:
        raise UserError(f"--ema needs a training checkpoint; {entry.name} is a plain weights file")
    loaded = load_model(entry.arch, catalogue.fetch(entry), num_classes=num_classes,
                        options={**entry.model_options(), **dict(options or {})}, new_classifier=new_classifier)
    loaded.preprocessing = entry.preprocessing
    return loaded


def load_from_flags(args: argparse.Namespace, without_weights: str) -> LoadedModel:
    """:func:`load_model` as the flags of :func:`add_model_flags` ask: ``--pretrained-from-file``/
    ``--weights``, or ``--pretrained [NAME]``'s published weights; ``without_weights`` is the warning
    when they name no weights."""
    from image_classification.models import catalogue
    if args.pretrained and args.pretrained_from_file:
        raise UserError("--pretrained and --pretrained-from-file/--weights exclude each other")
    options = settings.model_options(args)
    if args.pretrained:
        return load_published(catalogue.for_flag(args.pretrained, args.arch), num_classes=args.num_classes, options=options, ema=args.ema)
    if args.pretrained_from_file is None:
        print(f"warning: no --weights/--pretrained-from-file/--pretrained given: {without_weights}", file=sys.stderr)
    return load_model(args.arch, args.pretrained_from_file, ema=args.ema, num_classes=args.num_classes,
                      options=options)
