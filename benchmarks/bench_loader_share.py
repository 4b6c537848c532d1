"""How much of a training epoch does the data loader cost? Loader epoch vs the same step on a fixed batch.

    flock -x /tmp/cpu.lock python benchmarks/bench_loader_share.py            # 128, 96, 64 px; pytorch, dali-cpu
    flock -x /tmp/cpu.lock python benchmarks/bench_loader_share.py --sizes 128 --backends pytorch --rounds 1

For each image size, in one invocation and in alternating rounds, ``main.py`` trains one epoch
(``--training-only --no-checkpoints --print-freq 1``, ResNet18, batch 64, ``--amp --memory-format
auto``, ``-j 2``) on a folder of 2048 JPEGs of 500x375 px (512 generated images, q90, smooth colour
ramps plus sensor noise, each linked four times; written once under the temp folder) with each data
backend and with the ``synthetic`` backend (main.py without a loader). The reference is a bare loop
-- the same model, optimizer, precision and memory format (what --amp picks on this CPU), one fixed in-memory batch, nothing
else, timed the same way: the limit a loader can reach, as ``../shared/bench/bare_loop.py
--compute`` measures it. Every run is a fresh process.

A run's rate is the epoch throughput from its per-iteration records: all images / the sum of the
iterations' data-wait + compute times (the first one includes starting the loader's workers, and
the bare loop's first one its warm-up). The best of ``--rounds`` runs counts. The printed ratio,
rate / bare-loop rate, is the share of the epoch left to the model (1.0: the loader costs nothing);
the loader's cost is 1 - ratio (the ``synthetic`` row shows how much of it is main.py's own loop).

Speed figures mean something only when nothing else runs: on a shared machine take the exclusive
lock, as above.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from image_classification.reporting.dllogger import read_raport  # noqa: E402

WIDTH, HEIGHT = 500, 375
MARKER = ".bench-loader-share.json"
BARE = "bare loop"


def make_dataset(root: Path, images: int = 512, copies: int = 4, seed: int = 0) -> Path:
    """``root/train/class{0,1}``: ``images`` distinct 500x375 JPEGs, each linked ``copies`` times.

    Written once; a folder whose marker records the same settings is reused.
    """
    settings = {"images": images, "copies": copies, "seed": seed, "size": [WIDTH, HEIGHT]}
    marker = root / MARKER
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return root
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    x, y = x / WIDTH, y / HEIGHT
    for index in range(images):
        label = index % 2
        pixels = np.empty((HEIGHT, WIDTH, 3), np.float32)
        for channel in range(3):  # a ramp in a random direction plus a low-frequency wave
            angle, phase = rng.uniform(0, 2 * np.pi, 2)
            fx, fy = rng.uniform(0.5, 3.0, 2)
            low, high = np.sort(rng.uniform(0, 255, 2))
            ramp = np.cos(angle) * x + np.sin(angle) * y
            wave = np.sin(2 * np.pi * (fx * x + fy * y) + phase)
            pixels[..., channel] = low + (high - low) * (0.5 + 0.35 * ramp + 0.15 * wave)
        pixels[..., 0] += 40.0 * label
        pixels += rng.normal(0, 12, pixels.shape)
        folder = root / "train" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        source = root / "images" / f"{index:04d}.jpg"
        source.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(source, quality=90)
        for copy in range(copies):
            link = folder / f"{index:04d}_{copy}.jpg"
            if not link.exists():
                link.symlink_to(source)
    marker.write_text(json.dumps(settings))
    return root


def epoch_rate(backend: str, data: Path, size: int, args) -> float:
    """Images per second of one ``main.py`` training epoch, from its per-iteration records."""
    with tempfile.TemporaryDirectory() as workspace:
        command = [sys.executable, str(ROOT / "main.py"), "--data-backend", backend, "--arch", args.arch,
                   "--image-size", str(size), "-b", str(args.batch_size), "-j", str(args.workers),
                   "--epochs", "1", "--training-only", "--no-checkpoints", "--print-freq", "1", "--seed", "0",
                   "--num-classes", "2", "--amp", "--memory-format", "auto", "--device", "cpu",
                   "--workspace", workspace]
        if backend == "synthetic":
            command += ["--synthetic-epoch-size", str(args.images * args.copies)]
        else:
            command.append(str(data))
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=workspace)
        steps: dict[tuple, dict] = {}
        for record in read_raport(Path(workspace) / "experiment_raport.json"):
            step = record.get("step")
            if record.get("type") == "LOG" and isinstance(step, list) and len(step) == 2:
                steps.setdefault(tuple(step), {}).update(record["data"])
    times = [d["train.data_time"] + d["train.compute_time"] for _, d in sorted(steps.items())
             if "train.compute_time" in d]
    if not times:
        raise SystemExit(f"no per-iteration records from {backend}")
    return len(times) * args.batch_size / sum(times)


def fixed_batch_rate(size: int, args) -> float:
    """Images per second of the bare training step on one in-memory batch, in a fresh process."""
    command = [sys.executable, __file__, "--fixed-batch", str(size), "--arch", args.arch,
               "-b", str(args.batch_size), "--images", str(args.images), "--copies", str(args.copies)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def run_fixed_batch(size: int, args) -> None:
    """The bare loop: as many steps as a loader epoch has, each timed from the end of the last."""
    import torch  # noqa: PLC0415 -- only this child process needs it

    from image_classification import models, precision  # noqa: PLC0415

    torch.manual_seed(0)
    amp_dtype = precision.choose("cpu", amp=True).amp_dtype  # as main.py --amp --memory-format auto
    memory_format = precision.memory_format("auto", "cpu", "train", amp_dtype)
    model = models.get(args.arch).build(num_classes=2).to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
    images = torch.randn(args.batch_size, 3, size, size).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 2, (args.batch_size,))
    steps = args.images * args.copies // args.batch_size
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()
    print(steps * args.batch_size / (time.perf_counter() - start))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 96, 64])
    parser.add_argument("--backends", nargs="+", default=["pytorch", "dali-cpu"])
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each; the best counts (default: 2)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("-b", "--batch-size", type=int, default=64)
    parser.add_argument("-j", "--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=512, help="distinct JPEGs (default: 512)")
    parser.add_argument("--copies", type=int, default=4, help="links to each JPEG (default: 4: 2048 per epoch)")
    parser.add_argument("--data", type=Path, default=None, help="ImageFolder root (default: generated, cached)")
    parser.add_argument("--fixed-batch", type=int, metavar="PX", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.fixed_batch:
        run_fixed_batch(args.fixed_batch, args)
        return 0

    from image_classification import machine, precision  # noqa: PLC0415
    print(machine.describe(), flush=True)
    chosen = precision.choose("cpu", amp=True)
    data = args.data or make_dataset(Path(tempfile.gettempdir()) / "convnets-bench-loader-share",
                                     args.images, args.copies)
    runs = [BARE, "synthetic"] + args.backends
    print(f"{args.arch}, batch {args.batch_size}, --amp ({chosen.name}), --memory-format auto, -j {args.workers}, {data}, "
          f"{os.cpu_count()} CPUs, best of {args.rounds} round(s)", flush=True)
    best: dict[tuple[int, str], float] = {}
    for size in args.sizes:
        for turn in range(args.rounds):
            for backend in runs:
                rate = fixed_batch_rate(size, args) if backend == BARE else epoch_rate(backend, data, size, args)
                print(f"  {size:4d} px  round {turn + 1}  {backend:<10} {rate:7.1f} img/s", flush=True)
                best[size, backend] = max(best.get((size, backend), 0.0), rate)
    print(f"\n{'size':>5}  {'run':<10} {'img/s':>7}  {'ratio to bare loop':>18}")
    for size in args.sizes:
        limit = best[size, BARE]
        for backend in runs:
            print(f"{size:5d}  {backend:<10} {best[size, backend]:7.1f}  {best[size, backend] / limit:18.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
