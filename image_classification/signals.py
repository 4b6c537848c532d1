"""Who handles a shutdown signal: the training process's main thread, and nothing else.

SLURM preemption, ``docker stop``, Kubernetes and ``kill -TERM -- -PGID`` send SIGTERM to every
process of the job, and a terminal's Ctrl-C sends SIGINT to the whole foreground group. The main
thread of each training process owns the shutdown (:class:`image_classification.engine.loop.GracefulStop`:
finish the optimizer step, checkpoint, exit 0); its helpers must live through the signal until
the main process retires them:

* DataLoader worker processes ignore SIGINT, and SIGTERM unless the training process sent it
  (:func:`ignore_in_worker`, their ``worker_init_fn``). Without it a worker dies first and the
  main process ends with "DataLoader worker ... is killed by signal" before it can checkpoint.
* Threads (DALI's, the DataLoader's pin-memory thread) and worker processes are started with the
  signals blocked (:func:`held`): the threads inherit the mask, so the kernel delivers the signal
  to the main thread and never interrupts a helper's system call; a process forked in that window
  keeps the signal pending until :func:`ignore_in_worker` discards it.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

SHUTDOWN = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def held():
    """Block the shutdown signals in this thread meanwhile; threads and processes started inside
    inherit the mask. A signal that arrives meanwhile is handled when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread handles signals (and starts the helpers)
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_in_worker(worker_id: int | None = None, owner: int | None = None) -> None:
    """``worker_init_fn``: this helper process ignores SIGINT and every SIGTERM but its owner's
    (the process that started the loader; the parent unless given: under the forkserver start
    method, Python 3.14's default, the parent is the fork server).

    The main process stops it: by the DataLoader's shutdown protocol, or, for a worker still running
    when the interpreter exits, by ``Process.terminate()`` (a SIGTERM from the owner) in
    multiprocessing's exit hook, which then waits for it. A worker deaf to that SIGTERM made a
    process whose loader outlived its last reference hang at exit forever. So SIGTERM stays blocked
    in every thread of the worker, and one thread takes each one with its sender's pid
    (``sigwaitinfo``): the owner's ends the worker, anyone else's (a signal to the whole process
    group) is dropped.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # also discards one pending from the held() window
    signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN)  # this thread's mask; new threads inherit it
    threading.Thread(target=_obey_owner_only, args=(owner or os.getppid(),), name="sigterm-from-owner",
                     daemon=True).start()


def _obey_owner_only(owner: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == owner:
            os._exit(128 + signal.SIGTERM)  # what the default action reports as a status to a shell
