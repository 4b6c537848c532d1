"""Every rule between ``main.py``'s flags, checked once on the parsed namespace.

:func:`check` runs right after :func:`image_classification.config.parse_args` (``main.py`` and
``launch.py --dry-run``) and raises :class:`~image_classification.errors.UserError` with one line
for the first rule a command line breaks, before anything is loaded or started.

Rules that need what the run finds stay where it is found: the dataset's classes
(``assembly.resolve_classes``, ``settings.topk_for``), the number of processes
(``engine.schedules.accumulation_steps``), the sizes an architecture or ``--onnx`` file gives
(``engine.stages.StageSchedule``, ``assembly.open_onnx_model``), the weights (``assembly``'s
``--quantize`` checks) and the machine (``runtime``, ``cli``).
"""
from __future__ import annotations

import argparse

from image_classification import models
from image_classification.errors import UserError
from image_classification.models.resnet import INIT_PRESETS


def check(args: argparse.Namespace) -> None:
    """Reject flag combinations that cannot work, with one line each."""
    _check_data(args)
    if args.evaluate and args.training_only:
        raise UserError("--evaluate and --training-only exclude each other")
    if args.label_smoothing >= 1:
        raise UserError(f"--label-smoothing must be below 1, got {args.label_smoothing}")
    if args.use_ema is not None and not 0 < args.use_ema < 1:
        raise UserError(f"--use-ema takes a decay in (0, 1), e.g. 0.9999; got {args.use_ema}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0 epochs, got {args.warmup}")
    if args.run_epochs == 0 or args.run_epochs < -1:
        raise UserError("--run-epochs must be a positive number of epochs or -1 (all)")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.static_loss_scale is not None and args.static_loss_scale <= 0:
        raise UserError(f"--static-loss-scale must be positive, got {args.static_loss_scale}")
    if args.auto_resume and args.resume:
        raise UserError("--auto-resume and --resume exclude each other")
    if args.ema_best and args.use_ema is None:
        raise UserError("--ema-best needs --use-ema DECAY")
    if args.pretrained and args.pretrained_from_file:
        raise UserError("--pretrained and --pretrained-from-file exclude each other")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise UserError(f"--crop-scale needs 0 < MIN <= MAX <= 1, got {args.crop_scale[0]} {args.crop_scale[1]}")
    _check_onnx(args)
    if not 0 <= args.randaugment_magnitude <= 30:
        raise UserError(f"--randaugment-magnitude must be in 0..30, got {args.randaugment_magnitude}")
    if args.base_image_size is not None and args.n_stages == 1:
        raise UserError("--base-image-size needs --n-stages 2 or more")
    check_model_preset(args)
    _check_finetune(args)
    _check_large_batch(args)
    if sorted(args.lr_milestones) != args.lr_milestones:
        raise UserError(f"--lr-milestones must be increasing, got {args.lr_milestones}")
    _check_optimizer(args)
    if args.n_stages > args.epochs:
        raise UserError(f"--n-stages {args.n_stages} is more than --epochs {args.epochs}: every stage needs an epoch")
    _check_arch(args)


def check_model_preset(args: argparse.Namespace) -> None:
    """``-c CONF`` presets ResNet model flags: an explicit flag (or a value the run resolved,
    e.g. a resumed run's) must agree with it."""
    conf = getattr(args, "model_config", None)
    for dest, value in (INIT_PRESETS[conf] if conf else {}).items():
        given = getattr(args, dest)
        if given is not None and given != value:
            flag = "--" + dest.replace("_", "-")
            raise UserError(f"-c {conf} means {flag} {str(value).lower()}, but {flag} "
                            f"{str(given).lower()} was given; drop one of them")


