"""``main.py``: parse flags, build the runtime, data, model and engine, then train or evaluate."""
from __future__ import annotations

import copy
import dataclasses
import random
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from image_classification import (checkpoint, compiling, config, distributed, models, precision,
                                  preprocessing, quantization, runtime, settings)
from image_classification.data import priority
from image_classification.data import registry as data_registry
from image_classification.data.registry import LoaderConfig
from image_classification.deploy import loading, runners
from image_classification.engine import loop, trainer
from image_classification.engine.ema import ModelEma
from image_classification.engine.losses import SmoothedCrossEntropy
from image_classification.engine.optim import build_optimizer
from image_classification.engine.schedules import Batching, build_scheduler, scaled_lr
from image_classification.engine.stages import Stage, StagedTraining, StageSchedule
from image_classification.engine.trainer import TrainComponents
from image_classification.errors import UserError, exit_status
from image_classification.models import weights
from image_classification.reporting.reporter import Reporter


def main(argv: Sequence[str] | None = None, defaults: dict[str, Any] | None = None,
         hooks: trainer.Hooks | None = None) -> int:
    """Entry point; returns the exit status. User errors print one line and return 2. ``hooks``:
    callbacks on the training loop (:class:`~image_classification.engine.trainer.Hooks`)."""
    def parse_and_run() -> int:
        args = config.parse_args(argv, defaults)
        config.validate(args)
        return run(args, hooks)
    try:
        return exit_status(parse_and_run)
    finally:
        distributed.shutdown()


def run(args, hooks: trainer.Hooks | None = None) -> int:
    """One run, top to bottom: runtime, settings (resolved once), data, model, then evaluate or train."""
    context = distributed.context_from_env()
    rt = _start_runtime(args, context)
    seed = _shared_seed(args.seed, rt.device)
    runtime.seed_everything(seed + context.rank)
    spec = models.get(args.arch)
    if args.model_config and spec.family != "resnet":
        raise UserError(f"-c/--model-config presets ResNet initialisation; --arch {args.arch} is an "
                        f"{spec.family} model (set --conv-init instead)")
    onnx_model = _onnx_model(args, rt.device)
    resume_from = settings.resume_path(args)
    resume = checkpoint.load(resume_from) if resume_from else None
    resolved = settings.resolve(
        args, default_image_size=spec.default_image_size, quantized_arch=spec.quantized,
        saved=onnx_model.preprocessing if onnx_model else None, saved_image_size=onnx_model and onnx_model.image_size,
        interpolations=data_registry.get(args.data_backend).interpolations, resume=resume_from,
        resume_config=(resume or {}).get("config"))
    flags, evaluation = resolved.flags, resolved.evaluation
    schedule = StageSchedule(n_stages=flags.n_stages, epochs=flags.epochs, base_size=flags.base_image_size,
                             final_size=flags.image_size, mixup=flags.mixup, cutmix=flags.cutmix,
                             randaugment_magnitude=flags.randaugment_magnitude)
    _check_known_kernel_bugs(rt, min(schedule.smallest_size, flags.eval_image_size))
    compiler = _compiler(flags, schedule)
    loader_config = _loader_config(flags, evaluation, rt, context, seed)
    train_loader, val_loader = _build_loaders(flags, loader_config, schedule.stages[0])
    num_classes, class_names = _resolve_classes(flags, train_loader or val_loader)
    flags = settings.for_dataset(flags, num_classes)
    model = _build_model(flags, spec, onnx_model, resume, rt, num_classes, schedule, train_loader)

    if context.is_main:
        checkpoint.check_workspace(flags.workspace)
    reporter = _reporter(flags, context.is_main, train_loader, val_loader)
    batching = None if flags.evaluate else _batching(flags, context.world_size)
    try:
        _show_runtime_notes(rt, reporter, context.is_main)
        reporter.log("PARAMETER", {**vars(flags), "seed": seed, "num_classes": num_classes,
                                   "world_size": context.world_size, "device": str(rt.device),
                                   "precision": rt.precision_name,
                                   "memory_format_used": precision.format_name(rt.memory_format),
                                   **_resume_marker(flags, resume), **(batching.record() if batching else {})})
        if flags.evaluate:
            return _evaluate(flags, model, val_loader, rt, resume, reporter, compiler)
        staged = StagedTraining(
            schedule, first=train_loader,
            build_loader=lambda stage: data_registry.get(flags.data_backend).train_loader(
                _stage_loader_config(loader_config, stage)),
            build_mixer=lambda stage: _batch_transform(stage.mixup, stage.cutmix, num_classes))
        del train_loader  # `staged` owns it now and lets it go (its workers too) when stage 0 ends
        reporter.message(batching.describe())
        return _train(flags, model, staged, val_loader, rt, context, resume, reporter, batching,
                      evaluation=evaluation, class_names=class_names, seed=seed, compiler=compiler,
                      hooks=hooks or trainer.Hooks())
    finally:
        reporter.close()


