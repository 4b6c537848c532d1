"""What does the per-step stop vote cost? (engine.loop.GracefulStop, issue 9 item 2)

Two gloo ranks (forked on this host) train a DDP model on random data and alternate, round by
round, between steps with the vote (``stop()`` polled after every optimizer step, as main.py does)
and steps without it. Prints both step rates and their ratio, from the same process pair, and the
median time spent inside ``stop()`` (the only part of the vote that can hold a step up: the
all-reduce itself runs in gloo's background thread while the next step computes).

    python benchmarks/bench_stop_vote.py                      # resnet18, 64 px, batch 16, 2 x 5 rounds of 20 steps
    python benchmarks/bench_stop_vote.py --arch tiny --rounds 10 --steps 50   # a tiny model: the vote's share is largest
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from image_classification import machine, models  # noqa: E402
from image_classification.engine import loop  # noqa: E402


def build(arch: str) -> nn.Module:
    if arch == "tiny":
        return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, 10))
    return models.get(arch).build(num_classes=10)


def rank_main(rank: int, port: int, args, results) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(build(args.arch))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 10, (args.batch_size,))
    stop = loop.GracefulStop()

    in_poll = []  # seconds spent inside stop() per step: the part of the vote that can block

    def steps(vote: bool) -> float:
        torch.distributed.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if vote:
                poll_start = time.perf_counter()
                if stop():
                    raise SystemExit("unexpected stop")
                in_poll.append(time.perf_counter() - poll_start)
        stop.agreed()  # settle the last vote inside the timed region
        return args.steps / (time.perf_counter() - start)

    steps(True), steps(False)  # warm-up
    in_poll.clear()
    rates = {True: [], False: []}
    for round_ in range(args.rounds):
        for vote in ((True, False) if round_ % 2 == 0 else (False, True)):
            rates[vote].append(steps(vote))
    if rank == 0:
        results.put({**{vote: statistics.median(values) for vote, values in rates.items()},
                     "poll": statistics.median(in_poll)})
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18", help="a model name, or 'tiny' (default: resnet18)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each kind, alternating")
    args = parser.parse_args()
    print(machine.describe(), flush=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    ranks = [context.Process(target=rank_main, args=(rank, port, args, results)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    rates = results.get()
    for process in ranks:
        process.join()
    print(f"{args.arch}, {args.image_size} px, batch {args.batch_size} per rank, 2 gloo ranks, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print(f"  with the per-step stop vote:    {rates[True]:8.2f} steps/s")
    print(f"  without it:                     {rates[False]:8.2f} steps/s")
    print(f"  ratio (with / without):         {rates[True] / rates[False]:8.4f}")
    print(f"  time inside stop() per step:    {rates['poll'] * 1e6:8.1f} us (median), "
          f"{rates['poll'] * rates[False] * 100:.2f}% of a step without the vote")


if __name__ == "__main__":
    main()