def _check_data(args: argparse.Namespace) -> None:
    # DIR is not needed for a split read from --train-shards / --val-shards
    unnamed = [split for split, unused, shards in (("train", args.evaluate, args.train_shards),
                                                   ("val", args.training_only, args.val_shards))
               if not unused and not shards]
    if args.data is None and args.data_backend != "synthetic" and unnamed:
        raise UserError(f"--data-backend {args.data_backend} needs the dataset directory DIR "
                        f"(or --{unnamed[0]}-shards; or use --data-backend synthetic)")
    if args.shard_shuffle_window is not None and args.shard_shuffle_window < 0:
        raise UserError(f"--shard-shuffle-window must be >= 0, got {args.shard_shuffle_window}")


def _check_onnx(args: argparse.Namespace) -> None:
    if args.onnx is not None and not args.evaluate:
        raise UserError("--onnx runs an exported model for evaluation only; add --evaluate")
    if args.onnx is not None and (args.resume or args.pretrained_from_file or args.pretrained or args.quantize):
        raise UserError("--onnx evaluates the exported file as it is; drop --resume/--pretrained-from-file/"
                        "--pretrained/--quantize")


def _check_finetune(args: argparse.Namespace) -> None:
    given = [flag for flag, value in (("--freeze-backbone-epochs", args.freeze_backbone_epochs),
                                      ("--backbone-lr-scale", args.backbone_lr_scale)) if value is not None]
    if not given:
        return
    if args.freeze_backbone_epochs is not None and args.freeze_backbone_epochs < 0:
        raise UserError(f"--freeze-backbone-epochs must be >= 0 epochs, got {args.freeze_backbone_epochs}")
    if args.evaluate:
        raise UserError(f"{given[0]} is for training; drop it with --evaluate")
    if not (args.pretrained or args.pretrained_from_file or args.resume or args.auto_resume):
        raise UserError(f"{given[0]} fine-tunes pretrained weights: give --pretrained-from-file PATH or --pretrained")
    if args.freeze_backbone_epochs and args.jit != "no":
        raise UserError("--freeze-backbone-epochs does not combine with --jit script")


def _check_large_batch(args: argparse.Namespace) -> None:
    if args.lr_scaling is not None and args.lr_base_batch is None:
        raise UserError(f"--lr-scaling {args.lr_scaling} scales a per-batch LR; give --lr-base-batch B with it")
    if not all(0 <= beta < 1 for beta in args.adam_betas):
        raise UserError(f"--adam-betas must be in [0, 1), got {args.adam_betas[0]} {args.adam_betas[1]}")
    if args.eval_offset < 0:
        raise UserError(f"--eval-offset must be >= 0, got {args.eval_offset}")
    if args.target_top1 is not None and not 0 < args.target_top1 <= 100:
        raise UserError(f"--target-top1 is a top-1 accuracy in (0, 100] %, got {args.target_top1}")
    if args.target_top1 is not None and args.training_only:
        raise UserError("--target-top1 needs validation; drop --training-only")


def _check_optimizer(args: argparse.Namespace) -> None:
    """The options that belong to some optimizers only."""
    if args.nesterov and (args.momentum <= 0 or args.optimizer not in ("sgd", "lars")):
        raise UserError("--nesterov needs --optimizer sgd or lars and --momentum > 0")
    if args.max_grad_norm and args.optimizer != "lamb":
        raise UserError("--max-grad-norm clips LAMB's gradients; it needs --optimizer lamb")
    if args.trust_clip and args.optimizer not in ("lars", "lamb"):
        raise UserError("--trust-clip clips the trust ratio of --optimizer lars or lamb")


def _check_arch(args: argparse.Namespace) -> None:
    """The rules that depend on ``--arch``: ``-c`` presets the ResNet family; ``--compile`` needs
    an eager PyTorch model (the *-quant archs train with --quantize)."""
    if args.model_config and models.get(args.arch).family != "resnet":
        raise UserError(f"-c/--model-config presets ResNet initialisation; --arch {args.arch} is an "
                        f"{models.get(args.arch).family} model (set --conv-init instead)")
    if args.compile is None:
        return
    quantize = args.quantize or models.get(args.arch).quantized
    for flag, present in (("--jit script", args.jit != "no"), ("--onnx", args.onnx is not None),
                          ("--quantize", quantize)):
        if present:
            raise UserError(f"--compile does not combine with {flag}")
