#!/usr/bin/env python
"""Start one process per device on this node through torchrun's elastic agent.

    python multiproc.py --nproc_per_node 8 main.py /imagenet ...
    python multiproc.py --nnodes 2 --node_rank 0 --master_addr node0 --nproc_per_node 8 launch.py ...

The reference's command line (a clone of the old ``torch.distributed.launch``) mapped onto
``torch.distributed.run``: the static rendezvous at ``--master_addr:--master_port``, the elastic
agent's failure handling, ``--max_restarts`` and signal forwarding. Each rank runs
``python -u SCRIPT ARGS`` with the environment torchrun gives it (MASTER_ADDR, MASTER_PORT,
WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, ...). Local rank 0 writes to this console; local
rank k > 0 writes stdout and stderr to ``GPU_<k>.log`` in the working directory (appended to after
a restart).

Faults: when a rank exits with a non-zero status, the agent sends the others SIGTERM and, after
``--grace_period`` seconds, SIGKILL; multiproc.py then exits with the failed rank's status
(128 + N when it was killed by signal N) and names it in one line: its global and local rank, its
status or signal, and its log's last line. SIGINT and SIGTERM sent to multiproc.py (alone or to its
whole process group) are forwarded once to every rank, which finish their step, checkpoint and
exit 0; multiproc.py waits for them and exits with 128 + the signal number.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
from typing import Sequence

RANK_ENTRY = "--as-rank"  # internal: how the agent starts each rank through this file (see run_rank)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multiproc.py", allow_abbrev=False,
        description="Start --nproc_per_node copies of a training script on this node (torchrun's agent).")
    parser.add_argument("--nnodes", type=int, default=1, help="number of nodes (default: 1)")
    parser.add_argument("--node_rank", type=int, default=0, help="rank of this node, 0..nnodes-1 (default: 0)")
    parser.add_argument("--nproc_per_node", type=int, default=1,
                        help="processes on this node, normally one per GPU (default: 1)")
    parser.add_argument("--master_addr", default="127.0.0.1",
                        help="address of the node with rank 0 (default: 127.0.0.1)")
    parser.add_argument("--master_port", type=int, default=29500, help="free port on the master node (default: 29500)")
    parser.add_argument("--grace_period", type=float, default=10.0, metavar="SECONDS",
                        help="after a rank fails or a signal is forwarded, wait this long for the ranks to stop "
                             "before killing them (default: 10; whole seconds, rounded up)")
    parser.add_argument("--max_restarts", type=int, default=0,
                        help="restart the whole group this many times after a rank fails (default: 0; "
                             "pair it with main.py --auto-resume)")
    parser.add_argument("training_script", help="the script each process runs (main.py or launch.py)")
    parser.add_argument("training_script_args", nargs=argparse.REMAINDER, help="its arguments")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nnodes < 1 or args.nproc_per_node < 1:
        parser.error("--nnodes and --nproc_per_node must be at least 1")
    if not 0 <= args.node_rank < args.nnodes:
        parser.error(f"--node_rank must be between 0 and --nnodes - 1 ({args.nnodes - 1})")
    if args.grace_period < 0 or args.max_restarts < 0:
        parser.error("--grace_period and --max_restarts must not be negative")
    return args


def torchrun_argv(args: argparse.Namespace) -> list[str]:
    """torchrun's command line for ``args``: each rank is this file in RANK_ENTRY mode."""
    return ["--nnodes", str(args.nnodes), "--node_rank", str(args.node_rank),
            "--nproc_per_node", str(args.nproc_per_node), "--master_addr", args.master_addr,
            "--master_port", str(args.master_port), "--rdzv_backend", "static",
            "--max_restarts", str(args.max_restarts), "--shutdown_timeout", str(math.ceil(args.grace_period)),
            os.path.abspath(__file__), RANK_ENTRY, args.training_script, *args.training_script_args]


