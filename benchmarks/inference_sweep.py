"""Inference throughput and latency over batch sizes, as the table in the reference's README.

Runs ``main.py --evaluate`` once per batch size (synthetic data unless a dataset is given) and
prints batch size, img/s and latency avg / p90 / p95 / p99 in ms; ``--from-raports`` builds the
same table from existing raports (e.g. the ``raport_<bs>.json`` files of the inference recipes).

    python benchmarks/inference_sweep.py --arch resnet50 --batch-sizes 1 8 32 --amp
    python benchmarks/inference_sweep.py --from-raports results/raport_*.json

``--paths`` instead compares CPU inference paths on one batch size, side by side in one process:
PyTorch fp32; classify.py's CPU default (BatchNorm folded; bf16 + channels_last where the CPU has
native bf16, fp32 in the measured memory format elsewhere: image_classification/precision.py);
PyTorch bf16 + channels_last with BatchNorm folded, forced (emulated where the CPU lacks bf16);
with ``--compile``, the default path torch.compile'd (Inductor; compile time in the row's name);
ONNX Runtime fp32; ONNX Runtime INT8 from the Model Optimizer Q/DQ export (what quant_main.py
checkpoints export to; here calibrated without fine-tuning) and from ONNX Runtime's post-training
static quantization of the BatchNorm-folded, pre-processed model (U8S8 per-channel, as QDQ and as
QOperator), all calibrated on --calibration-batches batches.
Each row: img/s, batch latency p50/p99 and top-1 agreement with fp32 on the timed images, from the
best of ``--rounds`` alternating rounds.

    flock -x /tmp/cpu.lock python benchmarks/inference_sweep.py --paths --arch resnet50 --batch-size 8
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from image_classification import cli, machine  # noqa: E402
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


def _timed(run, batches, warmup: int = 2):
    """(outputs, img/s, p50 ms, p99 ms) of ``run`` over ``batches`` after ``warmup`` untimed calls."""
    import time

    import numpy as np
    for batch in batches[:warmup]:
        run(batch)
    outputs, latencies = [], []
    for batch in batches:
        start = time.perf_counter()
        outputs.append(np.asarray(run(batch), dtype=np.float32))
        latencies.append(time.perf_counter() - start)
    images = sum(len(b) for b in batches)
    return (np.concatenate(outputs), images / sum(latencies), 1000 * float(np.percentile(latencies, 50)),
            1000 * float(np.percentile(latencies, 99)))


def compare_paths(args) -> list[dict]:
    import numpy as np
    import onnxruntime as ort
    import torch

    from image_classification import compiling, models, precision, quantization
    from image_classification.deploy import exporting, fast_cpu, loading, ptq

    torch.manual_seed(0)
    model = models.get(args.arch).build(num_classes=1000).eval()
    if args.weights:
        model = loading.load_model(args.arch, args.weights).model
    size = args.image_size or models.get(args.arch).default_image_size
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(args.batch_size, 3, size, size, generator=generator) for _ in range(args.iterations)]
    calibration = [torch.randn(args.batch_size, 3, size, size, generator=generator)
                   for _ in range(args.calibration_batches)]
    if not calibration:
        raise SystemExit("error: --calibration-batches must be at least 1 (INT8 needs a calibration set)")
    chosen = precision.choose("cpu", amp=True)  # classify.py's default: --precision AMP
    auto_format = precision.memory_format("auto", "cpu", "infer", chosen.amp_dtype)
    default = fast_cpu.cpu_fast_path(model, chosen.amp_dtype, auto_format)
    forced = fast_cpu.cpu_fast_path(model, torch.bfloat16, torch.channels_last)

    def torch_runner(module, dtype=None, memory_format=torch.contiguous_format):
        def run(x):
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                return module(x.contiguous(memory_format=memory_format)).float().numpy()
        return run

    def compiled_runner():
        """The default path compiled; the first call (the compilation) is timed here, apart."""
        import time
        run = torch_runner(compiling.Compiler("inductor", shapes=1)(default), chosen.amp_dtype, auto_format)
        start = time.perf_counter()
        run(batches[0])
        return f" (compiled in {time.perf_counter() - start:.0f} s)", run

    def ort_runner(path):
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {exporting.INPUT_NAME: x.numpy()})[0]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32_onnx, ptq_qdq_onnx, ptq_qop_onnx, qdq_onnx = (
            str(Path(tmp) / n) for n in ("fp32.onnx", "ptq_qdq.onnx", "ptq_qop.onnx", "qdq.onnx"))
        exporting.export_onnx(model, batches[0], fp32_onnx, exporter="legacy")
        # model2onnx.py --int8-calibration's quantization (image_classification.deploy.ptq), in both forms
        calibration_images = torch.cat(calibration)
        for path, qdq in ((ptq_qdq_onnx, True), (ptq_qop_onnx, False)):
            ptq.quantize(model, calibration_images, path, opset=exporting.DEFAULT_ONNX_OPSET,
                         batch_size=args.batch_size, qdq=qdq)
        import copy
        quantized = quantization.calibrate(copy.deepcopy(model), calibration, len(calibration)).eval()
        exporting.export_onnx(quantized, batches[0], qdq_onnx, exporter="legacy")
        default_name = f"classify.py default: {chosen.name}, {precision.format_name(auto_format)}, BN folded"
        paths = [("PyTorch fp32", torch_runner(model)),
                 (default_name, torch_runner(default, chosen.amp_dtype, auto_format)),
                 ("PyTorch bf16 + channels_last, BN folded (forced)", torch_runner(forced, torch.bfloat16,
                                                                                    torch.channels_last)),
                 ("ONNX Runtime fp32", ort_runner(fp32_onnx)),
                 ("ONNX Runtime INT8, Model Optimizer Q/DQ export (QAT form)", ort_runner(qdq_onnx)),
                 ("ONNX Runtime INT8, static PTQ, QDQ (BN folded, pre-processed, U8S8 per-channel)",
                  ort_runner(ptq_qdq_onnx)),
                 ("ONNX Runtime INT8, static PTQ, QOperator (BN folded, pre-processed, U8S8 per-channel)",
                  ort_runner(ptq_qop_onnx))]
        if args.compile:
            took, run = compiled_runner()
            paths.insert(2, (f"{default_name}, torch.compile{took}", run))
        # Alternating rounds, best round per path: the machine's speed drifts by 10 % and more over
        # a minute here, which a single pass in a fixed order turns into a bias against whichever
        # path happens to run in a slow spell.
        best: dict[str, dict] = {}
        reference = None
        for turn in range(args.rounds):
            for name, run in paths:
                outputs, ips, p50, p99 = _timed(run, batches, warmup=2 if turn == 0 else 0)
                reference = outputs if reference is None else reference
                agreement = 100.0 * float(np.mean(outputs.argmax(1) == reference.argmax(1)))
                print(f"round {turn + 1} {name}: {ips:.1f} img/s", file=sys.stderr)
                if name not in best or ips > best[name]["ips"]:
                    best[name] = {"path": name, "ips": ips, "p50": p50, "p99": p99, "agreement": agreement}
        rows = [best[name] for name, _ in paths]
    return rows


def paths_table(rows: list[dict], args) -> str:
    base = rows[0]["ips"]
    lines = [f"{args.arch}, {args.image_size or 'default'} px, batch {args.batch_size}, {args.iterations} timed batches",
             "| Path | img/s | vs fp32 | p50 (ms) | p99 (ms) | top-1 agreement with fp32 |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['path']} | {row['ips']:.1f} | {row['ips'] / base:.2f}x | {row['p50']:.1f} | "
                     f"{row['p99']:.1f} | {row['agreement']:.1f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-raports", nargs="+", type=Path, help="tabulate these raports instead of running")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--iterations", type=int, default=20, help="batches per size with synthetic data")
    parser.add_argument("--data", help="dataset root (default: synthetic data)")
    parser.add_argument("--data-backend", default="pytorch")
    parser.add_argument("--paths", action="store_true", help="compare CPU inference paths at --batch-size")
    parser.add_argument("--batch-size", type=int, default=8, help="--paths: batch size (default: 8)")
    parser.add_argument("--image-size", type=int, default=None, help="--paths: input size (default: the arch's)")
    parser.add_argument("--weights", help="--paths: weights file (default: random initialisation, seed 0)")
    parser.add_argument("--rounds", type=int, default=3, help="--paths: alternating rounds, best counts (default: 3)")
    parser.add_argument("--calibration-batches", type=int, default=4, help="--paths: INT8 calibration batches")
    parser.add_argument("--compile", action="store_true", help="--paths: add the default path torch.compile'd; "
                        "otherwise main.py --evaluate --compile (val.compile_time is left out of the figures)")
    args, extra = parser.parse_known_args()  # everything else goes to main.py (--amp, --memory-format ...)
    print(machine.describe(), flush=True)
    if args.paths:
        print(paths_table(compare_paths(args), args))
        return
    extra += ["--compile"] if args.compile else []  # the sweep: main.py --evaluate --compile
    rows = [row_from_raport(p) for p in args.from_raports] if args.from_raports else sweep(args, extra)
    print(table(rows))


if __name__ == "__main__":
    main()
