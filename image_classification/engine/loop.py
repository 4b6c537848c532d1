"""The epoch loop: train, validate, checkpoint, early stopping, graceful interruption."""
from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from image_classification import distributed
from image_classification.engine import trainer
from image_classification.engine.stages import EpochPlan
from image_classification.engine.trainer import TrainComponents


@dataclass
class RunState:
    epoch: int = 0             # the epoch to run next (= epochs completed)
    step_in_epoch: int = 0     # batches of `epoch` already trained (after an interruption)
    best_top1: float = 0.0
    epochs_since_best: int = 0
    last_metrics: dict = field(default_factory=dict)  # the last epoch's record (not checkpointed)


class GracefulStop:
    """First SIGTERM/SIGINT: finish the current optimizer step, checkpoint, exit cleanly.
    A second SIGINT interrupts immediately (KeyboardInterrupt)."""

    def __init__(self, device: torch.device, check_every: int = 20):
        self.requested = False
        self.device = device
        self.check_every = check_every
        self._polls = 0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __call__(self) -> bool:
        """Polled after each optimizer step. Distributed ranks agree every ``check_every`` polls
        (one tiny all-reduce), so all ranks stop at the same step."""
        if not torch.distributed.is_initialized():
            return self.requested
        self._polls += 1
        if self._polls % self.check_every:
            return False
        return distributed.any_flag(self.requested, self.device)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def fit(parts: TrainComponents, plan_epoch: Callable[[int], EpochPlan], val_loader, state: RunState, *, epochs: int,
        run_epochs: int,
        patience: int, print_freq: int, prof: int, topk: int, training_only: bool, criterion_val,
        ema_best: bool = False,
        reporter, save: Callable[[RunState, int | None, bool], None], stop: GracefulStop) -> RunState:
    """Run epochs from ``state`` until ``epochs`` (or ``run_epochs`` more, early stop, signal).
    ``plan_epoch(epoch)`` gives the epoch's training loader and batch transform (stage-wise training)."""
    last = epochs if run_epochs < 0 else min(epochs, state.epoch + run_epochs)
    while state.epoch < last:
        epoch = state.epoch
        plan = plan_epoch(epoch)
        train_loader, parts.batch_transform = plan.loader, plan.batch_transform
        outcome = trainer.train_epoch(parts, train_loader, epoch=epoch, start_batch=state.step_in_epoch,
                                      print_freq=print_freq, prof=prof, log=reporter.log, should_stop=stop,
                                      progress=reporter.progress)
        _report_skipped(train_loader, reporter, epoch)
        if outcome.interrupted:
            state.step_in_epoch = outcome.batches_done
            save(state, None, False)
            reporter.message(f"interrupted in epoch {epoch} after {outcome.batches_done} batches; "
                             "checkpoint saved, continue with --resume")
            return state
        metrics = {**outcome.metrics, **plan.record}
        is_best = False
        if not training_only:
            metrics.update(_validate_all(parts, val_loader, epoch, prof, topk, criterion_val, reporter, print_freq))
            top1 = metrics["val.top1"]
            if ema_best and "val_ema.top1" in metrics:
                top1 = max(top1, metrics["val_ema.top1"])
            is_best = top1 > state.best_top1
            state.best_top1 = max(state.best_top1, top1)
            state.epochs_since_best = 0 if is_best else state.epochs_since_best + 1
        reporter.log([epoch], metrics)
        state.last_metrics = metrics
        state.epoch, state.step_in_epoch = epoch + 1, 0
        save(state, epoch, is_best)
        if 0 < patience <= state.epochs_since_best:
            reporter.message(f"early stopping: no better val.top1 for {patience} epochs")
            break
        if stop.requested and not torch.distributed.is_initialized():
            break
    return state


def _validate_all(parts: TrainComponents, val_loader, epoch, prof, topk, criterion, reporter, print_freq) -> dict:
    metrics = trainer.validate(parts.module, val_loader, runtime=parts.runtime, criterion=criterion, topk=topk,
                               prefix="val", prof=prof, epoch=epoch, log=reporter.log, print_freq=print_freq,
                               progress=reporter.progress)
    if parts.ema is not None:
        metrics.update(trainer.validate(parts.ema.module, val_loader, runtime=parts.runtime, criterion=criterion,
                                        topk=topk, prefix="val_ema", prof=prof, epoch=epoch,
                                        progress=reporter.progress))
    _report_skipped(val_loader, reporter, epoch)
    return metrics


def _report_skipped(loader, reporter, epoch: int) -> None:
    skipped = loader.take_skipped()
    if skipped:
        shown = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        reporter.message(f"epoch {epoch}: skipped {len(skipped)} unreadable file(s): {shown}")
