"""--loader-priority: on CPU training the loader's workers/threads run at SCHED_IDLE, the model's
threads keep the normal policy; on a GPU (or with ``normal``) nothing changes."""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
import torch
from image_classification.data.contract import LoaderConfig
from image_classification.data.loaders import priority

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
from tiny_data import write_imagefolder  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")


def _folder(root: Path) -> Path:
    return write_imagefolder(root, classes=("a", "b"), train_per_class=4, val_per_class=4, size=20)


def _config(data: Path, idle: bool) -> LoaderConfig:
    return LoaderConfig(data_dir=str(data), image_size=16, val_resize_size=16, batch_size=2, workers=2, prefetch=2,
                        interpolation="bilinear", augmentation="none", memory_format=torch.contiguous_format,
                        device=torch.device("cpu"), idle_priority=idle)


@pytest.mark.parametrize(("choice", "device", "idle"), [
    ("auto", "cpu", True), ("auto", "cuda", False), ("normal", "cpu", False), ("idle", "cuda", True)])
def test_auto_is_idle_only_when_the_model_is_on_the_cpu(choice, device, idle):
    assert priority.background(choice, torch.device(device)) is idle


@pytest.mark.parametrize("idle", [True, False])
def test_pytorch_workers_run_at_idle_priority_and_the_main_process_does_not(tmp_path, idle):
    from image_classification.data.loaders import pytorch
    loader = pytorch.train_loader(_config(_folder(tmp_path), idle))
    batches = iter(loader)
    next(batches), next(batches)  # batch k comes from worker k % 2: both workers have started
    workers = loader.source._iterator._workers
    assert len(workers) == 2
    expected = os.SCHED_IDLE if idle else os.SCHED_OTHER
    assert [os.sched_getscheduler(worker.pid) for worker in workers] == [expected, expected]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_dali_threads_run_at_idle_priority_and_the_main_thread_does_not(tmp_path):
    import nvidia.dali  # noqa: F401  (pinned: an import failure fails)
    from image_classification.data.loaders import dali
    before = set(os.listdir("/proc/self/task"))
    loader = dali.DaliLoader(_config(_folder(tmp_path), idle=True), train=True)
    assert len(list(loader)) == 4
    threads = set(os.listdir("/proc/self/task")) - before
    assert threads  # DALI started its threads
    assert {os.sched_getscheduler(int(tid)) for tid in threads} == {os.SCHED_IDLE}
    assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER


def test_threads_started_outside_the_block_keep_their_priority():
    started = threading.Event()
    release = threading.Event()

    def run():
        started.set()
        release.wait()

    outside = threading.Thread(target=run)
    with priority.new_threads(idle=True):
        inside = threading.Thread(target=run)
        inside.start()
    outside.start()
    started.wait()
    try:
        assert os.sched_getscheduler(inside.native_id) == os.SCHED_IDLE
        assert os.sched_getscheduler(outside.native_id) == os.SCHED_OTHER
    finally:
        release.set()
        inside.join(), outside.join()


def test_main_py_accepts_the_flag_and_rejects_a_bad_value():
    from image_classification import config
    parser = config.build_parser()
    assert parser.parse_args(["--loader-priority", "normal", "x"]).loader_priority == "normal"
    assert parser.parse_args(["x"]).loader_priority == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--loader-priority", "low", "x"])
