"""What the rest of the code talks to: metrics go to the DLLogger raport and the console, messages
to the console, and a tqdm bar shows progress when stdout is a terminal. Only rank 0 reports."""
from __future__ import annotations

import sys
from typing import Iterable

from tqdm import tqdm

from image_classification.reporting.dllogger import DLLogger, Metric, Step

_LATENCY = Metric("s", ":.5f", verbose=True)


def metric_table(topk: int) -> dict[str, Metric]:
    """Units, formats and console verbosity of every metric, named as the reference names them."""
    table = {
        "train.loss": Metric(None, ":.5f"),
        "train.total_ips": Metric("images/s", ":.2f"),
        "train.compute_ips": Metric("images/s", ":.2f"),
        "train.data_time": Metric("s", ":.5f", verbose=True),
        "train.compute_time": Metric("s", ":.5f", verbose=True),
        "train.lr": Metric(None, ":.6f"),
        "train.grad_scale": Metric(None, ":.1f"),
    }
    for prefix in ("val", "val_ema"):
        table.update({
            f"{prefix}.top1": Metric("%", ":.2f"),
            f"{prefix}.top{topk}": Metric("%", ":.2f"),
            f"{prefix}.loss": Metric(None, ":.5f"),
            f"{prefix}.compute_ips": Metric("images/s", ":.2f"),
            f"{prefix}.total_ips": Metric("images/s", ":.2f"),
            f"{prefix}.compute_latency": Metric("s", ":.5f"),
            f"{prefix}.compute_latency_at90": _LATENCY,
            f"{prefix}.compute_latency_at95": _LATENCY,
            f"{prefix}.compute_latency_at99": _LATENCY,
            f"{prefix}.compute_latency_at100": _LATENCY,
            f"{prefix}.data_time": _LATENCY,
        })
    return table


class Reporter:
    def __init__(self, raport_path: str | None, *, enabled: bool, topk: int = 5, progress_bar: bool | None = None,
                 tensorboard_dir: str | None = None, steps_per_epoch: int | None = None):
        self.enabled = enabled
        self.tensorboard = None
        if enabled and tensorboard_dir is not None:
            from image_classification.reporting.tensorboard import TensorBoardWriter
            self.tensorboard = TensorBoardWriter(tensorboard_dir, steps_per_epoch)
        self.dllogger = DLLogger(raport_path if enabled else None, console=sys.stdout if enabled else None,
                                 metrics=metric_table(topk))
        if progress_bar is None:
            progress_bar = sys.stdout.isatty()
        self.progress_bar = enabled and progress_bar

    def log(self, step: Step, data: dict) -> None:
        if self.enabled:
            self.dllogger.log(step, data)
            if self.tensorboard is not None:
                self.tensorboard.log(step, data)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(f"=> {text}", file=sys.stdout)

    def progress(self, iterable: Iterable, total: int, description: str) -> Iterable:
        if not self.progress_bar:
            return iterable
        return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True)

    def close(self) -> None:
        self.dllogger.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