def _start_runtime(args, context: distributed.DistributedContext) -> runtime.Runtime:
    """CPU affinity (before the CUDA context exists: its threads and the loaders' inherit it), the
    device, the precision and memory format, then the process group."""
    if args.gpu_affinity != "none" and runtime.uses_cuda(args.device):
        from image_classification.affinity import set_affinity
        bus_id = runtime.pci_bus_id(runtime.cuda_index(context.local_rank))
        if bus_id is None:
            raise UserError(f"--gpu-affinity needs a torch that reports PCI bus ids (torch {torch.__version__} "
                            "does not); use --gpu-affinity none")
        set_affinity(bus_id, args.gpu_affinity)
    device = runtime.select_device(args.device, context.local_rank)
    rt = runtime.build_runtime(device=device, amp=args.amp, amp_dtype=args.amp_dtype,
                               memory_format=args.memory_format, tf32=args.tf32,
                               path="infer" if args.evaluate else "train")
    distributed.init(context, device)
    if args.static_loss_scale not in (None, 1.0) and not rt.uses_grad_scaler:
        print("warning: --static-loss-scale only applies to fp16 AMP (--amp on CUDA, or --amp-dtype float16); "
              "ignored", file=sys.stderr)
    return rt


def _build_model(flags, spec, onnx_model, resume: dict | None, rt: runtime.Runtime, num_classes: int,
                 schedule: StageSchedule, train_loader) -> nn.Module:
    """The --onnx file, or the architecture with its initial weights on the device (INT8-calibrated
    with --quantize)."""
    if onnx_model is not None:
        onnx_model.check_classes(num_classes)
        return onnx_model
    model = spec.build(num_classes=num_classes, **config.model_options(flags))
    model = _load_initial_weights(model, flags, spec, resume)
    model = model.to(rt.device, memory_format=rt.memory_format)
    if not flags.evaluate:
        _check_batch_norm_batch(model, flags.batch_size, schedule.smallest_size)
    return _quantize(model, flags, train_loader)


def _reporter(flags, is_main: bool, train_loader, val_loader) -> Reporter:
    """The raport (and TensorBoard) writer; its first lines say what data was found."""
    reporter = Reporter(str(Path(flags.workspace) / flags.raport_file), enabled=is_main, topk=flags.topk,
                        tensorboard_dir=str(Path(flags.workspace) / flags.tensorboard) if flags.tensorboard else None,
                        steps_per_epoch=len(train_loader) if train_loader is not None else None)
    for loader in (train_loader, val_loader):
        if loader is not None and loader.description:
            reporter.message(loader.description)
    return reporter


def _show_runtime_notes(rt: runtime.Runtime, reporter: Reporter, is_main: bool) -> None:
    """Why this precision (one line naming the CPU feature), and forced emulated bf16 (stderr)."""
    for note in rt.notes:
        reporter.message(note)
    for warning in rt.warnings if is_main else ():
        print(warning, file=sys.stderr)


def _compiler(args, schedule: StageSchedule) -> compiling.Compiler | None:
    """--compile: the compiler, sized for the shapes this run sees (one training batch shape per
    stage size, plus the validation batch and its last incomplete one)."""
    if args.compile is None:
        return None
    for flag, present in (("--jit script", args.jit != "no"), ("--onnx", args.onnx is not None),
                          ("--quantize", args.quantize)):
        if present:
            raise UserError(f"--compile does not combine with {flag}")
    sizes = {stage.image_size for stage in schedule.stages}
    return compiling.Compiler(args.compile, shapes=len(sizes) + 2)


def _onnx_model(args, device: torch.device) -> runners.OnnxModel | None:
    """--onnx: the exported file; its input size and recorded preprocessing become the defaults."""
    if args.onnx is None:
        return None
    model = runners.OnnxModel(args.onnx, device)
    if args.image_size and model.image_size and args.image_size != model.image_size:
        raise UserError(f"{args.onnx} takes {model.image_size} px images, not --image-size {args.image_size}")
    return model


def _resume_marker(args, resume: dict | None) -> dict:
    """Where a resumed training run continues: the raport is appended to, and this tells readers
    (``image_classification.plot``) that epochs from ``resume_epoch`` on are logged again."""
    if resume is None or args.evaluate:
        return {}
    return {"resume_epoch": int(resume["epoch"]), "resume_step": int(resume.get("step_in_epoch", 0))}


