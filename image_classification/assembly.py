"""A run's parts, built from its resolved settings (:mod:`image_classification.settings`).

``cli.run`` reads top to bottom and calls these factories: the ``--onnx`` model, the compiler, the
loaders' config and loaders, the model with its initial weights (and INT8 calibration), MixUp/CutMix,
and the training components (optimizer, scaler, DDP, EMA, LR schedule, restored from a checkpoint).
``flags`` is the run's read-only :class:`~image_classification.settings.Flags`.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from image_classification import compiling, preprocessing, quantization, runtime, settings
from image_classification.checkpoints.contents import SavedRun, read_weights
from image_classification.data import registry as data_registry
from image_classification.data.contract import LoaderConfig
from image_classification.data.loaders import priority
from image_classification.deploy import runners
from image_classification.engine import loop, trainer
from image_classification.engine.ema import ModelEma
from image_classification.engine.finetune import FineTune
from image_classification.engine.losses import SmoothedCrossEntropy
from image_classification.engine.optim import OptimizerOptions, build_optimizer
from image_classification.engine.schedules import Batching, build_scheduler
from image_classification.engine.stages import Stage, StagedTraining, StageSchedule
from image_classification.engine.trainer import TrainComponents
from image_classification.errors import UserError
from image_classification.models import catalogue, classifier, weights


def open_onnx_model(args, device: torch.device) -> runners.OnnxModel | None:
    """--onnx: the exported file; its input size and recorded preprocessing become the defaults."""
    if args.onnx is None:
        return None
    model = runners.OnnxModel(args.onnx, device)
    if args.image_size and model.image_size and args.image_size != model.image_size:
        raise UserError(f"{args.onnx} takes {model.image_size} px images, not --image-size {args.image_size}")
    return model


def compiler_for(flags, schedule: StageSchedule) -> compiling.Compiler | None:
    """--compile: the compiler, sized for the shapes this run sees (one training batch shape per
    stage size, plus the validation batch and its last incomplete one)."""
    if flags.compile is None:
        return None
    sizes = {stage.image_size for stage in schedule.stages}
    frozen_phase = 1 if flags.freeze_backbone_epochs else 0  # another graph: no backward through the backbone
    return compiling.Compiler(flags.compile, shapes=len(sizes) + 2 + frozen_phase)


def loader_config(flags, evaluation: preprocessing.EvalPreprocessing, rt: runtime.Runtime, context,
                   seed: int) -> LoaderConfig:
    """The validation loader's config; a training stage's is :func:`stage_loader_config` of it."""
    return LoaderConfig(
        data_dir=flags.data, image_size=evaluation.image_size, val_resize_size=evaluation.resize_size,
        interpolation=evaluation.interpolation, mean=evaluation.mean, std=evaluation.std,
        batch_size=flags.batch_size, workers=flags.workers, prefetch=flags.prefetch,
        augmentation=flags.augmentation, memory_format=rt.memory_format, device=rt.device, rank=context.rank,
        world_size=context.world_size, seed=seed, num_classes=flags.num_classes,
        synthetic_epoch_size=flags.synthetic_epoch_size, crop_scale=tuple(flags.crop_scale),
        randaugment_num_ops=flags.randaugment_num_ops, randaugment_magnitude=flags.randaugment_magnitude,
        idle_priority=priority.background(flags.loader_priority, rt.device),
        data_format=flags.data_format, train_shards=flags.train_shards, val_shards=flags.val_shards,
        index_dir=flags.data_idx_dir, cache_dir=flags.shard_cache, tfrecord_label_base=flags.tfrecord_label_base,
        shard_window=flags.shard_shuffle_window)


def stage_loader_config(config: LoaderConfig, stage: Stage) -> LoaderConfig:
    return dataclasses.replace(config, image_size=stage.image_size, randaugment_magnitude=stage.randaugment_magnitude)


def build_loaders(flags, config: LoaderConfig, first_stage: Stage):
    backend = data_registry.get(flags.data_backend)
    train_loader = None if flags.evaluate else backend.train_loader(stage_loader_config(config, first_stage))
    val_loader = None if flags.training_only else backend.val_loader(config)
    return train_loader, val_loader


def resolve_classes(flags, loader) -> tuple[int, list[str]]:
    found = loader.num_classes
    if flags.num_classes is not None and flags.num_classes != found and flags.data_backend != "synthetic":
        raise UserError(f"--num-classes {flags.num_classes} but the dataset has {found} classes")
    if (flags.mixup > 0 or flags.cutmix > 0) and found < 2:
        raise UserError(f"--mixup/--cutmix need at least 2 classes; the dataset has {found}")
    return found, list(loader.class_names)


def build_model(flags, spec, onnx_model, resume: SavedRun | None, rt: runtime.Runtime, num_classes: int,
                schedule: StageSchedule, train_loader,
                published: catalogue.Entry | None = None) -> tuple[nn.Module, str | None]:
    """The --onnx file, or the architecture with its initial weights on the device (INT8-calibrated
    with --quantize); and the line saying what of the weights was left out (a new classifier), if any.
    ``published``: the catalogue entry --pretrained names."""
    if onnx_model is not None:
        onnx_model.check_classes(num_classes)
        return onnx_model, None
    model = spec.build(num_classes=num_classes, **settings.model_options(flags))
    model, note = _load_initial_weights(model, flags, spec, resume, published)
    model = model.to(rt.device, memory_format=rt.memory_format)
    if not flags.evaluate:
        _check_batch_norm_batch(model, flags.batch_size, schedule.smallest_size)
    return _quantize(model, flags, train_loader), note


def _load_initial_weights(model: nn.Module, flags, spec, resume: SavedRun | None,
                          published: catalogue.Entry | None) -> tuple[nn.Module, str | None]:
    """Fill ``model`` from --resume, --pretrained-from-file or --pretrained; a QAT checkpoint
    first gets its quantizers back (their ranges are part of its state dict).

    Pretrained weights may come from a dataset with other classes (fine-tuning): everything but
    the classifier must fit, and the model keeps its own new classifier (the returned line says
    so). Not for a QAT checkpoint, whose classifier's quantizer ranges would be left uncalibrated,
    nor for --resume, which continues a run exactly.
    """
    note = None
    if resume is not None:
        if resume.arch is not None and resume.arch != flags.arch:
            raise UserError(f"{flags.resume} was trained with --arch {resume.arch}, not --arch {flags.arch}")
        model = quantization.restore(model, resume.quantizers)
        weights.load_state_dict_into(model, resume.weights(), source=flags.resume, arch=flags.arch)
    elif flags.pretrained_from_file:
        file = read_weights(flags.pretrained_from_file)
        model = quantization.restore(model, file.quantizers)
        note = weights.load_state_dict_into(model, file.state_dict, source=flags.pretrained_from_file,
                                            family=spec.family, arch=flags.arch,
                                            new_classifier=not quantization.is_quantized(model))
    elif published is not None:
        path = catalogue.fetch(published)
        note = weights.load_state_dict_into(model, read_weights(path).state_dict, source=published.name,
                                            family=spec.family, arch=flags.arch, new_classifier=True)
    return model, note


def _check_batch_norm_batch(model: nn.Module, batch_size: int, image_size: int) -> None:
    """BatchNorm in training needs more than one value per channel: one image per batch has one
    where the last feature map is 1x1 (ResNets and EfficientNets at 32 px). Turn PyTorch's
    ValueError at the first step into a one-line error now, with a forward pass on the meta device
    (shapes only, no compute)."""
    if batch_size > 1 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    probe = copy.deepcopy(model).to("meta").train()
    try:
        probe(torch.empty(1, 3, image_size, image_size, device="meta"))
    except ValueError as error:
        if "Expected more than 1 value per channel" in str(error):
            raise UserError(f"-b 1 at --image-size {image_size} leaves BatchNorm one value per channel to normalise "
                            "(the last feature map is 1x1); use -b 2 or more, or a larger --image-size") from None
        raise


def _quantize(model: nn.Module, flags, train_loader) -> nn.Module:
    """--quantize: calibrate INT8 fake quantizers on training batches, unless the weights came
    quantized already (a QAT checkpoint)."""
    if not flags.quantize or quantization.is_quantized(model):
        return model
    if not (flags.pretrained_from_file or flags.pretrained):
        raise UserError("--quantize fine-tunes a trained model: give its weights with --pretrained-from-file "
                        "(or --resume a QAT checkpoint)")
    if train_loader is None:
        raise UserError("--quantize calibrates on the training set, which --evaluate does not load; evaluate a "
                        "QAT checkpoint instead (--resume or --pretrained-from-file of a quant_main.py checkpoint)")
    if flags.jit != "no":
        raise UserError("--quantize does not support --jit script (the fake quantizers are not scriptable)")
    train_loader.set_epoch(0)
    return quantization.calibrate(model, train_loader, flags.calib_batches)


def ema_from_checkpoint(model: nn.Module, resume: SavedRun) -> nn.Module:
    ema_model = copy.deepcopy(model)
    weights.load_state_dict_into(ema_model, resume.weights(ema=True), source="state_dict_ema of the checkpoint")
    return ema_model


def batch_transform(mixup: float, cutmix: float, num_classes: int):
    """MixUp and/or CutMix on device batches (torchvision v2); labels become soft targets."""
    from torchvision.transforms import v2
    mixers = []
    if mixup > 0:
        mixers.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        mixers.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def optimizer_options(flags) -> OptimizerOptions:
    """``--optimizer`` and its settings, as the optimizer factory takes them."""
    return OptimizerOptions(name=flags.optimizer, momentum=flags.momentum, weight_decay=flags.weight_decay,
                            nesterov=flags.nesterov, bn_weight_decay=flags.bn_weight_decay,
                            rmsprop_alpha=flags.rmsprop_alpha, rmsprop_eps=flags.rmsprop_eps,
                            trust_coefficient=flags.trust_coefficient, trust_clip=flags.trust_clip,
                            betas=flags.adam_betas, eps=flags.optimizer_eps, max_grad_norm=flags.max_grad_norm,
                            backbone_lr_scale=flags.backbone_lr_scale)


def training_parts(flags, model, staged: StagedTraining, rt, context, resume, batching: Batching,
                    compiler: compiling.Compiler | None, hooks: trainer.Hooks) -> tuple[TrainComponents, loop.RunState]:
    """Optimizer, loss scaler, the DDP-wrapped (and compiled) model, EMA and LR schedule, restored
    from ``resume`` when given; and where training starts."""
    steps = batching.accumulation_steps
    optimizer = build_optimizer(model, optimizer_options(flags), lr=batching.lr, device=rt.device)
    loader = staged(0).loader  # every stage splits an epoch the same way
    loader.set_epoch(0)
    steps_per_epoch = -(-len(loader) // steps)
    scaler = rt.grad_scaler(flags.static_loss_scale, flags.dynamic_loss_scale)
    module = torch.jit.script(model) if flags.jit == "script" else model

    def wrap(plain: nn.Module) -> nn.Module:
        wrapped = _wrap_distributed(plain, rt.device, context)
        # the DDP-wrapped model, so Dynamo splits the graph at DDP's buckets
        return compiler(wrapped) if compiler is not None else wrapped
    # DDP broadcasts rank 0's weights when it wraps the model; the EMA copy is taken after that,
    # or every rank would average from its own random initialisation.
    wrapped = wrap(module)
    finetune = (FineTune(flags.freeze_backbone_epochs, classifier.classifier_name(model), wrap)
                if flags.freeze_backbone_epochs or flags.backbone_lr_scale != 1.0 else None)
    ema = ModelEma(model, flags.use_ema) if flags.use_ema else None
    state = loop.RunState()
    if resume is not None:
        state = resume.restore(optimizer=optimizer, scaler=scaler, ema=ema, rank=context.rank,
                               world_size=context.world_size, local_rank=context.local_rank)
    # The schedule position is derived from where the epoch stands, not stored: a resume with
    # another split (processes, -b) takes the steps the rest of its epoch needs, so that the epoch
    # still ends where the schedule's next epoch begins.
    start_step = state.epoch * steps_per_epoch
    if state.progress.started:
        loader.set_epoch(state.epoch, state.progress)
        state.progress = loader.progress_after(0)  # in positions (an older file said batches)
        start_step = (state.epoch + 1) * steps_per_epoch - -(-len(loader) // steps)
    scheduler = build_scheduler(optimizer, steps_per_epoch=steps_per_epoch, granularity=flags.lr_granularity,
                                base=batching.lr, start_step=start_step, policy=flags.lr_schedule,
                                epochs=flags.epochs, warmup=flags.warmup, end_lr=flags.end_lr,
                                milestones=flags.lr_milestones, gamma=flags.lr_gamma, power=flags.lr_poly_power)
    parts = TrainComponents(
        model=wrapped, module=module, optimizer=optimizer,
        scheduler=scheduler, scaler=scaler, criterion=SmoothedCrossEntropy(flags.label_smoothing), runtime=rt,
        accumulation_steps=steps, ema=ema, world_size=context.world_size, compiler=compiler, hooks=hooks,
        finetune=finetune)
    return parts, state


def _wrap_distributed(model: nn.Module, device: torch.device, context) -> nn.Module:
    if not context.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
