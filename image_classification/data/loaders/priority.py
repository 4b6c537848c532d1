"""Loader processes and threads that give the CPU to the model whenever it wants it.

When the model trains on the CPU, its intra-op threads already use every core. A loader worker
that the kernel schedules in their place stalls a whole parallel region: the other threads wait
at the region's barrier for the one that lost its core. On 2 cores that made a loader whose
decoding is ~8 % of the epoch's CPU time cost ~20 % of its throughput (ResNet18, 128 px, bf16).

``SCHED_IDLE`` (Linux) runs a thread only on cycles no normal thread wants, so the decoders fill the
model's gaps (serial Python, the optimizer step, waits at barriers) and never preempt its threads;
when the model waits for a batch, its threads sleep and the loader gets the whole machine, so it
cannot starve. Where ``SCHED_IDLE`` does not exist, the lowest nice value is the fallback.

On a GPU the model's host threads mostly wait for the device, and the loader is the throughput:
there the loader keeps the normal priority (``--loader-priority auto``).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import torch

from image_classification import signals

log = logging.getLogger(__name__)

PRIORITIES = ("auto", "normal", "idle")
_TASKS = "/proc/self/task"


def background(choice: str, device: torch.device) -> bool:
    """Whether ``--loader-priority choice`` runs the loader at idle priority for a model on ``device``."""
    return choice == "idle" or (choice == "auto" and device.type == "cpu")


def lower(tid: int = 0) -> None:
    """Run thread ``tid`` (0: the calling thread; in a single-threaded process, the process) at idle priority."""
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as error:  # no SCHED_IDLE (macOS) or not allowed: be as nice as possible
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 19)
        except OSError:
            log.debug("could not lower the priority of thread %s: %s", tid, error)


class WorkerInit:
    """``worker_init_fn`` for DataLoader workers: the shutdown-signal rule, then the priority.
    A class rather than a closure so it pickles into spawned workers."""

    def __init__(self, idle: bool):
        self.idle = idle
        self.owner = os.getpid()  # the training process, which alone may stop the worker

    def __call__(self, worker_id: int) -> None:
        signals.ignore_in_worker(worker_id, owner=self.owner)
        if self.idle:
            lower()


@contextlib.contextmanager
def new_threads(idle: bool) -> Iterator[None]:
    """Threads this process starts inside the block (DALI's workers) run at idle priority if ``idle``."""
    if not idle or not os.path.isdir(_TASKS):
        yield
        return
    before = set(os.listdir(_TASKS))
    try:
        yield
    finally:
        for tid in set(os.listdir(_TASKS)) - before:
            lower(int(tid))  # a thread already gone is only logged
