"""What training from the packed form costs in accuracy: the digits from their folder vs packed, same runs.

    flock -x /tmp/cpu.lock python benchmarks/bench_packed_accuracy.py                     # 6 epochs, seeds 1 2 3
    python benchmarks/bench_packed_accuracy.py --epochs 1 --seeds 1                       # a quick check that it runs

``prepare --to packed`` stores every image with its shorter side capped at ``--max-size``, and the
training random-resized crop is then drawn from the stored image rather than from the original: a
crop of the same share of the area has fewer source pixels, so it is enlarged more (or shrunk less)
to ``--image-size``. Validation resizes the shorter side to ``--val-resize-size`` in both cases, so
with ``--max-size`` equal to it the validation pixels differ only by resampling twice.

scikit-learn's digits are exported at ``--export-size`` px (default 64: twice the crop, so the cap
matters), then packed raw and as JPEG q90 with the cap at the validation resize (default 36 for
32 px crops). ResNet18 trains on each form with the README quickstart's recipe (bf16/fp32 by
``--amp``, ``--memory-format auto``), the same seed, epochs and batches; the table gives the final
and best val top-1 per seed and the mean difference to the folder. A control row packs without a cap
(``--max-size`` = the export size: nothing resized), which must equal the folder's run exactly.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_loader_share import packed_copy  # noqa: E402  (this folder is sys.path[0] when run as a script)
from image_classification import machine  # noqa: E402
from image_classification.data.prepare.digits import write_digits  # noqa: E402
from image_classification.reporting.dllogger import read_raport  # noqa: E402


def forms(root: Path, args) -> dict[str, Path]:
    """The dataset as a folder and in each packed form compared (written once, kept for reruns)."""
    folder = root / f"digits-{args.export_size}"
    write_digits(str(folder), size=args.export_size)
    found = {"folder": folder}
    for name, encoding, max_size in (("packed raw, no cap", "raw", args.export_size),
                                     (f"packed raw <= {args.max_size}", "raw", args.max_size),
                                     (f"packed jpeg q90 <= {args.max_size}", "jpeg", args.max_size)):
        found[name] = packed_copy(folder, root / f"packed-{encoding}-{max_size}-from-{args.export_size}",
                                  encoding, max_size)
    return found


def train(data: Path, seed: int, args) -> tuple[float, float, float]:
    """(final val top-1, best val top-1, wall seconds) of one main.py run."""
    with tempfile.TemporaryDirectory() as workspace:
        command = [sys.executable, str(ROOT / "main.py"), "--arch", "resnet18", "--data-backend", "pytorch",
                   "--image-size", str(args.image_size), "--val-resize-size", str(args.max_size),
                   "--crop-scale", "0.35", "1", "-b", "32", "--lr", "0.02", "--lr-schedule", "cosine",
                   "--label-smoothing", "0.1", "--weight-decay", "5e-4", "--amp", "--memory-format", "auto",
                   "--workers", str(args.workers), "--seed", str(seed), "--device", "cpu", "--epochs", str(args.epochs),
                   "--no-checkpoints", "--print-freq", "1000", "--workspace", workspace, str(data)]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=workspace)
        seconds = time.perf_counter() - start
        epochs = [r["data"]["val.top1"] for r in read_raport(Path(workspace) / "experiment_raport.json")
                  if r.get("type") == "LOG" and isinstance(r.get("step"), list) and len(r["step"]) == 1
                  and "val.top1" in r["data"]]
    return epochs[-1], max(epochs), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--image-size", type=int, default=32, help="training crop and validation crop (default: 32)")
    parser.add_argument("--max-size", type=int, default=36,
                        help="packed shorter-side cap, also --val-resize-size of every run (default: 36)")
    parser.add_argument("--export-size", type=int, default=64, help="the digits' size in the folder (default: 64)")
    parser.add_argument("-j", "--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "convnets-bench-packed-accuracy")
    args = parser.parse_args()
    print(machine.describe(), flush=True)
    data = forms(args.data, args)
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in data}
    for seed in args.seeds:  # alternate the forms within a seed, so machine drift hits all alike
        for name, path in data.items():
            results[name].append(train(path, seed, args))
            final, best, seconds = results[name][-1]
            print(f"  seed {seed}  {name:<24} final {final:6.2f}  best {best:6.2f}  {seconds:6.1f} s", flush=True)
    folder = statistics.mean(final for final, _, _ in results["folder"])
    print(f"\nResNet18, {args.epochs} epoch(s), {args.image_size} px crops from digits of {args.export_size} px, "
          f"--val-resize-size {args.max_size}, seeds {' '.join(map(str, args.seeds))}")
    print(f"{'form':<26} {'final top-1 per seed':>24} {'mean':>7} {'vs folder':>10} {'best mean':>10}")
    for name, runs in results.items():
        finals = [final for final, _, _ in runs]
        mean = statistics.mean(finals)
        print(f"{name:<26} {' '.join(f'{v:6.2f}' for v in finals):>24} {mean:7.2f} {mean - folder:+10.2f} "
              f"{statistics.mean(best for _, best, _ in runs):10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
