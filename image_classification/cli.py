"""``main.py``: parse and resolve the flags, build the parts (:mod:`image_classification.assembly`), then
train or evaluate. :func:`run` reads top to bottom."""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from image_classification import (assembly, compiling, config, distributed, flag_rules, models, precision,
                                  preprocessing, runtime, settings)
from image_classification.checkpoints import contents, writer
from image_classification.checkpoints.contents import SavedRun
from image_classification.data import registry as data_registry
from image_classification.engine import loop, trainer
from image_classification.engine.losses import SmoothedCrossEntropy
from image_classification.engine.schedules import Batching
from image_classification.engine.stages import StagedTraining, StageSchedule
from image_classification.engine.validation import Validator
from image_classification.errors import UserError, exit_status
from image_classification.models import catalogue
from image_classification.reporting.reporter import Reporter


@dataclass(frozen=True)
class RunContext:
    """What one run's parts share, built once by :func:`run` and handed down: the resolved flags,
    the runtime (device, precision), the process's place in the job, where it reports, the
    evaluation preprocessing checkpoints record, the compiler of ``--compile`` and the seed."""
    flags: settings.Flags
    runtime: runtime.Runtime
    dist: distributed.DistributedContext
    reporter: Reporter
    evaluation: preprocessing.EvalPreprocessing
    compiler: compiling.Compiler | None
    seed: int


def main(argv: Sequence[str] | None = None, defaults: dict[str, Any] | None = None,
         hooks: trainer.Hooks | None = None) -> int:
    """Entry point; returns the exit status. User errors print one line and return 2. ``hooks``:
    callbacks on the training loop (:class:`~image_classification.engine.trainer.Hooks`)."""
    def parse_and_run() -> int:
        args = config.parse_args(argv, defaults)
        flag_rules.check(args)
        return run(args, hooks)
    try:
        return exit_status(parse_and_run)
    finally:
        compiling.release_graphs()
        distributed.shutdown()