def _check_known_kernel_bugs(rt: runtime.Runtime, image_size: int) -> None:
    """Refuse a combination known to give silently wrong results rather than train on garbage.

    torch 2.14 on CPU: a bf16 3x3 stride-2 convolution over a 1x1 feature map (what the last stage
    of a 32x-downsampling network sees at <= 16 px) returns a weight gradient of garbage (values
    ~1e27) from its second call on. tests/test_main.py keeps a check that fails once PyTorch fixes it.
    """
    if rt.device.type == "cpu" and rt.amp_dtype == torch.bfloat16 and image_size <= 16:
        raise UserError(f"image size {image_size} with --amp on the CPU hits a PyTorch bug (garbage "
                        "gradients of bf16 stride-2 convolutions on 1x1 feature maps); use --image-size (and "
                        "--base-image-size, --eval-image-size) 17 or more, or leave out --amp")


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


def _shared_seed(seed: int | None, device: torch.device) -> int:
    """The user's seed, or a random one chosen by rank 0: every rank must shuffle identically."""
    if seed is not None:
        return seed
    value = torch.tensor([random.SystemRandom().randrange(2**31)], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.broadcast(value, src=0)
    return int(value.item())


def _loader_config(args, evaluation: preprocessing.EvalPreprocessing, rt: runtime.Runtime, context,
                   seed: int) -> LoaderConfig:
    """The validation loader's config; a training stage's is :func:`_stage_loader_config` of it."""
    return LoaderConfig(
        data_dir=args.data, image_size=evaluation.image_size, val_resize_size=evaluation.resize_size,
        interpolation=evaluation.interpolation, mean=evaluation.mean, std=evaluation.std,
        batch_size=args.batch_size, workers=args.workers, prefetch=args.prefetch,
        augmentation=args.augmentation, memory_format=rt.memory_format, device=rt.device, rank=context.rank,
        world_size=context.world_size, seed=seed, num_classes=args.num_classes,
        synthetic_epoch_size=args.synthetic_epoch_size, crop_scale=tuple(args.crop_scale),
        randaugment_num_ops=args.randaugment_num_ops, randaugment_magnitude=args.randaugment_magnitude,
        idle_priority=priority.background(args.loader_priority, rt.device),
        data_format=args.data_format, train_shards=args.train_shards, val_shards=args.val_shards,
        index_dir=args.data_idx_dir, cache_dir=args.shard_cache, tfrecord_label_base=args.tfrecord_label_base,
        shard_window=args.shard_shuffle_window)


def _stage_loader_config(config: LoaderConfig, stage: Stage) -> LoaderConfig:
    return dataclasses.replace(config, image_size=stage.image_size, randaugment_magnitude=stage.randaugment_magnitude)


def _build_loaders(args, config: LoaderConfig, first_stage: Stage):
    backend = data_registry.get(args.data_backend)
    train_loader = None if args.evaluate else backend.train_loader(_stage_loader_config(config, first_stage))
    val_loader = None if args.training_only else backend.val_loader(config)
    return train_loader, val_loader


def _resolve_classes(args, loader) -> tuple[int, list[str]]:
    found = loader.num_classes
    if args.num_classes is not None and args.num_classes != found and args.data_backend != "synthetic":
        raise UserError(f"--num-classes {args.num_classes} but the dataset has {found} classes")
    if (args.mixup > 0 or args.cutmix > 0) and found < 2:
        raise UserError(f"--mixup/--cutmix need at least 2 classes; the dataset has {found}")
    return found, list(loader.class_names)


def _load_initial_weights(model: nn.Module, args, spec, resume: dict | None) -> nn.Module:
    """Fill ``model`` from --resume, --pretrained-from-file or --pretrained; a QAT checkpoint
    first gets its quantizers back (their ranges are part of its state dict)."""
    if resume is not None:
        if resume.get("arch", args.arch) != args.arch:
            raise UserError(f"{args.resume} was trained with --arch {resume['arch']}, not --arch {args.arch}")
        model = quantization.restore(model, resume)
        weights.load_state_dict_into(model, resume["state_dict"], source=args.resume, arch=args.arch)
    elif args.pretrained_from_file:
        file = loading.read_weights(args.pretrained_from_file)
        model = quantization.restore(model, file.checkpoint)
        weights.load_state_dict_into(model, file.state_dict, source=args.pretrained_from_file,
                                     family=spec.family, arch=args.arch)
    elif args.pretrained:
        from image_classification.models.published import download_weights
        weights.load_pretrained(model, download_weights(args.arch), family=spec.family, arch=args.arch)
    return model


def _quantize(model: nn.Module, args, train_loader) -> nn.Module:
    """--quantize: calibrate INT8 fake quantizers on training batches, unless the weights came
    quantized already (a QAT checkpoint)."""
    if not args.quantize or quantization.is_quantized(model):
        return model
    if not (args.pretrained_from_file or args.pretrained):
        raise UserError("--quantize fine-tunes a trained model: give its weights with --pretrained-from-file "
                        "(or --resume a QAT checkpoint)")
    if train_loader is None:
        raise UserError("--quantize calibrates on the training set, which --evaluate does not load; evaluate a "
                        "QAT checkpoint instead (--resume or --pretrained-from-file of a quant_main.py checkpoint)")
    if args.jit != "no":
        raise UserError("--quantize does not support --jit script (the fake quantizers are not scriptable)")
    train_loader.set_epoch(0)
    return quantization.calibrate(model, train_loader, args.calib_batches)


def _evaluate(args, model, val_loader, rt, resume, reporter, compiler: compiling.Compiler | None) -> int:
    criterion = SmoothedCrossEntropy(args.label_smoothing)
    compiled = compiling.view(compiler)
    metrics = trainer.validate(compiled(model), val_loader, runtime=rt, criterion=criterion, topk=args.topk,
                               prof=args.prof, print_freq=args.print_freq, log=reporter.log,
                               progress=reporter.progress, compiler=compiler)
    if resume is not None and resume.get("state_dict_ema") is not None:
        ema_model = _ema_from_checkpoint(model, resume)
        metrics.update(trainer.validate(compiled(ema_model), val_loader, runtime=rt, criterion=criterion,
                                        topk=args.topk, prefix="val_ema", prof=args.prof, progress=reporter.progress,
                                        compiler=compiler))
    reporter.log([], metrics)
    return 0


def _ema_from_checkpoint(model: nn.Module, resume: dict) -> nn.Module:
    ema_model = copy.deepcopy(model)
    weights.load_state_dict_into(ema_model, resume["state_dict_ema"], source="state_dict_ema of the checkpoint")
    return ema_model


def _batching(args, world_size: int) -> Batching:
    """The global batch and the LR it gets (``--lr-base-batch``), decided once for the run."""
    steps = config.accumulation_steps(args.optimizer_batch_size, args.batch_size, world_size)
    global_batch = args.batch_size * world_size * steps
    lr = scaled_lr(args.lr, global_batch=global_batch, base_batch=args.lr_base_batch, rule=args.lr_scaling)
    return Batching(batch_size=args.batch_size, processes=world_size, accumulation_steps=steps,
                    global_batch=global_batch, lr=lr, given_lr=args.lr, base_batch=args.lr_base_batch,
                    rule=args.lr_scaling or "linear")


def _train(args, model, staged: StagedTraining, val_loader, rt, context, resume, reporter, batching: Batching, *,
           evaluation: preprocessing.EvalPreprocessing, class_names, seed, compiler: compiling.Compiler | None = None,
           hooks: trainer.Hooks) -> int:
    steps = batching.accumulation_steps
    optimizer = build_optimizer(model, name=args.optimizer, lr=batching.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, nesterov=args.nesterov,
                                bn_weight_decay=args.bn_weight_decay, rmsprop_alpha=args.rmsprop_alpha,
                                rmsprop_eps=args.rmsprop_eps, trust_coefficient=args.trust_coefficient,
                                trust_clip=args.trust_clip, betas=args.adam_betas, eps=args.optimizer_eps,
                                max_grad_norm=args.max_grad_norm, device=rt.device)
    steps_per_epoch = -(-len(staged(0).loader) // steps)  # every stage has the same batches per epoch
    scaler = rt.grad_scaler(args.static_loss_scale, args.dynamic_loss_scale)
    state = loop.RunState()
    module = torch.jit.script(model) if args.jit == "script" else model
    # DDP broadcasts rank 0's weights when it wraps the model; the EMA copy is taken after that,
    # or every rank would average from its own random initialisation.
    wrapped = _wrap_distributed(module, rt.device, context)
    if compiler is not None:  # the DDP-wrapped model, so Dynamo splits the graph at DDP's buckets
        wrapped = compiler(wrapped)
    ema = ModelEma(model, args.use_ema) if args.use_ema else None
    retention = checkpoint.Retention.resumed(args.gather_checkpoints, resume, args.resume)
    if resume is not None:
        state = checkpoint.restore(resume, optimizer=optimizer, scaler=scaler, ema=ema, rank=context.rank,
                                   world_size=context.world_size, local_rank=context.local_rank)
        reporter.message(f"resumed from {args.resume}: epoch {state.epoch}, batch {state.step_in_epoch}")
    # The schedule position is derived from (epoch, step in epoch), not stored, so a resume with
    # another batch size still lands on the right epoch.
    start_step = state.epoch * steps_per_epoch + -(-state.step_in_epoch // steps)
    scheduler = build_scheduler(optimizer, steps_per_epoch=steps_per_epoch, granularity=args.lr_granularity,
                                base=batching.lr, start_step=start_step, policy=args.lr_schedule,
                                epochs=args.epochs, warmup=args.warmup, end_lr=args.end_lr,
                                milestones=args.lr_milestones, gamma=args.lr_gamma, power=args.lr_poly_power)
    if state.epoch >= args.epochs:
        reporter.message(f"{args.resume} has already completed {state.epoch} of --epochs {args.epochs}; "
                         "nothing to train")
        return 0

    parts = TrainComponents(
        model=wrapped, module=module, optimizer=optimizer,
        scheduler=scheduler, scaler=scaler, criterion=SmoothedCrossEntropy(args.label_smoothing), runtime=rt,
        accumulation_steps=steps, ema=ema, world_size=context.world_size, compiler=compiler, hooks=hooks)
    stop = loop.GracefulStop()
    last_saved = [(args.resume, state.epoch, state.step_in_epoch)] if resume is not None else []

    def save(run_state: loop.RunState, epoch_index: int | None, is_best: bool) -> None:
        if not args.save_checkpoints:  # every rank sees the same flag: no rank gathers
            return
        last_saved[:] = [(str(Path(args.workspace) / args.checkpoint_filename), run_state.epoch,
                          run_state.step_in_epoch)]
        rng = _gather_rng_states()
        if context.is_main:
            checkpoint.save(checkpoint.capture(parts, run_state, args=args, class_names=class_names, rng=rng, seed=seed,
                                               evaluation=evaluation), args.workspace,
                            epoch_index=epoch_index, is_best=is_best, filename=args.checkpoint_filename,
                            retention=retention)

    try:
        state = loop.fit(parts, staged, val_loader, state, epochs=args.epochs, run_epochs=args.run_epochs,
                         patience=args.early_stopping_patience, print_freq=args.print_freq, prof=args.prof,
                         topk=args.topk, training_only=args.training_only, ema_best=args.ema_best,
                         evals=loop.EvalPlan(args.eval_every, args.eval_offset, args.target_top1),
                         criterion_val=SmoothedCrossEntropy(args.label_smoothing), reporter=reporter, save=save,
                         stop=stop)
    except RuntimeError as error:
        reason = distributed.peer_lost(error)
        if reason is None:
            raise
        raise UserError(_peer_lost_line(context.rank, reason, last_saved)) from None
    finally:
        stop.restore()
    # Throughput of the last epoch (what the benchmark modes report) and the best accuracy.
    summary = {k: v for k, v in state.last_metrics.items() if k.endswith("_ips")}
    summary["epochs_completed"] = state.epoch
    if compiler is not None:  # compile time apart from the throughput (train/val.compile_time per epoch)
        summary.update(compile_time=compiler.seconds, compiled_graphs=compiler.graphs)
    if not args.training_only and state.best_top1 != loop.NO_BEST:
        summary["val.top1"] = state.best_top1
    if state.target_epoch is not None:
        summary["target_top1_epoch"] = state.target_epoch
    reporter.log([], summary)
    return 0


def _peer_lost_line(rank: int, reason: str, last_saved: list[tuple[str, int, int]]) -> str:
    """What a surviving rank says when another rank's process is gone (instead of gloo's or NCCL's traceback)."""
    if not last_saved:
        return f"rank {rank}: another rank's process is gone ({reason}); no checkpoint was written yet: rerun the command"
    path, epoch, step = last_saved[0]
    return (f"rank {rank}: another rank's process is gone ({reason}); the last checkpoint is {path} (epoch {epoch}, "
            f"batch {step}): rerun the same command with --auto-resume (or --resume {path})")


def _wrap_distributed(model: nn.Module, device: torch.device, context) -> nn.Module:
    if not context.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def _batch_transform(mixup: float, cutmix: float, num_classes: int):
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


def _gather_rng_states() -> list[dict]:
    state = runtime.rng_state()
    if not torch.distributed.is_initialized():
        return [state]
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states
