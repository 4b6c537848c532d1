"""Preemption as a cluster delivers it: SIGTERM to the whole process group, DataLoader workers and
launchers included. Each run starts in its own session (``setsid``) and the test signals the
group (``os.killpg``) while every rank is paused after a known optimizer step."""
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from image_classification.checkpoints.files import read_pth
from image_classification.engine import loop
from tests.helpers.net import free_port
from tests.helpers.tiny_data import write_imagefolder

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "helpers" / "run_main.py"
TWO_CLASSES = {"classes": ("a", "b"), "train_per_class": 4, "val_per_class": 4, "size": 20}  # 8 + 8 images
TINY = ["--arch", "tiny-cnn", "--image-size", "16", "--val-resize-size", "16", "-b", "4", "--lr", "0.1",
        "--epochs", "1", "--seed", "5", "--device", "cpu", "--print-freq", "1000"]


def _launch(launcher: str, nproc: int) -> list[str]:
    if launcher == "main":
        return [sys.executable, str(DRIVER)]
    module = [str(REPO / "multiproc.py")] if launcher == "multiproc" else ["-m", "torch.distributed.run"]
    return [sys.executable, *module, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), str(DRIVER)]


def _start(command: list[str], workspace: Path, data: Path, args: list[str], **env) -> subprocess.Popen:
    workspace.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MARKERS": str(workspace), "DUMP_WEIGHTS": str(workspace / "weights"),
           "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen([*command, *TINY, *args, "--workspace", str(workspace), str(data)], cwd=workspace,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # setsid: the run leads its own process group


def _finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, out + err


def _run(command, workspace, data, args, **env) -> str:
    status, output = _finish(_start(command, workspace, data, args, **env))
    assert status == 0, output[-3000:]
    return output


def _preempt(command, workspace, data, args, ranks: int, pause_at: int) -> tuple[int, str]:
    """Start the run, wait until every rank has paused after step ``pause_at``, SIGTERM the group."""
    process = _start(command, workspace, data, args, PAUSE_AT_STEP=str(pause_at))
    deadline = time.monotonic() + 180
    while not all((workspace / f"ready.rank{rank}").exists() for rank in range(ranks)):
        if process.poll() is not None or time.monotonic() > deadline:
            return _finish(process)
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    return _finish(process)


def _weights(workspace: Path) -> dict:
    return torch.load(workspace / "weights.rank0", weights_only=True)


@pytest.mark.parametrize("backend", ["pytorch", "dali-cpu"])
def test_group_sigterm_mid_epoch_checkpoints_exits_0_and_resumes(small_digits_dir, tmp_path, backend):
    args = ["--data-backend", backend, "--workers", "2"]
    split = tmp_path / "split"
    status, output = _preempt(_launch("main", 1), split, small_digits_dir, args, ranks=1, pause_at=5)
    # Before: the workers died of the SIGTERM and the run ended with "DataLoader worker (pid ...)
    # is killed by signal: Terminated" and no checkpoint.
    assert status == 0, output[-3000:]
    assert "Traceback" not in output
    saved = read_pth(split / "checkpoint.pth.tar")
    assert (saved["epoch"], saved["step_in_epoch"]) == (0, 5)
    assert (split / "exit.rank0").read_text() == "0"
    _run(_launch("main", 1), split, small_digits_dir, [*args, "--resume", str(split / "checkpoint.pth.tar")])
    assert read_pth(split / "checkpoint.pth.tar")["epoch"] == 1
    if backend == "pytorch":  # (DALI's augmentation stream is not resumable: same batches, other crops)
        _run(_launch("main", 1), tmp_path / "straight", small_digits_dir, args)
        expected, resumed = _weights(tmp_path / "straight"), _weights(split)
        assert all(torch.equal(tensor, resumed[name]) for name, tensor in expected.items())