def run(args, hooks: trainer.Hooks | None = None) -> int:
    """One run, top to bottom: runtime, settings (resolved once), data, model, then evaluate or train."""
    context = distributed.context_from_env()
    rt = _start_runtime(args, context)
    seed = _shared_seed(args.seed, rt.device)
    runtime.seed_everything(seed + context.rank)
    spec = models.get(args.arch)
    onnx_model = assembly.open_onnx_model(args, rt.device)
    resume_from = settings.resume_path(args)
    resume = contents.load(resume_from) if resume_from else None
    published = catalogue.for_flag(args.pretrained, args.arch)  # --pretrained [NAME]: preprocessing, options
    saved = onnx_model.preprocessing if onnx_model else (published.preprocessing if published else None)
    resolved = settings.resolve(
        args, default_image_size=spec.default_image_size, quantized_arch=spec.quantized,
        saved=saved, saved_image_size=onnx_model.image_size if onnx_model else None,
        model_defaults=published.model_options() if published else None,
        interpolations=data_registry.get(args.data_backend).interpolations, resume=resume_from,
        resume_config=resume.config if resume else None, resume_finetune=resume.finetune if resume else {})
    flags, evaluation = resolved.flags, resolved.evaluation
    schedule = StageSchedule(n_stages=flags.n_stages, epochs=flags.epochs, base_size=flags.base_image_size,
                             final_size=flags.image_size, mixup=flags.mixup, cutmix=flags.cutmix,
                             randaugment_magnitude=flags.randaugment_magnitude)
    _check_known_kernel_bugs(rt, min(schedule.smallest_size, flags.eval_image_size))
    compiler = assembly.compiler_for(flags, schedule)
    loader_config = assembly.loader_config(flags, evaluation, rt, context, seed)
    train_loader, val_loader = assembly.build_loaders(flags, loader_config, schedule.stages[0])
    num_classes, class_names = assembly.resolve_classes(flags, train_loader or val_loader)
    flags = settings.for_dataset(flags, num_classes)
    model, weights_note = assembly.build_model(flags, spec, onnx_model, resume, rt, num_classes, schedule,
                                               train_loader, published)

    if context.is_main:
        writer.check_workspace(flags.workspace)
    reporter = _reporter(flags, context.is_main, train_loader, val_loader)
    ctx = RunContext(flags, rt, context, reporter, evaluation, compiler, seed)
    hooks = hooks or trainer.Hooks()
    validator = Validator(val_loader, rt, SmoothedCrossEntropy(flags.label_smoothing), reporter, topk=flags.topk,
                          prof=flags.prof, print_freq=flags.print_freq, compiler=compiler,
                          after_validation=hooks.after_validation)
    batching = None if flags.evaluate else _batching(flags, context.world_size)
    try:
        _show_runtime_notes(rt, reporter, context.is_main)
        if weights_note:
            reporter.message(weights_note)
        reporter.log("PARAMETER", {**vars(flags), "seed": seed, "num_classes": num_classes,
                                   "world_size": context.world_size, "device": str(rt.device),
                                   "precision": rt.precision_name,
                                   "memory_format_used": precision.format_name(rt.memory_format),
                                   **_resume_marker(flags, resume), **(batching.record() if batching else {})})
        if flags.evaluate:
            return _evaluate(model, validator, resume)
        staged = StagedTraining(
            schedule, first=train_loader,
            build_loader=lambda stage: data_registry.get(flags.data_backend).train_loader(
                assembly.stage_loader_config(loader_config, stage)),
            build_mixer=lambda stage: assembly.batch_transform(stage.mixup, stage.cutmix, num_classes))
        del train_loader  # `staged` owns it now and lets it go (its workers too) when stage 0 ends
        reporter.message(batching.describe())
        return _train(ctx, model, staged, validator, resume, batching, class_names=class_names, hooks=hooks)
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
    if device.type == "cpu":
        runtime.prepare_cpu_process()
    rt = runtime.build_runtime(device=device, amp=args.amp, amp_dtype=args.amp_dtype,
                               memory_format=args.memory_format, tf32=args.tf32,
                               path="infer" if args.evaluate else "train")
    distributed.init(context, device)
    if args.static_loss_scale not in (None, 1.0) and not rt.uses_grad_scaler:
        print("warning: --static-loss-scale only applies to fp16 AMP (--amp on CUDA, or --amp-dtype float16); "
              "ignored", file=sys.stderr)
    return rt


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


def _resume_marker(flags, resume: SavedRun | None) -> dict:
    """Where a resumed training run continues: the raport is appended to, and this tells readers
    (``image_classification.plot``) that epochs from ``resume_epoch`` on are logged again."""
    if resume is None or flags.evaluate:
        return {}
    return {"resume_epoch": resume.epoch, "resume_step": resume.step_in_epoch}


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


