"""Learning-rate policies as functions of the (fractional) epoch, driven by ``LambdaLR``.

With ``e`` the epoch, ``W`` the warmup epochs, ``e' = e - W`` and ``E' = epochs - W``:

* warmup (``e < W``): ``base * (e + 1) / W`` for every policy;
* step: ``base * gamma ** (number of milestones <= e)``;
* linear: ``base * (1 - e'/E')``;
* cosine: ``end + (base - end) * (1 + cos(pi * e'/E')) / 2`` (the last epoch stays above ``end``);
* poly: ``end + (base - end) * (1 - e'/E') ** power`` (the MLPerf ResNet-50 LARS schedule, power 2).

By default the epoch is an integer (the LR is constant within an epoch, as in the reference's
published runs); ``granularity="iteration"`` uses the fractional epoch of each optimizer step.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from image_classification.errors import UserError


def step_policy(epoch: float, *, base: float, warmup: int, milestones: Sequence[int], gamma: float, **_) -> float:
    if epoch < warmup:
        return _warmup(epoch, base, warmup)
    return base * gamma ** bisect.bisect_right(list(milestones), epoch)


def linear_policy(epoch: float, *, base: float, warmup: int, epochs: int, **_) -> float:
    if epoch < warmup:
        return _warmup(epoch, base, warmup)
    return base * (1 - _progress(epoch, warmup, epochs))


def cosine_policy(epoch: float, *, base: float, warmup: int, epochs: int, end_lr: float, **_) -> float:
    if epoch < warmup:
        return _warmup(epoch, base, warmup)
    progress = _progress(epoch, warmup, epochs)
    return end_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (base - end_lr)


def poly_policy(epoch: float, *, base: float, warmup: int, epochs: int, end_lr: float, power: float, **_) -> float:
    if epoch < warmup:
        return _warmup(epoch, base, warmup)
    return end_lr + (base - end_lr) * (1 - _progress(epoch, warmup, epochs)) ** power


def _progress(epoch: float, warmup: int, epochs: int) -> float:
    """e'/E', clamped to [0, 1]: the scheduler is also asked for the LR one step past the last
    epoch, and the whole run may be warmup (benchmark presets run 1-3 epochs)."""
    return min(1.0, max(0.0, (epoch - warmup) / max(1, epochs - warmup)))


def _warmup(epoch: float, base: float, warmup: int) -> float:
    # base*(e+1)/W at whole epochs, as the reference; capped so that a fractional epoch just
    # before W (iteration granularity) never overshoots base.
    return base * min(1.0, (epoch + 1) / warmup)


POLICIES: dict[str, Callable[..., float]] = {"step": step_policy, "linear": linear_policy, "cosine": cosine_policy,
                                             "poly": poly_policy}


def lr_at(epoch: float, *, policy: str, base: float, epochs: int, warmup: int = 0, end_lr: float = 0.0,
          milestones: Sequence[int] = (30, 60, 80), gamma: float = 0.1, power: float = 2.0) -> float:
    """The learning rate at ``epoch`` (fractional epochs allowed)."""
    return POLICIES[policy](epoch, base=base, epochs=epochs, warmup=warmup, end_lr=end_lr,
                            milestones=milestones, gamma=gamma, power=power)


LR_SCALINGS = ("linear", "sqrt")


def scaled_lr(lr: float, *, global_batch: int, base_batch: int | None, rule: str | None) -> float:
    """The one LR scaling rule (opt-in): ``lr`` is per ``base_batch`` images and grows with the
    global batch linearly (Goyal et al. 2017) or with its square root (Krizhevsky 2014; the LAMB
    paper's rule); without ``base_batch`` it is absolute, as the reference's ``--lr``."""
    if base_batch is None:
        return lr
    ratio = global_batch / base_batch
    return lr * (ratio if (rule or "linear") == "linear" else math.sqrt(ratio))


def build_scheduler(optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, granularity: str,
                    base: float, start_step: int = 0, **policy_args) -> LambdaLR:
    """A ``LambdaLR`` stepped once per optimizer step, starting at optimizer step ``start_step``
    (non-zero when resuming); its ``last_epoch`` counts optimizer steps."""
    def factor(step: int) -> float:
        epoch = step / steps_per_epoch
        if granularity == "epoch":
            epoch = math.floor(epoch)
        return lr_at(epoch, base=base, **policy_args) / base if base else 0.0

    for group in optimizer.param_groups:  # lr_scale: --backbone-lr-scale's groups (engine/optim.py)
        group["initial_lr"] = base * group.get("lr_scale", 1.0)
    return LambdaLR(optimizer, lr_lambda=factor, last_epoch=start_step - 1)


@dataclass(frozen=True)
class Batching:
    """A run's global batch and the LR it trains with (:func:`scaled_lr` of the given ``--lr``)."""
    batch_size: int          # -b, per process
    processes: int
    accumulation_steps: int
    global_batch: int        # batch_size x processes x accumulation_steps
    lr: float                # the LR the schedule starts from (after warmup)
    given_lr: float          # --lr as given
    base_batch: int | None   # --lr-base-batch
    rule: str                # --lr-scaling

    @classmethod
    def plan(cls, *, batch_size: int, processes: int, optimizer_batch_size: int, lr: float,
             base_batch: int | None, rule: str | None) -> Batching:
        """The global batch (reached by accumulation where ``--optimizer-batch-size`` asks) and its LR."""
        steps = accumulation_steps(optimizer_batch_size, batch_size, processes)
        global_batch = batch_size * processes * steps
        return cls(batch_size=batch_size, processes=processes, accumulation_steps=steps, global_batch=global_batch,
                   lr=scaled_lr(lr, global_batch=global_batch, base_batch=base_batch, rule=rule), given_lr=lr,
                   base_batch=base_batch, rule=rule or "linear")

    def describe(self) -> str:
        how = (f"--lr {self.given_lr:g} per {self.base_batch} images, {self.rule} scaling" if self.base_batch
               else "--lr as given")
        return (f"global batch {self.global_batch} (-b {self.batch_size} x {self.processes} process(es) x "
                f"{self.accumulation_steps} accumulation step(s)), LR {self.lr:g} ({how})")

    def record(self) -> dict:
        """The fields the raport's PARAMETER record carries."""
        return {"global_batch": self.global_batch, "effective_lr": self.lr}


def accumulation_steps(optimizer_batch_size: int, batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that ``batch x processes x steps == optimizer batch``."""
    if optimizer_batch_size == -1:
        return 1
    per_step = batch_size * world_size
    if optimizer_batch_size < per_step or optimizer_batch_size % per_step:
        raise UserError(
            f"--optimizer-batch-size {optimizer_batch_size} must be a multiple of --batch-size x processes "
            f"= {batch_size} x {world_size} = {per_step}")
    return optimizer_batch_size // per_step
