"""The epoch loop: train, validate, checkpoint, early stopping, graceful interruption."""
from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from image_classification.data.contract import EpochProgress
from image_classification.engine import trainer
from image_classification.engine.stages import EpochPlan
from image_classification.engine.trainer import TrainComponents
from image_classification.engine.validation import Validator, report_skipped


#: ``RunState.best_top1`` before any validation: below every top-1, so the first one is a new best.
NO_BEST = -1.0


@dataclass
class RunState:
    epoch: int = 0             # the epoch to run next (= epochs completed)
    progress: EpochProgress = field(default_factory=EpochProgress)  # what of `epoch` is trained (after an interruption)
    best_top1: float = NO_BEST
    epochs_since_best: int = 0
    validation_pending: bool = False  # epoch `epoch - 1` is trained (and saved) but not yet validated
    last_metrics: dict = field(default_factory=dict)  # the last epoch's record (not checkpointed)
    target_epoch: int | None = None  # the epoch whose validation reached --target-top1


@dataclass(frozen=True)
class EvalPlan:
    """When to validate (``--eval-every N --eval-offset K``, as MLPerf's ``epochs_between_evals`` and
    ``eval_offset_epochs``) and when to stop (``--target-top1``). After epoch ``c`` (counted from
    1): validate when ``c >= K`` and ``c - K`` is a multiple of N, and always after the last epoch."""
    every: int = 1
    offset: int = 0
    target_top1: float | None = None

    def due(self, epoch: int, epochs: int) -> bool:
        completed = epoch + 1
        return completed == epochs or (completed >= self.offset and (completed - self.offset) % self.every == 0)


@dataclass(frozen=True)
class LoopOptions:
    """The epoch loop's settings: how far to train (``--epochs``, ``--run-epochs``), when to stop
    early (``--early-stopping-patience``, ``evals.target_top1``), what to log (``--print-freq``,
    ``--prof``), whether to validate at all (``--training-only``) and what ranks an epoch (``--ema-best``)."""
    epochs: int
    run_epochs: int = -1
    patience: int = 0
    print_freq: int = 10
    prof: int = -1
    training_only: bool = False
    ema_best: bool = False
    evals: EvalPlan = EvalPlan()


class GracefulStop:
    """First SIGTERM/SIGINT: finish the current optimizer step, checkpoint, exit cleanly.
    A second SIGINT interrupts immediately (KeyboardInterrupt).

    Distributed ranks must stop at the same step, and promptly (a launcher's grace period before
    SIGKILL is often 10-30 s): after every optimizer step each rank starts an asynchronous
    all-reduce (MAX) of its flag and collects it after the next step, so the vote overlaps a
    step's compute and every rank sees the same verdict at the same step -- one step after the
    signal. The vote runs on a gloo group with CPU tensors, so it never syncs a CUDA stream.
    """

    def __init__(self):
        self.requested = False
        self._group = None
        self._vote: tuple[torch.distributed.Work, torch.Tensor] | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __call__(self) -> bool:
        """Polled after each optimizer step: stop now? (The same answer on every rank.)"""
        if not torch.distributed.is_initialized():
            return self.requested
        if self._collect():
            return True
        self._start_vote()
        return False

    def agreed(self) -> bool:
        """At a point every rank reaches (an epoch's end): has any rank been signalled so far?"""
        if not torch.distributed.is_initialized():
            return self.requested
        if self._collect():
            return True
        self._start_vote()
        return self._collect()

    def _start_vote(self) -> None:
        if self._group is None:  # every rank gets here at its first poll: a collective call
            gloo = torch.distributed.get_backend() == "gloo"
            self._group = torch.distributed.group.WORLD if gloo else torch.distributed.new_group(backend="gloo")
        flag = torch.tensor([int(self.requested)])
        work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group,
                                            async_op=True)
        self._vote = (work, flag)

    def _collect(self) -> bool:
        if self._vote is None:
            return False
        work, flag = self._vote
        self._vote = None
        work.wait()
        return bool(flag.item())

    def restore(self) -> None:
        """Leave with no collective in flight: a vote still pending (a run that ended early, by
        --target-top1 or early stopping, or by an error) is waited for -- every rank started it, so
        it completes, unless a peer is gone, which the caller reports -- so that the process group
        is never destroyed under gloo's feet with work in its queue."""
        try:
            self._collect()
        except RuntimeError:
            pass  # a lost peer: the error that brought us here says so
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)


