"""Inference throughput and latency over batch sizes, as the table in the reference's README.

Runs ``main.py --evaluate`` once per batch size (synthetic data unless a dataset is given) and
prints batch size, img/s and latency avg / p90 / p95 / p99 in ms; ``--from-raports`` builds the
same table from existing raports (e.g. the ``raport_<bs>.json`` files of the inference recipes).

    python benchmarks/inference_sweep.py --arch resnet50 --batch-sizes 1 8 32 --amp
    python benchmarks/inference_sweep.py --from-raports results/raport_*.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from image_classification import cli  # noqa: E402
from image_classification.reporting.dllogger import read_raport  # noqa: E402

COLUMNS = ("val.compute_latency", "val.compute_latency_at90", "val.compute_latency_at95", "val.compute_latency_at99")


def row_from_raport(path: Path) -> dict:
    records = read_raport(path)
    batch = next(r["data"]["batch_size"] for r in records if r.get("step") == "PARAMETER")
    result = [r["data"] for r in records if r.get("type") == "LOG" and r.get("step") == []][-1]
    return {"batch_size": batch, "ips": result["val.total_ips"], **{c: result[c] * 1000 for c in COLUMNS}}


def table(rows: list[dict]) -> str:
    lines = ["| Batch size | Throughput (img/s) | Latency avg (ms) | p90 | p95 | p99 |", "|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: r["batch_size"]):
        lines.append(f"| {row['batch_size']} | {row['ips']:.0f} | " + " | ".join(f"{row[c]:.2f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def sweep(args, extra: list[str]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as workspace:
        for batch in args.batch_sizes:
            raport = f"raport_{batch}.json"
            data = [args.data, "--data-backend", args.data_backend] if args.data else ["--data-backend", "synthetic",
                    "--synthetic-epoch-size", str(batch * args.iterations), "--num-classes", "1000"]
            argv = ["--evaluate", "--arch", args.arch, "-b", str(batch), "--workspace", workspace, "--raport-file",
                    raport, "--print-freq", str(10 ** 6), *data, *extra]
            if cli.main(argv) != 0:
                raise SystemExit(f"main.py failed at batch size {batch}")
            rows.append(row_from_raport(Path(workspace) / raport))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-raports", nargs="+", type=Path, help="tabulate these raports instead of running")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--iterations", type=int, default=20, help="batches per size with synthetic data")
    parser.add_argument("--data", help="dataset root (default: synthetic data)")
    parser.add_argument("--data-backend", default="pytorch")
    args, extra = parser.parse_known_args()  # everything else goes to main.py (--amp, --memory-format ...)
    rows = [row_from_raport(p) for p in args.from_raports] if args.from_raports else sweep(args, extra)
    print(table(rows))


if __name__ == "__main__":
    main()
