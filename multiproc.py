#!/usr/bin/env python
"""Start one process per device on this node, with the environment torchrun would give them.

    python multiproc.py --nproc_per_node 8 main.py /imagenet ...
    python multiproc.py --nnodes 2 --node_rank 0 --master_addr node0 --nproc_per_node 8 launch.py ...

Each child runs ``python -u SCRIPT ARGS`` with MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK,
LOCAL_RANK and LOCAL_WORLD_SIZE set. Local rank 0 writes to this console; local rank k > 0 writes
stdout and stderr to ``GPU_<k>.log`` in the working directory.

Faults: when a child exits with a non-zero status, the others get SIGTERM and, after
``--grace_period`` seconds, SIGKILL; multiproc.py then exits with the failed child's status.
SIGINT and SIGTERM sent to multiproc.py are forwarded to every child (which finish their step,
checkpoint and exit); multiproc.py waits for them and exits with 128 + the signal number.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO, Sequence

POLL_SECONDS = 0.1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multiproc.py", allow_abbrev=False,
        description="Start --nproc_per_node copies of a training script on this node.")
    parser.add_argument("--nnodes", type=int, default=1, help="number of nodes (default: 1)")
    parser.add_argument("--node_rank", type=int, default=0, help="rank of this node, 0..nnodes-1 (default: 0)")
    parser.add_argument("--nproc_per_node", type=int, default=1,
                        help="processes on this node, normally one per GPU (default: 1)")
    parser.add_argument("--master_addr", default="127.0.0.1",
                        help="address of the node with rank 0 (default: 127.0.0.1)")
    parser.add_argument("--master_port", type=int, default=29500, help="free port on the master node (default: 29500)")
    parser.add_argument("--grace_period", type=float, default=10.0, metavar="SECONDS",
                        help="after a child fails, wait this long for the others to stop on SIGTERM "
                             "before killing them (default: 10)")
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
    return args


def child_env(args: argparse.Namespace, local_rank: int, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(
        MASTER_ADDR=args.master_addr, MASTER_PORT=str(args.master_port),
        WORLD_SIZE=str(args.nnodes * args.nproc_per_node),
        RANK=str(args.node_rank * args.nproc_per_node + local_rank),
        LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(args.nproc_per_node), GROUP_RANK=str(args.node_rank))
    if "OMP_NUM_THREADS" not in env and args.nproc_per_node > 1:
        # N processes each using every core would oversubscribe the CPU (as torchrun, but with a
        # fair share instead of 1 thread, which would starve CPU training).
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc_per_node))
    return env


def _die_with_parent() -> None:
    """In the child: get SIGTERM if multiproc.py itself dies (e.g. SIGKILL), instead of living on."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


@dataclass
class Child:
    local_rank: int
    process: subprocess.Popen
    log: IO | None

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.running:
            try:
                os.kill(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def kill_all(self) -> None:
        """SIGKILL the child and whatever it started (it leads its own process group)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def start(args: argparse.Namespace) -> list[Child]:
    children = []
    command = [sys.executable, "-u", args.training_script, *args.training_script_args]
    for local_rank in range(args.nproc_per_node):
        log = None if local_rank == 0 else open(f"GPU_{local_rank}.log", "w")
        # Own session: a terminal Ctrl-C reaches only multiproc.py, which forwards it exactly once
        # (a second SIGINT means "stop now" to main.py).
        process = subprocess.Popen(command, env=child_env(args, local_rank), stdout=log,
                                   stderr=subprocess.STDOUT if log else None, start_new_session=True,
                                   preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        children.append(Child(local_rank, process, log))
    return children


def supervise(children: list[Child], grace_period: float) -> int:
    """Wait for every child; return the exit status for multiproc.py."""
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        for child in children:
            child.signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    failure: tuple[Child, int] | None = None
    kill_at = None
    try:
        while any(child.running for child in children):
            if failure is None:
                failure = next(((c, c.process.returncode) for c in children
                                if not c.running and c.process.returncode != 0), None)
                if failure is not None:
                    _report_failure(*failure)
                    for child in children:
                        child.signal(signal.SIGTERM)
                    kill_at = time.monotonic() + grace_period
            if kill_at is not None and time.monotonic() >= kill_at:
                for child in children:
                    if child.running:
                        child.kill_all()
                kill_at = None
            time.sleep(POLL_SECONDS)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for child in children:
            child.process.wait()
            if child.log:
                child.log.close()
    if failure is None:
        failure = next(((c, c.process.returncode) for c in children if c.process.returncode != 0), None)
        if failure is not None and not received:
            _report_failure(*failure)
    if received:
        return 128 + received[0]
    if failure is not None:
        return _exit_status(failure[1])
    return 0


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N -> 128 + N


def _report_failure(child: Child, returncode: int) -> None:
    where = " (log: GPU_%d.log)" % child.local_rank if child.log else ""
    how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited with status {returncode}"
    print(f"multiproc.py: local rank {child.local_rank} {how}{where}; stopping the other processes",
          file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    children = start(args)
    return supervise(children, args.grace_period)


if __name__ == "__main__":
    sys.exit(main())