@pytest.mark.parametrize("launcher, launcher_status", [("multiproc", 128 + signal.SIGTERM), ("torchrun", 1)])
def test_group_sigterm_stops_both_ranks_at_the_same_step(small_digits_dir, tmp_path, launcher, launcher_status):
    args = ["--data-backend", "pytorch", "--workers", "2"]
    split = tmp_path / "split"
    # 100 images / (2 ranks x 4) = 12 steps per epoch; both ranks pause after step 3.
    status, output = _preempt(_launch(launcher, 2), split, small_digits_dir, args, ranks=2, pause_at=3)
    assert status == launcher_status, output[-3000:]
    assert [(split / f"exit.rank{rank}").read_text() for rank in (0, 1)] == ["0", "0"], output[-3000:]
    # The ranks vote after every step and act on the vote one step later: both stop after step 4.
    # (Before: they voted every 20 steps, so they trained on to the end of the epoch.)
    assert [(split / f"stopped.rank{rank}").read_text() for rank in (0, 1)] == ["0 32", "0 32"]
    assert not any("gloo" in (split / f"threads.rank{rank}").read_text() for rank in (0, 1))  # group destroyed
    assert sorted(path.name for path in split.glob("*.pth.tar")) == ["checkpoint.pth.tar"]
    saved = read_pth(split / "checkpoint.pth.tar")
    assert (saved["epoch"], saved["step_in_epoch"]) == (0, 4)
    if launcher == "multiproc":
        resume = [*args, "--resume", str(split / "checkpoint.pth.tar")]
        _run(_launch(launcher, 2), split, small_digits_dir, resume)
        _run(_launch(launcher, 2), tmp_path / "straight", small_digits_dir, args)
        expected, resumed = _weights(tmp_path / "straight"), _weights(split)
        assert all(torch.equal(tensor, resumed[name]) for name, tensor in expected.items())


