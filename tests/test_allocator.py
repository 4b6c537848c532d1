"""The CPU training process keeps the memory a step frees (image_classification/allocator.py) and computes
denormal floats as zero on every thread (image_classification/denormals.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from image_classification import allocator, cli

ROOT = Path(__file__).resolve().parents[1]

# glibc's own account of its heap after a 1 MiB buffer is allocated and freed (mallinfo2, glibc >= 2.33).
# Page-fault counts would be the direct measure, but transparent huge pages make them vary from run to
# run; the speed-up itself is a benchmark's figure (docs/performance.md), not a test's.
HEAP = """
import ctypes, sys, torch
sys.path.insert(0, {root!r})
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if {tuned}:
    from image_classification import allocator
    assert allocator.keep_freed_memory()
buffer = torch.ones(1 << 20, dtype=torch.uint8)
del buffer
print(libc.mallinfo2().arena)
"""


def heap_bytes(tuned: bool) -> int:
    code = HEAP.format(root=str(ROOT), tuned=tuned)
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and mallinfo2")
def test_the_heap_grows_by_the_top_pad_and_keeps_what_is_freed():
    default, tuned = heap_bytes(False), heap_bytes(True)
    # glibc's default grows the heap 128 KiB beyond a request; tuned, by 256 MiB, kept after the free
    assert tuned - default >= allocator.TOP_PAD - (32 << 20)


def test_a_cpu_run_applies_it_before_building_the_model(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("applied") or True)
    assert cli.main(["--data-backend", "synthetic", "--arch", "resnet18", "--image-size", "32", "-b", "2",
                     "--synthetic-epoch-size", "4", "--num-classes", "2", "--evaluate", "--prof", "1",
                     "--device", "cpu", "--workspace", str(tmp_path)]) == 0
    assert calls == ["applied"]


# A CPU run computes denormal floats as zero on every intra-op thread (image_classification/denormals.py).
# In a fresh process, as main.py runs: the mode is per thread, and the pool's threads must copy it.
FLUSHING = """
import json, sys, tempfile, torch
sys.path.insert(0, {root!r})
from image_classification import cli, denormals
from image_classification.engine.trainer import Hooks
seen = []
hooks = Hooks(after_step=lambda epoch, batch: seen.append(denormals.threads_flushing()))
with tempfile.TemporaryDirectory() as workspace:
    code = cli.main(["--data-backend", "synthetic", "--arch", "resnet18", "--image-size", "32", "-b", "2",
                     "--synthetic-epoch-size", "4", "--num-classes", "2", "--epochs", "1", "--training-only",
                     "--no-checkpoints", "--device", "cpu", "--workspace", workspace], hooks=hooks)
print(json.dumps({{"code": code, "threads": torch.get_num_threads(), "seen": seen}}))
"""


def test_every_intra_op_thread_of_a_cpu_run_flushes_denormals():
    environment = {**os.environ, "OMP_NUM_THREADS": "2"}  # a pool of two, on a machine with one core too
    output = subprocess.run([sys.executable, "-c", FLUSHING.format(root=str(ROOT))], check=True, env=environment,
                            capture_output=True, text=True, cwd=ROOT).stdout
    result = json.loads(output.strip().splitlines()[-1])
    assert result["code"] == 0 and result["threads"] == 2
    assert len(result["seen"]) == 2  # both steps
    for parts in result["seen"]:
        assert parts == [True] * 16, parts  # not only the main thread's half


def test_the_probe_sees_a_thread_that_does_not_flush():
    """The check above can fail: a pool started before the mode is set keeps computing denormals."""
    code = (f"import sys, torch; sys.path.insert(0, {str(ROOT)!r}); from image_classification import denormals;"
            "import json; denormals.threads_flushing(); denormals.flush(); print(json.dumps(denormals.threads_flushing()))")
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout
    parts = json.loads(output)
    assert any(parts) and not all(parts)
