"""A CPU training process keeps the memory a step frees (image_classification/allocator.py) and
flushes denormal floats to zero while it runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from image_classification import allocator, cli

ROOT = Path(__file__).resolve().parents[1]

# A step's pattern: large buffers, written, freed; the page faults of steps 3-12, per step.
STEPS = """
import resource, sys, torch
sys.path.insert(0, {root!r})
if {tuned}:
    from image_classification import allocator
    assert allocator.keep_freed_memory()
def step():
    buffers = [torch.ones(n << 20, dtype=torch.uint8) for n in (24, 16, 28, 12, 20)]
    del buffers
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def faults_per_step(tuned: bool) -> float:
    code = STEPS.format(root=str(ROOT), tuned=tuned)
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_buffers_are_reused_without_page_faults():
    default, tuned = faults_per_step(False), faults_per_step(True)
    # 100 MiB a step is 25,600 pages: with glibc's defaults most are handed back and faulted in again
    assert default > 5000
    assert tuned < default / 10


def test_a_cpu_run_applies_it_before_building_the_model(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("applied") or True)
    assert cli.main(["--data-backend", "synthetic", "--arch", "resnet18", "--image-size", "32", "-b", "2",
                     "--synthetic-epoch-size", "4", "--num-classes", "2", "--evaluate", "--prof", "1",
                     "--device", "cpu", "--workspace", str(tmp_path)]) == 0
    assert calls == ["applied"]


def test_a_cpu_run_flushes_denormals_while_it_trains_and_not_after(tmp_path):
    import torch

    from image_classification.engine import trainer
    seen = []

    def tiny_value(epoch, batches):
        seen.append(torch.tensor([1e-323], dtype=torch.float64).item())
    assert cli.main(["--data-backend", "synthetic", "--arch", "resnet18", "--image-size", "32", "-b", "2",
                     "--synthetic-epoch-size", "4", "--num-classes", "2", "--epochs", "1", "--training-only",
                     "--no-checkpoints", "--device", "cpu", "--workspace", str(tmp_path)],
                    hooks=trainer.Hooks(after_step=tiny_value)) == 0
    assert seen == [0.0, 0.0]  # flushed during the run (1e-323 is a float64 denormal)
    assert torch.tensor([1e-323], dtype=torch.float64).item() > 0  # and the process is as it was after it