def _vote(rank: int, port: int, signalled_rank: int, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    stop = loop.GracefulStop()
    step = 0
    for step in range(1, 60):
        time.sleep(0.002 * (1 + 3 * rank))  # ranks run at different speeds
        if rank == signalled_rank and step == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # only this rank gets the signal
        if stop():
            break
    results.put((rank, step, stop.agreed()))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("signalled_rank", [0, 1])
def test_one_signalled_rank_stops_every_rank_at_the_next_step(signalled_rank):
    context = multiprocessing.get_context("fork")
    results, port = context.Queue(), free_port()
    ranks = [context.Process(target=_vote, args=(rank, port, signalled_rank, results)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    try:
        outcome = sorted(results.get(timeout=60) for _ in ranks)
    finally:
        for process in ranks:
            process.join(timeout=10)
            process.kill()
    # Before: the ranks compared notes every 20 steps, so they stopped at step 20.
    assert outcome == [(0, 8, True), (1, 8, True)]


def _signal_set(status_path: str, field: str) -> set[int]:
    for line in open(status_path):
        if line.startswith(field + ":"):
            mask = int(line.split()[1], 16)
            return {signum for signum in (signal.SIGTERM, signal.SIGINT) if mask >> (signum - 1) & 1}
    raise AssertionError(f"no {field} in {status_path}")


def _loader_config(data: Path, workers: int):
    from image_classification.data.contract import LoaderConfig
    return LoaderConfig(data_dir=str(data), image_size=16, val_resize_size=16, batch_size=2, workers=workers,
                        prefetch=2, interpolation="bilinear", augmentation="none",
                        memory_format=torch.contiguous_format, device=torch.device("cpu"))


def _started_workers(tmp_path):
    from image_classification.data.loaders import pytorch
    loader = pytorch.train_loader(_loader_config(write_imagefolder(tmp_path, **TWO_CLASSES), workers=2))
    batches = iter(loader)
    next(batches), next(batches)  # batch k comes from worker k % 2: both workers have started
    workers = loader.source._iterator._workers
    assert len(workers) == 2
    return loader, batches, workers


def test_pytorch_workers_ignore_sigint_and_hold_sigterm(tmp_path):
    _, _, workers = _started_workers(tmp_path)
    for worker in workers:
        assert _signal_set(f"/proc/{worker.pid}/status", "SigIgn") == {signal.SIGINT}
        # blocked in every thread but the one waiting for it in sigwaitinfo (which unblocks it meanwhile)
        threads = os.listdir(f"/proc/{worker.pid}/task")
        open_to_sigterm = [thread for thread in threads
                           if signal.SIGTERM not in _signal_set(f"/proc/{worker.pid}/task/{thread}/status", "SigBlk")]
        assert len(threads) > 1 and len(open_to_sigterm) == 1
    # and the main process still handles them
    assert _signal_set("/proc/self/status", "SigIgn") == set()


def _worker_body(ready, owner):
    from image_classification import signals
    signals.ignore_in_worker(0, owner=owner)
    ready.set()
    time.sleep(60)


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_a_worker_survives_a_foreign_sigterm_and_obeys_its_owners(start_method):
    # under forkserver (Python 3.14's default) the worker's parent is the fork server, not the
    # training process: the owner's pid is passed in, as the DataLoader's WorkerInit does
    from image_classification import signals
    from image_classification.data.loaders.priority import WorkerInit
    context = multiprocessing.get_context(start_method)
    ready = context.Event()
    with signals.held():  # as the DataLoader starts its workers
        worker = context.Process(target=_worker_body, args=(ready, WorkerInit(idle=False).owner), daemon=True)
        worker.start()
    assert ready.wait(30)
    # from another process, as a signal to the whole process group arrives
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)
    time.sleep(1.0)
    assert worker.is_alive()
    worker.terminate()  # from the parent: what multiprocessing's exit hook does
    worker.join(timeout=10)
    assert worker.exitcode == 128 + signal.SIGTERM


_LEAKED_LOADER = """
import sys, torch
from image_classification.data.contract import LoaderConfig
from image_classification.data.loaders import pytorch
config = LoaderConfig(data_dir=sys.argv[1], image_size=16, val_resize_size=16, batch_size=2, workers=2,
                      prefetch=2, interpolation="bilinear", augmentation="none",
                      memory_format=torch.contiguous_format, device=torch.device("cpu"))
loader = pytorch.train_loader(config)
batches = iter(loader)
next(batches)
LEAKED = (loader, batches)  # still referenced when the interpreter exits
print("done", flush=True)
"""


def test_a_process_whose_loader_outlives_it_exits_cleanly(tmp_path):
    # quant_main.py hung here forever: multiprocessing's exit hook terminated the workers (ignored)
    # and waited for them
    data = write_imagefolder(tmp_path, **TWO_CLASSES)
    process = subprocess.Popen([sys.executable, "-c", _LEAKED_LOADER, str(data)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("the process did not exit: its loader's workers were never stopped")
    assert process.returncode == 0, err
    assert out == "done\n"
    assert err == ""  # no "DataLoader worker exited unexpectedly" traceback from the exit hooks


def test_dali_threads_leave_the_shutdown_signals_to_the_main_thread(tmp_path):
    import nvidia.dali  # noqa: F401  (pinned: an import failure fails)
    from image_classification.data.loaders import dali
    before = set(os.listdir("/proc/self/task"))
    loader = dali.DaliLoader(_loader_config(write_imagefolder(tmp_path, **TWO_CLASSES), workers=2), train=True)
    assert len(list(loader)) == 4
    threads = set(os.listdir("/proc/self/task")) - before
    assert threads  # DALI started its threads
    for thread in threads:
        assert _signal_set(f"/proc/self/task/{thread}/status", "SigBlk") == {signal.SIGTERM, signal.SIGINT}
    assert _signal_set(f"/proc/self/task/{threading.get_native_id()}/status", "SigBlk") == set()
