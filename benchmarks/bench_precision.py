"""Precision x memory format x eager/compiled, for training and inference, in one run (CPU).

For every ``--arch`` and task -- ``train`` (forward, backward and an SGD step, as main.py) and
``infer`` (classify.py's path: BatchNorm folded, bf16 weights under bf16) -- every combination
of precision (fp32, bf16), memory format (nchw, nhwc) and mode (eager, ``torch.compile``) runs
on one fixed synthetic batch. Rounds alternate between the combinations (the machine's speed
drifts); the best round counts. Compilation is timed apart: the first step of a compiled
combination, shown as ``first step s``, is never part of img/s.

The table marks the row ``--amp`` picks on this machine (``precision.choose``: bf16 where the
CPU has native bf16, fp32 elsewhere; format from ``precision.MEMORY_FORMAT_TABLE``), and the
closing lines compare that choice with the fastest combination per task: where they differ,
update ``MEMORY_FORMAT_TABLE`` (the table's only source is this script's output, from at least
a CPU with and one without native bf16). bf16 on a CPU without native bf16 is emulated; its rows
show how much slower that is.

    python benchmarks/bench_precision.py                                    # the full comparison
    python benchmarks/bench_precision.py --arch resnet18 --image-size 32 -b 2 --iterations 1 --rounds 1 \\
        --backend eager                                                     # a smoke run (seconds)
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from image_classification import compiling, machine, models, precision  # noqa: E402
from image_classification.deploy import fast_cpu  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def build_step(arch: str, task: str, dtype: torch.dtype | None, memory_format: torch.memory_format,
               compiler: compiling.Compiler | None, batch: int, size: int):
    """One training or inference step of ``arch`` on a fixed batch, as a no-argument callable."""
    torch.manual_seed(0)
    model = models.get(arch).build(num_classes=1000)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 1000, (batch,))
    autocast = dict(device_type="cpu", dtype=dtype or torch.float32, enabled=dtype is not None)
    if task == "infer":
        runner = compiling.view(compiler)(fast_cpu.cpu_fast_path(model.eval(), dtype, memory_format))

        def step():
            with torch.no_grad(), torch.autocast(**autocast):
                runner(images)
        return step
    model = model.to(memory_format=memory_format).train()
    runner = compiling.view(compiler)(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        with torch.autocast(**autocast):
            loss = torch.nn.functional.cross_entropy(runner(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def measure(args) -> list[dict]:
    rows = []
    for arch, task in itertools.product(args.arch, args.tasks):
        combos = {}
        for (name, dtype), fmt, mode in itertools.product(DTYPES.items(), ("nchw", "nhwc"), args.modes):
            compiler = compiling.Compiler(args.backend, shapes=1) if mode == "compiled" else None
            step = build_step(arch, task, dtype, precision.MEMORY_FORMATS[fmt], compiler, args.batch_size,
                              args.image_size)
            start = time.perf_counter()
            step()  # the first step: compilation when compiled, one-time set-up otherwise
            combos[name, fmt, mode] = {"step": step, "first": time.perf_counter() - start, "ips": 0.0}
            print(f"  {arch} {task} {name} {fmt} {mode}: first step {combos[name, fmt, mode]['first']:.1f} s",
                  file=sys.stderr, flush=True)
        for turn in range(args.rounds):
            for key, combo in combos.items():
                start = time.perf_counter()
                for _ in range(args.iterations):
                    combo["step"]()
                ips = args.iterations * args.batch_size / (time.perf_counter() - start)
                combo["ips"] = max(combo["ips"], ips)
                print(f"  round {turn + 1} {arch} {task} {' '.join(key)}: {ips:.1f} img/s", file=sys.stderr,
                      flush=True)
        for (name, fmt, mode), combo in combos.items():
            rows.append({"arch": arch, "task": task, "precision": name, "format": fmt, "mode": mode,
                         "ips": combo["ips"], "first": combo["first"]})
    return rows


def auto_choice(task: str) -> tuple[str, str]:
    """What --amp (and --memory-format auto) picks on this machine for ``task``."""
    chosen = precision.choose("cpu", amp=True)
    fmt = precision.memory_format("auto", "cpu", task, chosen.amp_dtype)
    return chosen.name, precision.format_name(fmt)


def report(rows: list[dict], args) -> str:
    lines = [f"batch {args.batch_size}, {args.image_size} px, {args.iterations} steps per round, best of "
             f"{args.rounds} alternating rounds, compiled with {args.backend}",
             "| arch | task | precision | format | mode | img/s | vs eager fp32 nchw | first step (s) | --amp picks |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        base = next(r["ips"] for r in rows if (r["arch"], r["task"], r["precision"], r["format"], r["mode"])
                    == (row["arch"], row["task"], "fp32", "nchw", "eager"))
        picked = (row["precision"], row["format"]) == auto_choice(row["task"]) and row["mode"] == "eager"
        lines.append(f"| {row['arch']} | {row['task']} | {row['precision']} | {row['format']} | {row['mode']} | "
                     f"{row['ips']:.1f} | {row['ips'] / base:.2f}x | {row['first']:.1f} | {'<-' if picked else ''} |")
    for arch, task in itertools.product(args.arch, args.tasks):
        group = [r for r in rows if (r["arch"], r["task"]) == (arch, task)]
        fastest = max(group, key=lambda r: r["ips"])
        eager = max((r for r in group if r["mode"] == "eager"), key=lambda r: r["ips"])
        picked = next(r for r in group if (r["precision"], r["format"]) == auto_choice(task) and r["mode"] == "eager")
        lines.append(f"{arch} {task}: --amp picks {picked['precision']}+{picked['format']} ({picked['ips']:.1f} img/s, "
                     f"{picked['ips'] / eager['ips']:.2f}x the fastest eager {eager['precision']}+{eager['format']}); "
                     f"fastest overall {fastest['precision']}+{fastest['format']} {fastest['mode']} "
                     f"({fastest['ips']:.1f} img/s)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["resnet18", "resnet50", "efficientnet-b0"])
    parser.add_argument("--tasks", nargs="+", default=["train", "infer"], choices=("train", "infer"))
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=("eager", "compiled"))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("-b", "--batch-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=10, help="steps per round (default: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best counts (default: 3)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor)")
    args = parser.parse_args(argv)
    print(machine.describe(), flush=True)
    print(report(measure(args), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
