"""TensorBoard output fed with exactly what goes to the DLLogger raport.

:meth:`TensorBoardWriter.log` takes the same ``(step, data)`` as :meth:`DLLogger.log`:

==========================  =======================================  ==========================
DLLogger step               TensorBoard tag                          TensorBoard step
==========================  =======================================  ==========================
``[epoch]``                 ``epoch/<metric>`` (e.g. epoch/val.top1)  epoch
``[epoch, iteration]``      ``iteration/<metric>``                   epoch x steps_per_epoch + iteration
``"PARAMETER"``             text ``parameters`` (a Markdown table)   0
``[]`` (run summary)        text ``summary``                         last epoch seen
``[epoch, it, val_it]``     not written (per-batch validation latency)
==========================  =======================================  ==========================

Only numbers become scalars; strings, lists and None are skipped. ``steps_per_epoch`` is the
number of training batches per epoch (``len(train_loader)``); without it the global step is
counted from the iteration records as they arrive.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from image_classification.errors import UserError

Step = str | Sequence[int]


class TensorBoardWriter:
    def __init__(self, log_dir: str | Path, steps_per_epoch: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
        self.log_dir = Path(log_dir)
        self.steps_per_epoch = steps_per_epoch
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self._last_epoch = 0
        self._seen_iterations = 0  # fallback global step when steps_per_epoch is unknown
        self._previous: tuple[int, int] | None = None

    def log(self, step: Step, data: dict[str, Any]) -> None:
        if self.writer is None:
            return
        if step == "PARAMETER":
            self.writer.add_text("parameters", _markdown_table(data), 0)
        elif isinstance(step, str):
            return
        elif len(step) == 0:
            self.writer.add_text("summary", _markdown_table(data), self._last_epoch)
        elif len(step) == 1:
            self._last_epoch = int(step[0])
            self._scalars("epoch", data, self._last_epoch)
        elif len(step) == 2:
            self._scalars("iteration", data, self._global_step(int(step[0]), int(step[1])))

    def _global_step(self, epoch: int, iteration: int) -> int:
        if self.steps_per_epoch:
            return epoch * self.steps_per_epoch + iteration
        if self._previous != (epoch, iteration):
            self._seen_iterations += 1
            self._previous = (epoch, iteration)
        return self._seen_iterations

    def _scalars(self, section: str, data: dict[str, Any], step: int) -> None:
        for name, value in data.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(f"{section}/{name}", float(value), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _markdown_table(data: dict[str, Any]) -> str:
    rows = ["| name | value |", "|---|---|"]
    for name, value in data.items():
        if isinstance(value, float) and math.isfinite(value):
            value = f"{value:.6g}"
        rows.append(f"| {name} | {str(value).replace('|', '/')} |")
    return "\n".join(rows)