def _shared_seed(seed: int | None, device: torch.device) -> int:
    """The user's seed, or a random one chosen by rank 0: every rank must shuffle identically."""
    if seed is not None:
        return seed
    value = torch.tensor([random.SystemRandom().randrange(2**31)], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.broadcast(value, src=0)
    return int(value.item())


def _evaluate(model, validator: Validator, resume) -> int:
    """``--evaluate``: the model and, when the checkpoint has one, its EMA; one summary record."""
    ema_model = None
    if resume is not None and resume.has_ema:
        ema_model = assembly.ema_from_checkpoint(model, resume)
    validator.report.log([], validator.model_and_ema(model, ema_model))
    return 0


def _batching(flags, world_size: int) -> Batching:
    """The global batch and the LR it gets (``--lr-base-batch``), decided once for the run."""
    return Batching.plan(batch_size=flags.batch_size, processes=world_size,
                         optimizer_batch_size=flags.optimizer_batch_size, lr=flags.lr, base_batch=flags.lr_base_batch,
                         rule=flags.lr_scaling)


def _train(ctx: RunContext, model, staged: StagedTraining, validator: Validator, resume, batching: Batching, *,
           class_names, hooks: trainer.Hooks) -> int:
    flags, reporter = ctx.flags, ctx.reporter
    parts, state = assembly.training_parts(flags, model, staged, ctx.runtime, ctx.dist, resume, batching,
                                           ctx.compiler, hooks)
    if resume is not None:
        for line in _resume_lines(flags.resume, resume, state, staged(0).loader.epoch_size, batching):
            reporter.message(line)
    if parts.finetune is not None and parts.finetune.freeze_epochs:
        reporter.message(parts.finetune.describe())
    if flags.backbone_lr_scale != 1.0:
        reporter.message(f"the backbone trains at {flags.backbone_lr_scale:g} x the classifier's LR")
    if state.epoch >= flags.epochs:
        reporter.message(f"{flags.resume} has already completed {state.epoch} of --epochs {flags.epochs}; "
                         "nothing to train")
        return 0
    save = writer.CheckpointWriter(flags, parts, ctx.dist, resume, state, class_names=class_names, seed=ctx.seed,
                                   evaluation=ctx.evaluation)
    options = loop.LoopOptions(epochs=flags.epochs, run_epochs=flags.run_epochs, patience=flags.early_stopping_patience,
                               print_freq=flags.print_freq, prof=flags.prof, training_only=flags.training_only,
                               ema_best=flags.ema_best,
                               evals=loop.EvalPlan(flags.eval_every, flags.eval_offset, flags.target_top1))
    stop = loop.GracefulStop()
    try:
        state = loop.fit(parts, staged, validator, state, options, save=save, stop=stop)
    except RuntimeError as error:
        reason = distributed.peer_lost(error)
        if reason is None:
            raise
        raise UserError(_peer_lost_line(ctx.dist.rank, reason, save.last)) from None
    finally:
        stop.restore()
    reporter.log([], _summary(flags, state, ctx.compiler))
    return 0


def _resume_lines(path: str, resume: SavedRun, state: loop.RunState, epoch_size: int, batching: Batching) -> list[str]:
    """Where a resumed run continues, what changed in the split, and what of the saved run's
    randomness cannot carry over to another number of processes."""
    where = (f"epoch {state.epoch} at sample {state.progress.samples} of {epoch_size}" if state.progress.started
             else f"epoch {state.epoch}")
    line = f"resumed from {path}: {where} on {batching.processes} process(es)"
    split = resume.split
    if split is not None and (split.processes, split.global_batch) != (batching.processes, batching.global_batch):
        line += f" (saved on {split.processes}); global batch {split.global_batch} -> {batching.global_batch}"
        if split.lr is not None:
            line += f", LR {split.lr:g} -> {batching.lr:g}"
    lines = [line]
    saved_rng = len(resume.rng_states)
    if saved_rng and saved_rng != batching.processes:
        lines.append(f"RNG states were saved for {saved_rng} process(es), this run has {batching.processes}: each "
                     "starts from --seed + rank instead, so MixUp/CutMix, dropout and DALI's augmentation draw "
                     "differently than the saved run would have; which samples the epoch trains does not change")
    return lines


def _summary(flags, state: loop.RunState, compiler: compiling.Compiler | None) -> dict:
    """The run's last record: the last epoch's throughput (what the benchmark modes report), the
    best accuracy, compile time apart from the throughput, the epoch that reached --target-top1."""
    summary = {k: v for k, v in state.last_metrics.items() if k.endswith("_ips")}
    summary["epochs_completed"] = state.epoch
    if compiler is not None:
        summary.update(compile_time=compiler.seconds, compiled_graphs=compiler.graphs)
    if not flags.training_only and state.best_top1 != loop.NO_BEST:
        summary["val.top1"] = state.best_top1
    if state.target_epoch is not None:
        summary["target_top1_epoch"] = state.target_epoch
    return summary


def _peer_lost_line(rank: int, reason: str, last_saved: list[tuple[str, int, int]]) -> str:
    """What a surviving rank says when another rank's process is gone (instead of gloo's or NCCL's traceback)."""
    if not last_saved:
        return f"rank {rank}: another rank's process is gone ({reason}); no checkpoint was written yet: rerun the command"
    path, epoch, samples = last_saved[0]
    where = f"epoch {epoch} at sample {samples}" if samples else f"epoch {epoch}"
    return (f"rank {rank}: another rank's process is gone ({reason}); the last checkpoint is {path} ({where}): "
            f"rerun the same command with --auto-resume (or --resume {path})")


