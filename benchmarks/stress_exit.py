#!/usr/bin/env python
"""Launch many short two-rank runs and count the ones that do not end cleanly (issue 23).

Each launch trains a small ResNet for one short epoch on 16 px digits and validates it, through
``torch.distributed.run`` or ``multiproc.py``, with ``-j 0`` or ``-j 2``, eager or ``--compile``
(cycled in that order), while busy processes keep every core of the machine loaded (CI runs on a
fresh, busy machine). A launch is *clean* when the launcher exits 0 and no rank printed an abort.
It prints one line per launch that is not clean (its exit status and the first rank error line),
then a table per configuration, then the machine::

    python benchmarks/stress_exit.py --launches 300            # the figure in the issue's closing note
    python benchmarks/stress_exit.py --launches 8 --busy 0     # a quick look

Not a timed test: how often an exit-time race shows depends on load and luck, so the result is a
count over many launches on a named machine.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ABORT_MARKERS = ("terminate called", "Fatal Python error", "SIGABRT", "Signal 6", "core dumped")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def busy_loop() -> None:  # pragma: no cover - runs in a child process
    while True:
        pass


def write_data(root: Path) -> None:
    sys.path.insert(0, str(REPO))
    from image_classification.data.prepare.digits import write_digits
    write_digits(root, size=16)
    for split, keep in (("train", 4), ("val", 2)):  # 40 training and 20 validation images
        for class_dir in (root / split).iterdir():
            for extra in sorted(class_dir.iterdir())[keep:]:
                extra.unlink()


def command(launcher: str, workers: int, compiled: bool, workspace: Path, data: Path) -> list[str]:
    args = ["--arch", "resnet18", "--data-backend", "pytorch", "--image-size", "32", "--val-resize-size", "32",
            "-b", "4", "--epochs", "1", "-j", str(workers), "--seed", "1", "--device", "cpu", "--lr", "0.01",
            "--print-freq", "1000", "--workspace", str(workspace), *(["--compile", "eager"] if compiled else []),
            str(data)]
    main = str(REPO / "main.py")
    port = str(free_port())
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                main, *args]
    return [sys.executable, str(REPO / "multiproc.py"), "--nproc_per_node", "2", "--master_port", port, main, *args]


def first_error(text: str) -> str:
    for line in text.splitlines():
        if any(marker in line for marker in ABORT_MARKERS) or "error" in line.lower():
            return line.strip()[:200]
    return text.strip().splitlines()[-1][:200] if text.strip() else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launches", type=int, default=300)
    parser.add_argument("--busy", type=int, default=os.cpu_count(), help="busy processes beside the runs "
                        "(default: one per core)")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from image_classification import machine
    print(machine.describe(), flush=True)

    configs = list(itertools.product(("torchrun", "multiproc.py"), (0, 2), (False, True)))
    counts = collections.defaultdict(lambda: [0, 0])  # config -> [launches, not clean]
    busy = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(args.busy)]
    for process in busy:
        process.start()
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "digits"
            write_data(data)
            for n in range(args.launches):
                launcher, workers, compiled = config = configs[n % len(configs)]
                workspace = Path(tmp) / f"run{n}"
                workspace.mkdir()
                env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
                try:
                    run = subprocess.run(command(launcher, workers, compiled, workspace, data), cwd=workspace,
                                         env=env, capture_output=True, text=True, timeout=args.timeout)
                    status, output = run.returncode, run.stdout + run.stderr
                except subprocess.TimeoutExpired as expired:
                    status, output = "timeout", str(expired.stderr or "")
                logs = "".join(log.read_text(errors="replace") for log in workspace.glob("GPU_*.log"))
                aborted = any(marker in output + logs for marker in ABORT_MARKERS)
                counts[config][0] += 1
                if status != 0 or aborted:
                    counts[config][1] += 1
                    print(f"launch {n} ({launcher}, -j {workers}, {'compiled' if compiled else 'eager'}): "
                          f"exit {status}: {first_error(output + logs)}", flush=True)
    finally:
        for process in busy:
            process.terminate()
    elapsed = time.monotonic() - started
    print(f"{'launcher':<14}{'-j':>4}{'mode':>10}{'launches':>10}{'not clean':>11}")
    for (launcher, workers, compiled), (launched, failed) in sorted(counts.items()):
        print(f"{launcher:<14}{workers:>4}{'compiled' if compiled else 'eager':>10}{launched:>10}{failed:>11}")
    total, failed = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    import torch
    print(f"{total} launches, {failed} not clean, {elapsed / 60:.1f} min; {args.busy} busy process(es); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
