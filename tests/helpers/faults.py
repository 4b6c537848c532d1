"""Fault injection through the training loop's public hooks (``engine.trainer.Hooks``)."""
from __future__ import annotations

import os
import signal

from image_classification.engine.trainer import Hooks


def sigterm_at_step(step: int):
    """Training-loop hooks under which this process's ``step``-th optimizer step (counted over the
    whole invocation) ends with a SIGTERM to itself: the graceful stop path."""
    count = [0]

    def after_step(epoch: int, batches_done: int) -> None:
        count[0] += 1
        if count[0] == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return Hooks(after_step=after_step)
