"""One training epoch (validation: :mod:`image_classification.engine.validation`).

Hot-path rules: no step waits for the device. The loss is accumulated on the device and read
back every ``print_freq`` iterations, one interval late (:class:`IntervalReport`); SGD on CUDA is
fused, so the GradScaler reads nothing back (``engine/optim.py``); gradients are all-reduced only
on the last micro-batch of an accumulation group (DDP ``no_sync``); the EMA and the LR schedule
advance once per optimizer step, not per micro-batch. Throughput is images divided by wall time, with the first
iteration (worker start-up, cuDNN autotuning) left out.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from image_classification import distributed
from image_classification.compiling import CompileClock, Compiler, plain
from image_classification.data.contract import EpochProgress
from image_classification.engine.ema import ModelEma
from image_classification.engine.finetune import FineTune
from image_classification.runtime import Runtime


@dataclass
class StepOutcome:
    """How a training epoch ended."""
    batches_done: int           # batches of this epoch completed (in this run's split, including those before a resume)
    interrupted: bool = False   # stopped early by a signal (the checkpoint records `progress`)
    progress: EpochProgress = field(default_factory=EpochProgress)  # where an interrupted epoch stands
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Hooks:
    """Public points where a caller joins the training loop (fault injection in tests, profilers,
    extensions) instead of replacing the loop's private functions.

    ``before_batch(images, target, batch_transform)``: each training micro-batch as it reaches the
    model, before the batch transform (MixUp/CutMix, or ``None``) is applied to it.
    ``after_step(epoch, batches_done)``: after each optimizer step, before the stop flag is polled.
    ``after_validation(epoch, metrics)``: after each validation (the model and its EMA); may return
    other metrics to use instead (``None`` keeps them).
    ``after_epoch(run_state, metrics)``: after an epoch is recorded and saved.
    """
    before_batch: Callable[[torch.Tensor, torch.Tensor, Callable | None], None] | None = None
    after_step: Callable[[int, int], None] | None = None
    after_validation: Callable[[int, dict], dict | None] | None = None
    after_epoch: Callable[[object, dict], None] | None = None


@dataclass
class TrainComponents:
    model: nn.Module                 # what runs forward/backward (DDP-wrapped when distributed)
    module: nn.Module                # the plain model (EMA source, checkpoints)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    runtime: Runtime
    accumulation_steps: int = 1
    ema: ModelEma | None = None
    batch_transform: Callable | None = None   # MixUp / CutMix on device batches
    world_size: int = 1
    compiler: Compiler | None = None          # --compile: `model` is compiled by it (image_classification/compiling.py)
    hooks: Hooks = field(default_factory=Hooks)
    finetune: FineTune | None = None          # --freeze-backbone-epochs, --backbone-lr-scale (engine/finetune.py)


class IntervalMeter:
    """Sums since the last report, kept on the device where they are produced."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.batches = 0
        self.images = 0
        self.data_time = 0.0
        self.start = _mark(self.device)


