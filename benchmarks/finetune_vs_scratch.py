"""Fine-tuning from weights trained on another dataset vs training from scratch, same epochs.

    flock -x /tmp/cpu.lock python benchmarks/finetune_vs_scratch.py [--epochs 10] [--seeds 1 2 3]

Two datasets from the bundled handwritten digits (scikit-learn's, 32 px JPEGs), with different
classes: the *source* is digits 0-5 (866 training images), the *target* digits 6-9 with only 20
training images per class (80; validation: all 143 of 6-9). A ResNet18 is trained on the source
once (the quickstart's recipe, ``--source-epochs``), then three runs train on the target with the
same recipe and epochs, differing only in where they start:

* ``scratch``: random initialisation;
* ``finetune``: the source weights, all but the classifier (6 -> 4 classes: a new one), all layers
  at the same LR;
* ``probe+finetune``: the same weights, ``--freeze-backbone-epochs 2`` (the classifier alone for two
  epochs) and ``--backbone-lr-scale 0.1``.

Printed: the machine, then per run and seed the final val top-1 and the wall time, and the mean
over seeds. Whatever the figures say is the result (README, "Fine-tune on your own data": on 2 shared
cores of an Intel Xeon, seeds 1-2, scratch 86.36 % vs fine-tuned 79.37 %). About 4 minutes per run on
2 loaded cores. ``--smoke`` runs 1 epoch of 2 batches per run; ``--source CKPT`` reuses a source model.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from image_classification import machine  # noqa: E402
from image_classification.data.prepare.digits import write_digits  # noqa: E402

RECIPE = ["--arch", "resnet18", "--data-backend", "pytorch", "--image-size", "32", "--val-resize-size", "32",
          "--crop-scale", "0.7", "1", "-b", "16", "--lr", "0.04", "--lr-schedule", "cosine", "--label-smoothing", "0.1",
          "--weight-decay", "5e-4", "--amp", "--memory-format", "auto", "--device", "cpu", "--print-freq", "1000"]
RUNS = {"scratch": [], "finetune": ["--pretrained-from-file", "{source}"],
        "probe+finetune": ["--pretrained-from-file", "{source}", "--freeze-backbone-epochs", "2",
                           "--backbone-lr-scale", "0.1"]}


def train(args: list[str], workspace: Path, data: Path) -> tuple[float, float]:
    """(final val top-1, wall seconds) of one main.py run."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), *args, "--workspace", str(workspace), str(data)],
                            capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"main.py {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    records = [json.loads(line[5:]) for line in (workspace / "experiment_raport.json").read_text().splitlines()
               if line.startswith("DLLL ")]
    epochs = [r["data"] for r in records if isinstance(r.get("step"), list) and len(r["step"]) == 1]
    return epochs[-1]["val.top1"], seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every target run")
    parser.add_argument("--source-epochs", type=int, default=5)
    parser.add_argument("--source", default=None, metavar="CKPT",
                        help="a source checkpoint trained before (by this script) instead of training it again")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="1 epoch of 2 batches per run (checks the script)")
    args = parser.parse_args(argv)
    print(machine.describe(), flush=True)
    data = Path(tempfile.gettempdir())
    source_data, target_data = data / "convnets-digits-0to5", data / "convnets-digits-6to9-20"
    write_digits(str(source_data), size=32, classes=list(range(6)))
    write_digits(str(target_data), size=32, classes=[6, 7, 8, 9], train_per_class=20)
    smoke = ["--prof", "2"] if args.smoke else []
    common = [*RECIPE, "--workers", str(args.workers), *smoke]
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        source = args.source
        if source is None:
            top1, seconds = train([*common, "--epochs", str(1 if args.smoke else args.source_epochs), "--seed", "1"],
                                  work / "source", source_data)
            print(f"source: digits 0-5, val top-1 {top1:.2f} % after {args.source_epochs} epochs ({seconds:.0f} s)",
                  flush=True)
            source = str(work / "source" / "checkpoint.pth.tar")
        for seed in args.seeds:
            for name, extra in RUNS.items():
                run_args = [*common, "--epochs", str(1 if args.smoke else args.epochs), "--seed", str(seed),
                            *[value.format(source=source) for value in extra]]
                rows[name].append(train(run_args, work / f"{name}-{seed}", target_data))
                print(f"done: {name} seed {seed}: {rows[name][-1][0]:.2f} %", file=sys.stderr, flush=True)
    print(f"target: digits 6-9, 20 training images per class, {args.epochs} epochs, seeds {args.seeds}")
    print(f"{'run':15} {'val top-1 % per seed':>28} {'mean':>7} {'wall s (mean)':>14}")
    for name, results in rows.items():
        per_seed = " ".join(f"{top1:6.2f}" for top1, _ in results)
        print(f"{name:15} {per_seed:>28} {statistics.mean(t for t, _ in results):7.2f} "
              f"{statistics.mean(s for _, s in results):14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
