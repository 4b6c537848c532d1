"""Large batch by accumulation: plain SGD vs LARS (and optionally LAMB) under the same LR scaling rule.

    flock -x /tmp/cpu.lock python benchmarks/large_batch.py [--epochs 16] [--large-batch 512] [--lamb]

One machine, the bundled handwritten digits (scikit-learn's, 32 px JPEGs: 1437 train, 360 val),
ResNet18 at 32 px, bf16 + channels_last, seed 1. Every run uses the same recipe except the
optimizer and the global batch: ``-b 32``, the LR given per 256 images and scaled linearly to the
global batch (``--lr-base-batch 256``, the rule of Goyal et al.), two warmup epochs, poly decay of
power 2 per iteration (the MLPerf schedule), label smoothing 0.1, weight decay 5e-5, validation
after the last epoch only. Runs:

* ``sgd`` at the small batch (32): the reference accuracy;
* ``sgd`` at the large batch (``--large-batch``, reached by accumulating 32-image micro-batches,
  so it fits any machine), with the same per-256 LR scaled linearly;
* ``lars`` at the large batch (trust coefficient 0.001, MLPerf's), with its own per-256 LR scaled
  by the same rule (LARS LRs are per-layer-normalised, so its LR is on another scale; MLPerf's
  11.0 at 3,200 is 0.88 per 256);
* with ``--lamb``: ``lamb`` at the large batch (LR per 256 ``--lamb-lr``, scaled by the square root rule
  of the LAMB paper).

Printed side by side: optimizer, global batch, optimizer steps, effective LR, final val top-1,
wall time. A larger batch means fewer optimizer steps for the same epochs, so it is expected to
lose some accuracy; the question is how much each optimizer loses. Whatever the figures say is the
result (nothing is tuned per run beyond the LRs printed). Full run: about 3 minutes (4 with
``--lamb``) on 2 otherwise idle cores, estimated from the quickstart's speed; not yet measured.
``--smoke`` runs one epoch of 4 batches per run, only to check that the script works.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from image_classification import machine  # noqa: E402

from image_classification.data.prepare.digits import write_digits  # noqa: E402

MICRO_BATCH = 32
TRAIN_IMAGES = 1437  # the digits' training split


def _records(raport: Path) -> list[dict]:
    return [json.loads(line[5:]) for line in raport.read_text().splitlines() if line.startswith("DLLL ")]


def run(name: str, optimizer: str, lr_per_256: float, global_batch: int, scaling: str, epochs: int, data: Path,
        workdir: Path, workers: int, smoke: bool) -> dict:
    workspace = workdir / name
    args = ["--arch", "resnet18", "--data-backend", "pytorch", "--image-size", "32", "--val-resize-size", "32",
            "--crop-scale", "0.7", "1", "-b", str(MICRO_BATCH), "--optimizer-batch-size", str(global_batch),
            "--optimizer", optimizer, "--lr", str(lr_per_256), "--lr-base-batch", "256", "--lr-scaling", scaling,
            "--lr-schedule", "poly", "--warmup", "2", "--lr-granularity", "iteration", "--end-lr", "0",
            "--label-smoothing", "0.1", "--weight-decay", "5e-5", "--epochs", str(epochs),
            "--eval-every", str(epochs), "--amp", "--memory-format", "nhwc", "--workers", str(workers),
            "--seed", "1", "--device", "cpu", "--print-freq", "1000", "--no-checkpoints",
            "--workspace", str(workspace), str(data)]
    if smoke:
        args += ["--prof", "4"]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"{name}: main.py {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    records = _records(workspace / "experiment_raport.json")
    parameters = next(r["data"] for r in records if r.get("step") == "PARAMETER")
    summary = [r["data"] for r in records if r.get("step") == []][-1]
    iterations = [r for r in records if isinstance(r.get("step"), list) and len(r["step"]) == 1]
    return {"run": name, "optimizer": optimizer, "global_batch": parameters["global_batch"],
            "lr": parameters["effective_lr"], "epochs": len(iterations), "top1": summary.get("val.top1", float("nan")),
            "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--large-batch", type=int, default=512, help="global batch of the large runs (multiple of 32)")
    parser.add_argument("--sgd-lr", type=float, default=0.32, help="SGD LR per 256 images (the quickstart's 0.04 at 32)")
    parser.add_argument("--lars-lr", type=float, default=0.88, help="LARS LR per 256 images (MLPerf's 11.0 at 3,200)")
    parser.add_argument("--lamb", action="store_true", help="also run LAMB at the large batch")
    parser.add_argument("--lamb-lr", type=float, default=0.002, help="LAMB LR per 256 images (sqrt scaling)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="one epoch of 4 batches per run (checks the script)")
    args = parser.parse_args(argv)
    if args.large_batch % MICRO_BATCH:
        parser.error(f"--large-batch must be a multiple of {MICRO_BATCH}")
    print(machine.describe(), flush=True)
    epochs = 1 if args.smoke else args.epochs
    data = Path(tempfile.gettempdir()) / "convnets-digits32"
    write_digits(str(data), size=32)
    plan = [("sgd-small", "sgd", args.sgd_lr, MICRO_BATCH, "linear"),
            ("sgd-large", "sgd", args.sgd_lr, args.large_batch, "linear"),
            ("lars-large", "lars", args.lars_lr, args.large_batch, "linear")]
    if args.lamb:
        plan.append(("lamb-large", "lamb", args.lamb_lr, args.large_batch, "sqrt"))
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, optimizer, lr, batch, scaling in plan:
            rows.append(run(name, optimizer, lr, batch, scaling, epochs, data, Path(workdir), args.workers, args.smoke))
            print(f"done: {name}", file=sys.stderr, flush=True)
    batches = 4 if args.smoke else -(-TRAIN_IMAGES // MICRO_BATCH)  # per epoch; the last one is short
    print(f"{'run':11} {'optimizer':9} {'global batch':>12} {'steps':>6} {'LR':>8} {'top-1 %':>8} {'wall s':>7}")
    for row in rows:
        steps = -(-batches // (row["global_batch"] // MICRO_BATCH)) * row["epochs"]
        print(f"{row['run']:11} {row['optimizer']:9} {row['global_batch']:12d} {steps:6d} {row['lr']:8.4f} "
              f"{row['top1']:8.2f} {row['seconds']:7.1f}")
    small = rows[0]["top1"]
    for row in rows[1:]:
        print(f"{row['run']}: {row['top1'] - small:+.2f} points vs sgd at batch {MICRO_BATCH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
