"""Scoring a model on the validation split: one :class:`Validator` per run, used by ``--evaluate``
and after training epochs alike, so "the model, then its EMA" is written once."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from image_classification import compiling, distributed
from image_classification.compiling import CompileClock, Compiler
from image_classification.runtime import Runtime


class Report(Protocol):
    """What validation reports through (:class:`~image_classification.reporting.reporter.Reporter`)."""
    def log(self, step, data: dict) -> None: ...
    def message(self, text: str) -> None: ...
    def progress(self, iterable, total: int, description: str): ...


@dataclass(frozen=True)
class Validator:
    """How this run scores a model: its validation loader, runtime, loss, top-k, ``--prof``,
    ``--print-freq``, where it reports, and the compiler of ``--compile`` (``None``: eager).

    ``after_validation(epoch, metrics)`` (tests, extensions) sees every pass's metrics and may
    return others to use instead (``None`` keeps them).
    """
    loader: object
    runtime: Runtime
    criterion: nn.Module
    report: Report
    topk: int = 5
    prof: int = -1
    print_freq: int = 10
    compiler: Compiler | None = None
    after_validation: Callable[[int, dict], dict | None] | None = None

    def model_and_ema(self, model: nn.Module, ema_model: nn.Module | None, epoch: int = 0) -> dict[str, float]:
        """``val.*`` of ``model`` and, when there is an EMA, ``val_ema.*`` of it; unreadable files
        the pass skipped are reported in one line."""
        compiled = compiling.view(self.compiler)
        metrics = self.score(compiled(model), prefix="val", epoch=epoch, log=True)
        if ema_model is not None:
            metrics.update(self.score(compiled(ema_model), prefix="val_ema", epoch=epoch, log=False))
        report_skipped(self.loader, self.report, epoch)
        if self.after_validation is not None:
            metrics = self.after_validation(epoch, metrics) or metrics
        return metrics

    @torch.inference_mode()
    def score(self, model: nn.Module, *, prefix: str = "val", epoch: int = 0, log: bool = True) -> dict[str, float]:
        """Top-1 / top-k accuracy (%), loss and latency over the whole validation split.

        Every rank scores its own (uneven) shard; sums are all-reduced, so each image counts once.
        Latency is measured per batch with a device sync (it is a latency measurement). With a
        compiler (``model`` is compiled by it), batches that compiled a graph are left out of the
        latency and throughput and reported as ``{prefix}.compile_time``.
        """
        loader, runtime, topk = self.loader, self.runtime, self.topk
        model.eval()
        loader.set_epoch(epoch)
        sums = torch.zeros(4, device=runtime.device, dtype=torch.float64)  # loss*n, top1, topk, n
        latencies, data_wait, compiled_images = [], 0.0, 0
        clock = CompileClock(self.compiler)
        start = end = time.perf_counter()
        for batch, (images, target) in enumerate(self.report.progress(loader, len(loader), prefix)):
            data_wait += time.perf_counter() - end
            compute_start = time.perf_counter()
            with runtime.autocast():
                output = model(images)
            loss = self.criterion(output, target)
            runtime.synchronize()
            if clock.compiled(time.perf_counter() - compute_start):
                compiled_images += images.shape[0]
            else:
                latencies.append(time.perf_counter() - compute_start)
            k = min(topk, output.shape[1])
            hits = output.topk(k, dim=1).indices.eq(target.unsqueeze(1))
            sums += torch.stack([loss.double() * target.shape[0], hits[:, 0].sum().double(),
                                 hits.any(dim=1).sum().double(),
                                 torch.tensor(float(target.shape[0]), device=sums.device, dtype=torch.float64)])
            if log and (batch + 1) % self.print_freq == 0 and latencies:
                self.report.log([epoch, 0, batch + 1], {f"{prefix}.compute_latency": latencies[-1]})
            end = time.perf_counter()
            if batch + 1 == self.prof:  # --prof N: stop after N batches without fetching another
                break
        elapsed = time.perf_counter() - start - clock.seconds
        distributed.all_reduce_sum(sums)
        loss_sum, top1, topk_hits, count = sums.tolist()
        count = max(count, 1.0)
        metrics = {f"{prefix}.top1": 100.0 * top1 / count, f"{prefix}.top{topk}": 100.0 * topk_hits / count,
                   f"{prefix}.loss": loss_sum / count}
        metrics.update(_latency_metrics(prefix, latencies, int(count) - compiled_images, elapsed, data_wait))
        if self.compiler is not None:
            metrics[f"{prefix}.compile_time"] = clock.seconds
        return metrics


def report_skipped(loader, report: Report, epoch: int) -> None:
    """One line for the unreadable files a pass over ``loader`` skipped (none: no line)."""
    skipped = loader.take_skipped()
    if skipped:
        shown = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        report.message(f"epoch {epoch}: skipped {len(skipped)} unreadable file(s): {shown}")


def _latency_metrics(prefix: str, latencies: list[float], images: int, elapsed: float, data_wait: float) -> dict:
    if not latencies:
        return {}
    ordered = sorted(latencies)

    def quantile(q: float) -> float:  # nearest rank
        return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]

    compute = sum(latencies)
    return {f"{prefix}.compute_latency": compute / len(latencies),
            f"{prefix}.compute_latency_at90": quantile(0.90),
            f"{prefix}.compute_latency_at95": quantile(0.95),
            f"{prefix}.compute_latency_at99": quantile(0.99),
            f"{prefix}.compute_latency_at100": ordered[-1],
            f"{prefix}.compute_ips": images / compute if compute > 0 else 0.0,
            f"{prefix}.total_ips": images / elapsed if elapsed > 0 else 0.0,
            f"{prefix}.data_time": data_wait / len(latencies)}