def fit(parts: TrainComponents, plan_epoch: Callable[[int], EpochPlan], validator: Validator, state: RunState,
        options: LoopOptions, *, save: Callable[[RunState, int | None, bool], None], stop: GracefulStop) -> RunState:
    """Run epochs from ``state`` until ``options.epochs`` (or ``run_epochs`` more, early stop,
    target, signal). ``plan_epoch(epoch)`` gives the epoch's training loader and batch transform
    (stage-wise training). Early-stopping patience counts validations (one per epoch unless
    ``options.evals`` spaces them). Messages and records go where ``validator`` reports.

    A trained epoch is saved before it is validated (``validation_pending``): a validation cut
    short -- by the SIGKILL that follows a launcher's grace period, or because a stop was agreed
    at the epoch's end and validation is skipped -- loses no training, and the resumed run
    validates that epoch first. Validation itself is not interrupted: ranks score uneven shards,
    so a per-batch stop vote there would leave one rank waiting for a batch another never runs.
    """
    reporter, evals = validator.report, options.evals

    def validate(epoch: int) -> tuple[bool, dict]:
        return _validate_epoch(parts, validator, state, epoch, options.ema_best)

    if state.validation_pending and not options.training_only:
        epoch = state.epoch - 1
        reporter.message(f"epoch {epoch} was trained but not validated: validating it first")
        is_best, metrics = validate(epoch)
        reporter.log([epoch], metrics)
        reached = _target_reached(state, evals, metrics, epoch, options.ema_best, reporter)
        save(state, epoch, is_best)
        if _early_stop(state, options.patience, reporter) or reached:
            return state
    state.validation_pending = False
    if state.target_epoch is not None and evals.target_top1 is not None and state.best_top1 >= evals.target_top1:
        reporter.message(f"val.top1 {state.best_top1:.2f} % reached --target-top1 {evals.target_top1:g} after epoch "
                         f"{state.target_epoch}; nothing to train")
        return state
    epochs = options.epochs
    last = epochs if options.run_epochs < 0 else min(epochs, state.epoch + options.run_epochs)
    while state.epoch < last:
        epoch = state.epoch
        plan = plan_epoch(epoch)
        train_loader, parts.batch_transform = plan.loader, plan.batch_transform
        outcome = trainer.train_epoch(parts, train_loader, epoch=epoch, start=state.progress,
                                      print_freq=options.print_freq, prof=options.prof, log=reporter.log,
                                      should_stop=stop, progress=reporter.progress)
        report_skipped(train_loader, reporter, epoch)
        if outcome.interrupted:
            state.progress = outcome.progress
            save(state, None, False)
            reporter.message(f"interrupted in epoch {epoch} after {outcome.batches_done} batches; "
                             "checkpoint saved, continue with --resume")
            return state
        metrics = {**outcome.metrics, **plan.record}
        state.epoch, state.progress = epoch + 1, EpochProgress()
        state.last_metrics = metrics
        is_best = False
        if not options.training_only and evals.due(epoch, epochs):
            state.validation_pending = True
            save(state, None, False)
            if stop.agreed():
                reporter.log([epoch], metrics)
                reporter.message(f"stopped after training epoch {epoch}; checkpoint saved, continue with --resume "
                                 "(it validates the epoch first)")
                return state
            is_best, val_metrics = validate(epoch)
            metrics.update(val_metrics)
        reporter.log([epoch], metrics)
        reached = _target_reached(state, evals, metrics, epoch, options.ema_best, reporter)  # before the save records it
        save(state, epoch, is_best)
        if parts.hooks.after_epoch is not None:
            parts.hooks.after_epoch(state, metrics)
        if _early_stop(state, options.patience, reporter) or reached or stop.agreed():
            break
    return state


def _validate_epoch(parts: TrainComponents, validator: Validator, state: RunState, epoch: int,
                    ema_best: bool) -> tuple[bool, dict]:
    """Validate the trained ``epoch`` and update ``state``'s best; (is it a new best, its metrics)."""
    metrics = validator.model_and_ema(parts.module, parts.ema.module if parts.ema is not None else None, epoch)
    top1 = _score(metrics, ema_best)
    is_best = top1 > state.best_top1
    state.best_top1 = max(state.best_top1, top1)
    state.epochs_since_best = 0 if is_best else state.epochs_since_best + 1
    state.validation_pending = False
    state.last_metrics = {**state.last_metrics, **metrics}
    return is_best, metrics


def _score(metrics: dict, ema_best: bool) -> float:
    """The top-1 that ranks an epoch: the model's, or the better of it and the EMA's (``--ema-best``)."""
    top1 = metrics["val.top1"]
    return max(top1, metrics["val_ema.top1"]) if ema_best and "val_ema.top1" in metrics else top1


def _target_reached(state: RunState, evals: EvalPlan, metrics: dict, epoch: int, ema_best: bool, reporter) -> bool:
    """``--target-top1``: whether this validation reached it (and record the epoch)."""
    if evals.target_top1 is None or "val.top1" not in metrics:
        return False
    top1 = _score(metrics, ema_best)
    if top1 < evals.target_top1:
        return False
    state.target_epoch = epoch
    reporter.message(f"target val.top1 {evals.target_top1:g} % reached after epoch {epoch} "
                     f"({epoch + 1} epochs): {top1:.2f} %")
    return True


def _early_stop(state: RunState, patience: int, reporter) -> bool:
    if 0 < patience <= state.epochs_since_best:
        reporter.message(f"early stopping: no better val.top1 for {patience} epochs")
        return True
    return False
