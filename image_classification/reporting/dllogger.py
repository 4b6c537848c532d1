"""A writer for NVIDIA DLLogger's JSON-lines format, which the reference's raports use.

Written here because ``dllogger`` is not on PyPI. Each line of the raport is ``DLLL `` followed
by one JSON object: ``type`` "METADATA" (``metric``, ``metadata: {unit, format}``) or "LOG"
(``step``, ``data: {metric: value}``), both with ``timestamp``, ``datetime`` and
``elapsedtime``. Steps: ``"PARAMETER"``, ``[epoch, iteration]``, ``[epoch, iteration,
validation iteration]``, ``[epoch]`` and ``[]`` (run summary). Console lines look like
``DLL 2026-01-01 12:00:00.000000 - Epoch: 0 Iteration: 10  train.loss : 2.30000 ...``.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence, TextIO

Step = str | Sequence[int]


@dataclass(frozen=True)
class Metric:
    unit: str | None = None
    format: str | None = None
    verbose: bool = False


def render_step(step: Step) -> str:
    if isinstance(step, str):
        return step
    if len(step) == 0:
        return "Summary:"
    labels = ("Epoch", "Iteration", "Validation Iteration")
    return " ".join(f"{label}: {value}" for label, value in zip(labels, step))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class DLLogger:
    """Writes the raport file (everything) and console lines (non-verbose metrics)."""

    def __init__(self, raport_path: str | Path | None, console: TextIO | None = sys.stdout,
                 metrics: dict[str, Metric] | None = None, verbose_console: bool = False):
        self.metrics = dict(metrics or {})
        self.console = console
        self.verbose_console = verbose_console
        self.start = time.time()
        self.file = None
        if raport_path is not None:
            Path(raport_path).parent.mkdir(parents=True, exist_ok=True)
            # Appended to, never overwritten: a resumed run continues its history, and a file an
            # earlier run wrote is not this run's to destroy (each run starts with a PARAMETER record).
            self.file = open(raport_path, "a", buffering=1, encoding="utf-8")
            if self.file.tell() == 0:
                for name, metric in self.metrics.items():
                    self._write({"type": "METADATA", "metric": name,
                                 "metadata": {"unit": metric.unit, "format": metric.format}})

    def _write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        now = time.time()
        line = {"timestamp": str(now), "datetime": datetime.fromtimestamp(now).isoformat(sep=" "),
                "elapsedtime": str(now - self.start), **record}
        self.file.write("DLLL " + json.dumps(line) + "\n")

    def log(self, step: Step, data: dict[str, Any]) -> None:
        data = {k: _json_safe(v) for k, v in data.items()}
        self._write({"type": "LOG", "step": step if isinstance(step, str) else list(step), "data": data})
        if self.console is not None:
            line = self._console_line(step, data)
            if line:
                print(line, file=self.console, flush=True)

    def _console_line(self, step: Step, data: dict[str, Any]) -> str:
        parts = []
        for name, value in data.items():
            metric = self.metrics.get(name, Metric())
            if metric.verbose and not self.verbose_console:
                continue
            text = format(value, metric.format.lstrip(":")) if metric.format and isinstance(value, (int, float)) else str(value)
            parts.append(f"{name} : {text}" + (f" {metric.unit}" if metric.unit else ""))
        if not parts or step == "PARAMETER":
            return ""
        return f"DLL {datetime.now().isoformat(sep=' ')} - {render_step(step)} " + " ".join(parts)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def read_raport(path: str | Path) -> list[dict[str, Any]]:
    """Parse a raport back into its records (for tests, plots and tools)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("DLLL "):
            records.append(json.loads(line[5:]))
    return records
