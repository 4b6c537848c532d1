"""Test driver: ``main.py`` plus a BatchNorm-free test architecture and a per-rank weight dump.

BatchNorm statistics depend on the per-process batch, so comparing a 2-process run with a
1-process run of double batch needs a model without it. ``DUMP_WEIGHTS=PREFIX`` makes every rank
write its final weights to ``PREFIX.rank<R>`` (and its EMA weights to ``PREFIX.ema.rank<R>``; the
``sample-recorder`` model writes the numbers of the samples it trained on to ``PREFIX.seen.rank<R>``).

``MARKERS=DIR`` makes every rank write ``DIR/exit.rank<R>`` (its exit status) and
``DIR/stopped.rank<R>`` ("epoch samples-trained-of-it" where fit ended); with ``PAUSE_AT_STEP=N`` too, a
rank that completes its N-th optimizer step writes ``DIR/ready.rank<R>`` and waits there (up to
60 s) until it has received SIGTERM/SIGINT, so a test can signal it at a known point mid-epoch;
``DIR/threads.rank<R>``: the names of the threads still running after ``main()`` returned.
"""
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from image_classification import cli  # noqa: E402
from image_classification.engine import loop  # noqa: E402
from image_classification.engine.trainer import Hooks  # noqa: E402
from image_classification.models.registry import ModelSpec, register  # noqa: E402


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


class SampleRecorder(nn.Module):
    """tiny-cnn that records which samples it trains on: each training image of a
    ``write_numbered_images`` set is one colour whose red value is the sample's number."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.net = tiny_cnn(num_classes)
        self.seen: list[int] = []

    def forward(self, images):
        if self.training:  # undo the ImageNet normalisation of the red channel (mean 0.485, std 0.229)
            red = (images[:, 0, 0, 0].float() * 0.229 + 0.485) * 255
            self.seen.extend(red.round().int().tolist())
        return self.net(images)


register(ModelSpec("tiny-cnn", "test", tiny_cnn, default_image_size=16))
register(ModelSpec("sample-recorder", "test", SampleRecorder, default_image_size=16))
_fit = loop.fit


def fit_and_dump(parts, *args, **kwargs):
    state = _fit(parts, *args, **kwargs)
    prefix = os.environ.get("DUMP_WEIGHTS")
    if prefix:
        torch.save(parts.module.state_dict(), f"{prefix}.rank{RANK}")
        if parts.ema is not None:
            torch.save(parts.ema.state_dict(), f"{prefix}.ema.rank{RANK}")
        if isinstance(parts.module, SampleRecorder):
            Path(f"{prefix}.seen.rank{RANK}").write_text(" ".join(map(str, parts.module.seen)))
    if MARKERS:
        (MARKERS / f"stopped.rank{RANK}").write_text(f"{state.epoch} {state.progress.samples}")
    return state


loop.fit = fit_and_dump
RANK = os.environ.get("RANK", "0")
MARKERS = Path(os.environ["MARKERS"]) if os.environ.get("MARKERS") else None



def _pause_after(step: int):
    """after_step hook for PAUSE_AT_STEP: write the ready marker, then wait (up to 60 s) until this
    process has received SIGTERM/SIGINT; GracefulStop's own handler still runs."""
    steps, received = [0], []

    def after_step(epoch: int, batches_done: int) -> None:
        steps[0] += 1
        if steps[0] != step:
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            handler = signal.getsignal(signum)
            signal.signal(signum, lambda number, frame, handler=handler: (received.append(number),
                                                                         handler(number, frame)))
        (MARKERS / f"ready.rank{RANK}").write_text(str(os.getpid()))
        deadline = time.monotonic() + 60
        while not received and time.monotonic() < deadline:
            time.sleep(0.01)
    return after_step


def _die_before(batch: int):
    """after_step hook for FAIL_AT_BATCH: a crash (no cleanup, no checkpoint) as batch ``batch``
    would start (with one batch per step)."""
    steps = [0]

    def after_step(epoch: int, batches_done: int) -> None:
        steps[0] += 1
        if steps[0] == batch - 1:
            os._exit(3)
    return after_step


def hooks() -> Hooks:
    if MARKERS and os.environ.get("PAUSE_AT_STEP"):
        return Hooks(after_step=_pause_after(int(os.environ["PAUSE_AT_STEP"])))
    # FAIL_AT_BATCH=N: on its first attempt (torchrun restart count 0), rank 1 dies at training batch N.
    if os.environ.get("FAIL_AT_BATCH") and RANK == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        return Hooks(after_step=_die_before(int(os.environ["FAIL_AT_BATCH"])))
    return Hooks()


def native_threads() -> list[str]:
    """The names of this process's threads (Linux), e.g. gloo's ``pt_gloo_runloop`` workers."""
    names = []
    for task in Path("/proc/self/task").glob("*/comm"):
        try:
            names.append(task.read_text().strip())
        except FileNotFoundError:  # a thread that ended while we looked
            pass
    return sorted(names)


if __name__ == "__main__":
    status = cli.main(hooks=hooks())
    if MARKERS:
        (MARKERS / f"exit.rank{RANK}").write_text(str(status))
        # What is still running once main() has returned (and destroyed the process group).
        (MARKERS / f"threads.rank{RANK}").write_text(" ".join(native_threads()))
    sys.exit(status)
