"""A run's settings, resolved once and then read-only.

``main.py``'s flags leave many values to be decided (sizes and interpolation from the architecture
or an ``--onnx`` file's record, ``--base-image-size`` from the stage count, ``--auto-resume``'s
checkpoint, the retention a resumed run keeps, ``--workers`` from the usable cores, ``--topk`` from
the classes). :func:`resolve` decides all of them in one place and returns :class:`Flags`: the
parsed namespace with those values filled in, frozen. The raport's PARAMETER record and the checkpoint's ``config`` are
``vars(flags)``, so they hold what the run used; nothing later can change a setting behind them.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping

from image_classification import config, flag_rules, machine, preprocessing
from image_classification.errors import UserError
from image_classification.models.resnet import INIT_PRESETS
from image_classification.preprocessing import EvalPreprocessing


class Flags(argparse.Namespace):
    """The resolved flags: attribute reads as on ``argparse.Namespace``, no writes."""

    def __init__(self, values: Mapping[str, Any]):
        super().__init__()
        self.__dict__.update(values)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"settings are resolved once (image_classification.settings): {name} is read-only")

    def replace(self, **changes: Any) -> Flags:
        return Flags({**vars(self), **changes})


@dataclass(frozen=True)
class Resolved:
    flags: Flags
    evaluation: EvalPreprocessing   # validation (and checkpoint/export) preprocessing: crop, resize, interpolation,
                                    # mean, std


def resolve(args: argparse.Namespace, *, default_image_size: int, saved: EvalPreprocessing | None = None,
            saved_image_size: int | None = None, quantized_arch: bool = False,
            interpolations: Collection[str] | None = None, resume: str | None = None,
            resume_config: Mapping[str, Any] | None = None,
            resume_finetune: Mapping[str, Any] | None = None,
            model_defaults: Mapping[str, Any] | None = None) -> Resolved:
    """Every setting the flags leave open, decided once.

    ``saved``/``saved_image_size``: an ``--onnx`` file's preprocessing record and input size;
    ``default_image_size``: the architecture's; ``interpolations``: what the data backend can do;
    ``resume``: the checkpoint this run resumes (:func:`resume_path`), ``resume_config`` its
    ``config`` (a resumed run keeps its retention), ``resume_finetune`` its fine-tuning record (a resumed
    run keeps its --freeze-backbone-epochs and --backbone-lr-scale unless they are given again);
    ``model_defaults``: model options the pretrained weights need (a catalogue entry's), used for
    model flags not given (a resumed run's own values first), so the checkpoint's config records them.

    Sizes: :func:`image_classification.preprocessing.resolve` decides, first at the training size
    (``--val-resize-size`` is the resize for ``--image-size``), then at ``--eval-image-size``, whose
    resize keeps the ratio.
    """
    default_size = saved_image_size or default_image_size
    trained = preprocessing.resolve(saved, default_size, image_size=args.image_size, resize_size=args.val_resize_size,
                                    interpolation=args.interpolation, interpolations=interpolations)
    evaluation = preprocessing.resolve(trained, default_size, image_size=args.eval_image_size)
    base_image_size = args.base_image_size or (max(1, trained.image_size // 2) if args.n_stages > 1
                                               else trained.image_size)
    gather = args.gather_checkpoints
    if gather is None:  # a resumed run keeps the retention it was started with
        gather = int((resume_config or {}).get("gather_checkpoints") or 0)
    finetune = {key: (getattr(args, key) if getattr(args, key) is not None
                      else (resume_finetune or {}).get(key, default))
                for key, default in (("freeze_backbone_epochs", 0), ("backbone_lr_scale", 1.0))}
    saved_options = {key: value for key, value in (resume_config or {}).items()
                     if key in config.MODEL_OPTION_DESTS and value is not None}
    model_options = {key: getattr(args, key) if getattr(args, key) is not None
                     else saved_options.get(key, (model_defaults or {}).get(key))
                     for key in config.MODEL_OPTION_DESTS}
    flags = Flags({**vars(args), **finetune, **model_options, "workers": loader_workers(args.workers),
                   "quantize": args.quantize or quantized_arch,
                   "image_size": trained.image_size, "base_image_size": base_image_size,
                   "eval_image_size": evaluation.image_size, "val_resize_size": evaluation.resize_size,
                   "interpolation": evaluation.interpolation, "gather_checkpoints": gather, "resume": resume})
    return Resolved(flags, evaluation)


def resume_path(args: argparse.Namespace) -> str | None:
    """The checkpoint to resume: ``--resume``, or with ``--auto-resume`` the workspace's own when it exists."""
    if args.auto_resume and (Path(args.workspace) / args.checkpoint_filename).is_file():
        return str(Path(args.workspace) / args.checkpoint_filename)
    return args.resume


def for_dataset(flags: Flags, num_classes: int) -> Flags:
    """``--topk`` once the classes are known (as given, else ``min(5, classes)``)."""
    return flags.replace(topk=topk_for(flags.topk, num_classes, "the dataset"))


def topk_for(requested: int | None, num_classes: int, owner: str) -> int:
    """``--topk`` as given, else ``min(5, classes)``: a 2-class model shows both classes rather
    than failing or reporting a meaningless top-5. ``owner`` names whose classes, in the error."""
    if requested is None:
        return min(config.DEFAULT_TOPK, num_classes)
    if requested > num_classes:
        raise UserError(f"--topk {requested} is more than {owner}'s {num_classes} classes")
    return requested


def loader_workers(requested: int | None) -> int:
    """``--workers`` as given, else the reference's 5, or fewer where this process's share of the
    usable cores (its affinity mask, divided among the node's training processes) is smaller: more
    workers than cores only compete with each other and the model (and PyTorch warns every run)."""
    return requested if requested is not None else min(5, machine.cores_per_process())


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The model flags that are set, with ``-c CONF``'s preset filled in (which they must agree with)."""
    flag_rules.check_model_preset(args)
    options = {dest: getattr(args, dest) for dest in config.MODEL_OPTION_DESTS if getattr(args, dest) is not None}
    conf = getattr(args, "model_config", None)
    return {**(INIT_PRESETS[conf] if conf else {}), **options}
