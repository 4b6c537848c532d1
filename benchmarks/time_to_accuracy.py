"""Time to accuracy: fixed-resolution training vs stage-wise training, side by side.

    flock -x /tmp/cpu.lock python benchmarks/time_to_accuracy.py [--epochs 6] [--n-stages 2] [--only digits]

For each dataset the same ``main.py`` run (model, epochs, batch, LR schedule, seed) is made twice:
at the full image size for every epoch, and stage-wise from half the size to the full size
(``--n-stages``, ``--base-image-size`` = size / 2). Both are ``--training-only`` runs, timed from
process start to exit (what a user waits for); the final checkpoint is then scored by
``main.py --evaluate`` at the full size, which is the same work for both and is not timed.

Datasets (written once under the system temp folder):

* ``digits``: scikit-learn's handwritten digits as 32 px JPEGs (1437 train, 360 val), ResNet18
  at 64 px with the README quickstart's recipe (stage-wise: 32 -> 64);
* ``shapes``: generated 128x96 JPEGs of 8 shape classes (circle, square, triangle, cross, ring,
  pentagon, bar, star) with random size, position, rotation and colours over a noisy background
  (1200 train, 400 val), ResNet18 at 64 px (stage-wise: 32 -> 64).

Runs are ``--amp --memory-format auto`` (bf16 + channels_last where the CPU has native bf16, fp32
elsewhere; image_classification/precision.py). Printed: wall time, final val
top-1 and the stage-wise / fixed wall-time ratio per dataset.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from image_classification import machine  # noqa: E402
from image_classification.data.prepare.digits import write_digits  # noqa: E402

SHAPES = ("circle", "square", "triangle", "cross", "ring", "pentagon", "bar", "star")
MARKER = ".shapes.json"


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    corners = {"square": 4, "triangle": 3, "pentagon": 5, "star": 10}[kind]
    points = []
    for i in range(corners):
        radius = r * (0.45 if kind == "star" and i % 2 else 1.0)
        a = angle + 2 * math.pi * i / corners
        points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return points


def write_shapes(root: Path, train_per_class: int = 150, val_per_class: int = 50, size=(128, 96),
                 seed: int = 0) -> Path:
    """An ImageFolder of generated shape images; reused when its marker matches the settings."""
    settings = {"train": train_per_class, "val": val_per_class, "size": list(size), "seed": seed, "version": 2}
    marker = root / MARKER
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return root
    rng = np.random.default_rng(seed)
    width, height = size
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label, kind in enumerate(SHAPES):
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                background = rng.integers(0, 256, 3)
                noise = rng.normal(0, 15, (height, width, 3))
                pixels = (background + noise).clip(0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
                draw = ImageDraw.Draw(image)
                r = rng.uniform(0.25, 0.45) * height
                cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
                angle = rng.uniform(0, 2 * math.pi)
                colour = tuple(int(c) for c in (background + rng.choice([-1, 1], 3) * rng.integers(80, 160, 3)) % 256)
                box = (cx - r, cy - r, cx + r, cy + r)
                line = max(2, int(r / 4))
                if kind == "circle":
                    draw.ellipse(box, fill=colour)
                elif kind == "ring":
                    draw.ellipse(box, outline=colour, width=line)
                elif kind == "cross":
                    for a in (angle, angle + math.pi / 2):
                        dx, dy = r * math.cos(a), r * math.sin(a)
                        draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=colour, width=line)
                elif kind == "bar":
                    dx, dy = r * math.cos(angle), r * math.sin(angle)
                    draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=colour, width=line)
                else:
                    draw.polygon(_polygon(kind, cx, cy, r, angle), fill=colour)
                image.save(folder / f"{index:04d}.jpg", quality=90)
    marker.write_text(json.dumps(settings))
    return root


def _main_py(args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"main.py {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return elapsed, result.stdout


def _top1(workspace: Path, common: list[str], data: Path) -> float:
    _, out = _main_py([*common, "--evaluate", "--resume", str(workspace / "checkpoint.pth.tar"),
                       "--workspace", str(workspace / "eval"), str(data)])
    raport = (workspace / "eval" / "experiment_raport.json").read_text().splitlines()
    records = [json.loads(line[5:]) for line in raport if line.startswith("DLLL ")]
    return float([r for r in records if r.get("step") == []][-1]["data"]["val.top1"])


def compare(name: str, data: Path, size: int, resize: int, epochs: int, n_stages: int, lr: float, batch: int,
            crop: float, workers: int, workdir: Path) -> list[dict]:
    common = ["--arch", "resnet18", "--data-backend", "pytorch", "--image-size", str(size),
              "--val-resize-size", str(resize), "-b", str(batch), "--amp", "--memory-format", "auto",
              "--workers", str(workers), "--seed", "1", "--device", "cpu", "--print-freq", "1000"]
    training = [*common, "--epochs", str(epochs), "--lr", str(lr), "--lr-schedule", "cosine",
                "--label-smoothing", "0.1", "--weight-decay", "5e-4", "--crop-scale", str(crop), "1", "--training-only"]
    rows = []
    for label, extra in (("fixed", []), ("stage-wise", ["--n-stages", str(n_stages), "--base-image-size",
                                                        str(size // 2)])):
        workspace = workdir / f"{name}-{label}"
        seconds, _ = _main_py([*training, *extra, "--workspace", str(workspace), str(data)])
        rows.append({"dataset": name, "run": label, "sizes": f"{size // 2}->{size}" if extra else str(size),
                     "seconds": seconds, "top1": _top1(workspace, common, data)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--n-stages", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", choices=("digits", "shapes"), default=None)
    args = parser.parse_args(argv)
    print(machine.describe(), flush=True)
    cache = Path(tempfile.gettempdir())
    digits = cache / "convnets-digits32"
    write_digits(str(digits), size=32)
    # name, folder, size, val resize, LR, batch, smallest crop (share of the area)
    datasets = [("digits", digits, 64, 64, 0.04, 32, 0.7),
                ("shapes", write_shapes(cache / "convnets-shapes"), 64, 72, 0.02, 32, 0.5)]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, data, size, resize, lr, batch, crop in datasets:
            if args.only in (None, name):
                rows += compare(name, data, size, resize, args.epochs, args.n_stages, lr, batch, crop, args.workers,
                                Path(workdir))
    print(f"{'dataset':8} {'run':11} {'train px':9} {'wall s':>7} {'top-1 %':>8}")
    for row in rows:
        print(f"{row['dataset']:8} {row['run']:11} {row['sizes']:9} {row['seconds']:7.1f} {row['top1']:8.2f}")
    for name in dict.fromkeys(row["dataset"] for row in rows):
        fixed, staged = (next(r for r in rows if r["dataset"] == name and r["run"] == run)
                         for run in ("fixed", "stage-wise"))
        print(f"{name}: stage-wise / fixed wall time {staged['seconds'] / fixed['seconds']:.2f}, "
              f"top-1 {staged['top1'] - fixed['top1']:+.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
