"""How much does main.py's training loop cost over a bare PyTorch loop?

Runs, alternately and in one process, (a) ``main.py`` on the synthetic backend (training only, no
checkpoints) and (b) a minimal hand-written loop with the same model, batch, precision, memory
format, optimizer and synthetic data, and prints both throughputs (images / wall time, first
iteration excluded in both) and their ratio.

    python benchmarks/bench_training_loop.py                       # resnet50, 224 px, --amp, auto memory format
    python benchmarks/bench_training_loop.py --arch resnet18 --image-size 128 --batch-size 32 --iterations 30
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from image_classification import cli, machine, models, precision  # noqa: E402
from image_classification.reporting.dllogger import read_raport  # noqa: E402


def main_py_throughput(args) -> float:
    with tempfile.TemporaryDirectory() as workspace:
        argv = ["--data-backend", "synthetic", "--arch", args.arch, "--image-size", str(args.image_size),
                "-b", str(args.batch_size), "--synthetic-epoch-size", str(args.batch_size * args.iterations),
                "--epochs", "1", "--training-only", "--no-checkpoints", "--workers", "0", "--seed", "0",
                "--print-freq", str(10 ** 6), "--lr", "0.1", "--workspace", workspace, "--device", args.device,
                "--memory-format", args.memory_format, "--num-classes", "1000"]
        if args.amp:
            argv.append("--amp")
        status = cli.main(argv)
        if status != 0:
            raise SystemExit(f"main.py failed with status {status}")
        epoch = [r for r in read_raport(Path(workspace) / "experiment_raport.json")
                 if r.get("type") == "LOG" and r["step"] == [0]][0]
        return epoch["data"]["train.total_ips"]


def bare_loop_throughput(args) -> float:
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    amp_dtype = precision.choose(device.type, args.amp).amp_dtype  # as main.py --amp decides it
    memory_format = precision.memory_format(args.memory_format, device.type, "train", amp_dtype)
    model = models.get(args.arch).build(num_classes=1000).to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = torch.nn.CrossEntropyLoss()
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device,
                         generator=generator).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device, generator=generator)
    start = None
    for iteration in range(args.iterations):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if iteration == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.batch_size * (args.iterations - 1) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; medians are reported")
    parser.add_argument("--memory-format", default="auto", choices=("nchw", "nhwc", "auto"))
    parser.add_argument("--no-amp", dest="amp", action="store_false")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    print(machine.describe(), flush=True)

    results: dict[str, list[float]] = {"main.py": [], "bare loop": []}
    for _ in range(args.repeats):
        results["bare loop"].append(bare_loop_throughput(args))
        results["main.py"].append(main_py_throughput(args))
    medians = {name: statistics.median(values) for name, values in results.items()}
    ratio = medians["main.py"] / medians["bare loop"]
    chosen = precision.choose(args.device, args.amp).name
    setting = (f"{args.arch}, {args.image_size}px, batch {args.batch_size}, {chosen}, {args.memory_format}, "
               f"{args.device}, {args.iterations} iterations x {args.repeats} repeats")
    if args.json:
        print(json.dumps({"setting": setting, "runs": results, "median": medians, "ratio": ratio}))
        return
    print(f"\n{setting}")
    print(f"{'loop':<12}{'img/s (median)':>16}   runs")
    for name, values in results.items():
        print(f"{name:<12}{medians[name]:>16.2f}   " + ", ".join(f"{v:.2f}" for v in values))
    print(f"ratio main.py / bare loop: {ratio:.3f}")


if __name__ == "__main__":
    main()