def _mark(device: torch.device):
    """A point in the device's work queue: a timing event on CUDA, the host clock elsewhere."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


@dataclass
class IntervalReport:
    """One interval's figures, read back from the device one interval late.

    Reading a loss (``.item()``) or timing with ``synchronize()`` makes the host wait for all
    queued work, so the GPU idles while the host queues the next step; with ``--print-freq 1``
    (the benchmark modes) that happened every step, inside the measured time. Instead, an
    interval's device values are copied to the host asynchronously when it ends and logged when
    the next one ends (or the epoch does): by then they have long arrived, and the step in
    flight keeps the GPU busy. The interval's time is the device's, between two CUDA events.
    """
    step: list[int]
    values: torch.Tensor   # [mean loss over ranks, grad scale], on (or on its way to) the host
    start: object          # _mark()s
    end: object
    images: int
    batches: int
    data_time: float
    lr: float
    scaled: bool

    def metrics(self) -> dict[str, float]:
        if isinstance(self.end, float):
            elapsed = self.end - self.start
        else:
            self.end.synchronize()  # the values were copied before this event was recorded
            elapsed = self.start.elapsed_time(self.end) / 1000.0
        loss, scale = self.values.tolist()
        metrics = {"train.loss": loss,
                   **_throughput("train", self.images, elapsed, self.data_time),
                   "train.data_time": self.data_time / self.batches,
                   "train.compute_time": (elapsed - self.data_time) / self.batches,
                   "train.lr": self.lr}
        if self.scaled:
            metrics["train.grad_scale"] = scale
        return metrics


def _no_sync(model: nn.Module, sync: bool):
    model = plain(model)  # a compiled DDP model: DDP's own switch
    if not sync and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def train_epoch(parts: TrainComponents, loader, *, epoch: int, start: EpochProgress | None = None,
                print_freq: int = 10, prof: int = -1, log: Callable[[list[int], dict], None] | None = None,
                should_stop: Callable[[], bool] = lambda: False, progress=None) -> StepOutcome:
    """Train ``epoch``'s samples that ``start`` does not say are trained (all of them by default).
    ``should_stop`` is polled after optimizer steps but the last; when it returns True the epoch ends
    early (at an accumulation-group boundary) and the outcome says where the epoch stands."""
    if parts.finetune is not None:  # --freeze-backbone-epochs: the classifier alone, or everything
        parts.finetune.enter(epoch, parts)
    else:
        parts.model.train()
    runtime = parts.runtime
    loader.set_epoch(epoch, start)
    # Batches are numbered (logs, hooks) in this run's split, from where the trained samples reach.
    start_batch = loader.batches_trained
    # --prof N: exactly N batches (the last accumulation group ends there), no extra one fetched.
    total = min(len(loader), prof) if prof > 0 else len(loader)
    steps = parts.accumulation_steps
    interval, pending = IntervalMeter(runtime.device), None
    epoch_images, epoch_loss, data_wait, timed_from = 0, torch.zeros((), device=runtime.device), 0.0, None
    clock, compiling_after_first = CompileClock(parts.compiler), 0.0
    done = 0
    lr = parts.optimizer.param_groups[0]["lr"]
    end = time.perf_counter()
    batches = progress(loader, len(loader), f"epoch {epoch}") if progress else loader
    for done, (images, target) in enumerate(batches, start=1):
        batch = start_batch + done - 1
        waited = time.perf_counter() - end
        group_start = (done - 1) - (done - 1) % steps
        group_size = min(steps, total - group_start)
        last_of_group = done == group_start + group_size
        step_start = time.perf_counter()
        loss = _forward_backward(parts, images, target, group_size, sync=last_of_group)
        if last_of_group:
            lr = parts.optimizer.param_groups[0]["lr"]  # the LR this step used (a float, no sync)
            _optimizer_step(parts)
            if parts.hooks.after_step is not None:
                parts.hooks.after_step(epoch, batch + 1)
        compiled = clock.compiled(time.perf_counter() - step_start)
        interval.loss += loss
        epoch_loss += loss
        interval.batches += 1
        interval.images += images.shape[0]
        interval.data_time += waited
        if timed_from is None:  # leave the first iteration out of the throughput
            timed_from = time.perf_counter()
        elif compiled:  # and a step that compiled (--compile; reported as train.compile_time)
            compiling_after_first += time.perf_counter() - step_start
        else:
            epoch_images += images.shape[0]
            data_wait += waited
        if (batch + 1) % print_freq == 0 and log is not None:
            _log_report(log, pending)
            pending = _interval_report(parts, interval, lr, [epoch, batch + 1])
            interval.reset()
        end = time.perf_counter()
        if done == total:  # a stop asked for now is the caller's to see (the epoch is complete)
            break
        if last_of_group and should_stop():
            _log_report(log, pending)
            return StepOutcome(start_batch + done, interrupted=True, progress=loader.progress_after(done))
    _log_report(log, pending)
    runtime.synchronize()
    elapsed = time.perf_counter() - timed_from - compiling_after_first if timed_from else 0.0
    metrics = {"train.loss": distributed.all_reduce_mean(epoch_loss / max(done, 1)).item(),
               **_throughput("train", epoch_images * parts.world_size, elapsed, data_wait), "train.lr": lr}
    if parts.compiler is not None:
        metrics["train.compile_time"] = clock.seconds
    return StepOutcome(start_batch + done, metrics=metrics)


def _forward_backward(parts: TrainComponents, images, target, group_size: int, sync: bool) -> torch.Tensor:
    if parts.hooks.before_batch is not None:
        parts.hooks.before_batch(images, target, parts.batch_transform)
    if parts.batch_transform is not None:
        images, target = parts.batch_transform(images, target)
    with _no_sync(parts.model, sync):
        with parts.runtime.autocast():
            output = parts.model(images)
        loss = parts.criterion(output, target)
        # Each micro-batch contributes 1/group_size of the step's gradient (a short last group
        # at the end of an epoch is averaged over its own size).
        parts.scaler.scale(loss / group_size).backward()
    return loss.detach()


def _optimizer_step(parts: TrainComponents) -> None:
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scheduler.step()
    if parts.ema is not None:
        parts.ema.update(parts.module)


def _log_report(log, report: IntervalReport | None) -> None:
    """Log the interval closed one interval ago, if any (its values have reached the host by now)."""
    if report is not None:
        log(report.step, report.metrics())


def _interval_report(parts: TrainComponents, interval: IntervalMeter, lr: float, step: list[int]) -> IntervalReport:
    """Close ``interval`` without waiting for the device (see :class:`IntervalReport`)."""
    loss = distributed.all_reduce_mean(interval.loss / interval.batches)
    # GradScaler.get_scale() reads the scale back at once; its asynchronous twin keeps it a tensor.
    scale = parts.scaler._get_scale_async() if parts.scaler.is_enabled() else None
    values = torch.stack([loss.float(), scale.float() if scale is not None else torch.zeros_like(loss)])
    values = values.to("cpu", non_blocking=True)
    return IntervalReport(step=step, values=values, start=interval.start, end=_mark(interval.device),
                          images=interval.images * parts.world_size, batches=interval.batches,
                          data_time=interval.data_time, lr=lr, scaled=scale is not None)


def _throughput(prefix: str, images: int, elapsed: float, data_wait: float) -> dict[str, float]:
    if elapsed <= 0 or images == 0:
        return {}
    compute = max(elapsed - data_wait, 1e-9)
    return {f"{prefix}.total_ips": images / elapsed, f"{prefix}.compute_ips": images / compute}