def launch(args: argparse.Namespace) -> int:
    """Run the group under the elastic agent; return multiproc.py's exit status."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if "OMP_NUM_THREADS" not in os.environ and args.nproc_per_node > 1:
        # N processes each using every core would oversubscribe the CPU. torchrun would set 1
        # thread, which starves CPU training: give each rank a fair share instead.
        from image_classification import machine
        os.environ["OMP_NUM_THREADS"] = str(max(1, machine.usable_cores() // args.nproc_per_node))
    try:
        with _grace_period_for_failures():
            torchrun.run(torchrun.parse_args(torchrun_argv(args)))
    except SignalException as stop:  # the agent forwarded it to every rank and waited for them
        return 128 + int(stop.sigval)
    except ChildFailedError as error:
        global_rank, failure = error.get_first_failure()
        print(f"multiproc.py: {_describe(global_rank, failure.local_rank, failure.exitcode)}; the other processes "
              "were stopped", file=sys.stderr, flush=True)
        return 128 - failure.exitcode if failure.exitcode < 0 else failure.exitcode
    return 0


@contextlib.contextmanager
def _grace_period_for_failures():
    """Make the agent honour ``--shutdown_timeout`` when it stops the group after a failed rank.

    torch's agent passes that timeout on a signal and at exit, but after a failure it stops the
    other ranks with a hard-coded 30 s twice over: the process context's ``close()`` (called when
    it sees the failure) and ``_stop_workers`` (``_shutdown()`` without a timeout). ``launch_agent``
    builds the agent from ``torch.distributed.launcher.api.LocalElasticAgent``, so a subclass that
    supplies the timeout stands in for it while the group runs.
    """
    from torch.distributed.launcher import api as launcher_api

    class Agent(launcher_api.LocalElasticAgent):
        def _start_workers(self, worker_group):
            started = super()._start_workers(worker_group)
            close = self._pcontext.close

            def close_with_grace(death_sig=None, timeout=None):
                close(death_sig, self._shutdown_timeout if timeout is None else timeout)

            self._pcontext.close = close_with_grace
            return started

        def _stop_workers(self, worker_group) -> None:
            self._shutdown(timeout=self._shutdown_timeout)

    original, launcher_api.LocalElasticAgent = launcher_api.LocalElasticAgent, Agent
    try:
        yield
    finally:
        launcher_api.LocalElasticAgent = original


def _describe(global_rank: int, local_rank: int, exitcode: int) -> str:
    """One line naming the failed rank and why: its exit status or signal, and for a rank whose
    output went to ``GPU_<k>.log`` that file and its last line (rank 0's error is on this console)."""
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "an unknown signal"
        how = f"was killed by {name} (signal {-exitcode})"
    else:
        how = f"exited with status {exitcode}"
    line = f"rank {global_rank} (local rank {local_rank}) {how}"
    if local_rank == 0:
        return line + " (its output is above)"
    log = f"GPU_{local_rank}.log"
    last = _last_line(log)
    return f"{line} (log: {log})" + (f": {last}" if last else "")


def _last_line(path: str, tail: int = 4096) -> str:
    """The last non-empty line of ``path`` (at most 300 characters), or ''."""
    try:
        with open(path, "rb") as file:
            file.seek(max(0, os.path.getsize(path) - tail))
            lines = file.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return last[:300]


def run_rank(script: str, script_args: Sequence[str]) -> None:
    """In a rank's process: send local rank k > 0's output to GPU_<k>.log, then become the script.

    A shell-free ``exec`` keeps the process id the agent knows (its signals reach the script), and
    one file description for both streams keeps their lines in order.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank > 0:
        restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if restarted else os.O_TRUNC)
        log = os.open(f"GPU_{local_rank}.log", flags, 0o644)
        os.dup2(log, sys.stdout.fileno())
        os.dup2(log, sys.stderr.fileno())
        os.close(log)
    _die_with_parent()
    os.execv(sys.executable, [sys.executable, "-u", script, *script_args])


def _die_with_parent() -> None:
    """Get SIGTERM if the agent itself dies (e.g. SIGKILL), instead of living on (kept by exec)."""
    if sys.platform != "linux":
        return
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [RANK_ENTRY]:
        run_rank(argv[1], argv[2:])
    return launch(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
