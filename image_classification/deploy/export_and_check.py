"""``model2onnx.py``'s steps: load the model, write it (ONNX, TorchScript, or post-training INT8
ONNX), record its preprocessing, optionally as a Triton repository entry, then check it against
PyTorch and say whether it is faithful (the exit status)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from image_classification import quantization, runtime
from image_classification.deploy import exporting, loading, parity, ptq, runners, triton
from image_classification.deploy.labels import default_class_names
from image_classification.deploy.loading import LoadedModel
from image_classification.deploy.metadata import write_onnx_metadata
from image_classification.errors import UserError
from image_classification.preprocessing import EvalPreprocessing

CHECK_BATCHES = (1, 4)
DEFAULT_TOLERANCE = 1e-4
INT8_TOLERANCE = 0.25  # ORT and PyTorch may round a tie differently: one INT8 step, propagated


def run(args: argparse.Namespace) -> int:
    """Export as the flags of ``model2onnx.py`` ask; 0 when the export is faithful (or unchecked)."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.image_size is not None and args.image_size < 32:
        raise UserError(f"--image-size must be at least 32, got {args.image_size}")
    loaded = loading.load_from_flags(args, "exporting a randomly initialised model")
    device = runtime.select_device(args.device, 0)
    if device.type == "cuda":  # a strict FP32 reference for the check
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    quantized = quantization.is_quantized(loaded.model)
    _check_int8_flags(args, quantized)
    model = loaded.model.to(device).eval()
    evaluation = loading.resolve_preprocessing(loaded, image_size=args.image_size)
    output, folder = output_path(args, loaded, int8=quantized or args.int8_calibration is not None)

    if args.int8_calibration is not None:
        return _post_training_int8(args, loaded, model.cpu(), evaluation, output, folder)
    image_size = evaluation.image_size
    example = torch.randn(args.batch_size, 3, image_size, image_size, device=device)
    if args.format == "onnx":
        used = exporting.export_onnx(model, example, output, opset=args.opset,
                                     exporter="legacy" if quantized else args.exporter)
        write_onnx_metadata(output, loaded, evaluation)
        print(f"=> wrote {output} (ONNX opset {args.opset}, {used} exporter, input '{exporting.INPUT_NAME}' "
              f"[batch, 3, {image_size}, {image_size}], output '{exporting.OUTPUT_NAME}' "
              f"[batch, {loaded.num_classes}])")
    else:
        used = exporting.export_torchscript(model, example, output)
        print(f"=> wrote {output} (TorchScript via torch.jit.{used}, input [batch, 3, {image_size}, {image_size}])")
    _write_triton_entry(args, loaded, evaluation, folder)
    if not args.check:
        return 0
    tolerance = args.tolerance if args.tolerance is not None else INT8_TOLERANCE if quantized else DEFAULT_TOLERANCE
    return _check(args, model, image_size, device, output, tolerance,
                  batches=CHECK_BATCHES if folder is None else (*CHECK_BATCHES, args.max_batch_size))


def _check_int8_flags(args: argparse.Namespace, quantized: bool) -> None:
    if args.int8 and not quantized:
        raise UserError(f"--int8 needs a QAT checkpoint from quant_main.py; "
                        f"{args.pretrained_from_file or 'a randomly initialised model'} has no quantizers")
    if quantized and args.format == "onnx" and args.exporter == "dynamo":
        raise UserError("a QAT checkpoint exports with --exporter legacy (the dynamo exporter does not "
                        "translate the fake quantizers into QuantizeLinear/DequantizeLinear)")
    if args.int8_calibration is not None:
        if quantized:
            raise UserError("--int8-calibration quantizes an fp32 model; a QAT checkpoint exports its own INT8 "
                            "quantizers (leave the flag out, or use --int8)")
        if args.format != "onnx":
            raise UserError("--int8-calibration writes ONNX for ONNX Runtime; drop --format torchscript")
        if not 0.0 <= args.min_agreement <= 1.0:
            raise UserError(f"--min-agreement is a share of images, 0..1, got {args.min_agreement:g}")


def default_output(weights_path: str | None, arch: str, fmt: str) -> str:
    """The weights name with ``.pt``/``.pth``/``.pth.tar``/``.tar`` replaced (the reference's rule),
    else the arch name, in the current directory."""
    suffix = ".onnx" if fmt == "onnx" else ".torchscript.pt"
    if weights_path is None:
        return arch + suffix
    base = weights_path
    for ending in (".tar", ".pth", ".pt"):
        if base.endswith(ending):
            base = base[: -len(ending)]
    return base + suffix


def output_path(args: argparse.Namespace, loaded: LoadedModel, *, int8: bool) -> tuple[str, Path | None]:
    """(export file, Triton model folder or None)."""
    if args.triton_repository is None:
        return args.output or default_output(args.pretrained_from_file, loaded.arch, args.format), None
    if args.output is not None:
        raise UserError("--output and --triton-repository exclude each other (the repository fixes the file name)")
    if args.max_batch_size < 1:
        raise UserError(f"--max-batch-size must be positive, got {args.max_batch_size}")
    folder = triton.prepare(args.triton_repository, triton.model_name(loaded.arch, int8, args.triton_model_name))
    return str(folder / "1" / triton.PLATFORMS[args.format].filename), folder


def _write_triton_entry(args: argparse.Namespace, loaded: LoadedModel, evaluation: EvalPreprocessing,
                        folder: Path | None) -> None:
    if folder is None:
        return
    entry = triton.Entry(name=folder.name, platform=triton.PLATFORMS[args.format], image_size=evaluation.image_size,
                         num_classes=loaded.num_classes, max_batch_size=args.max_batch_size,
                         preprocessing=triton.describe(loaded.arch, loaded.num_classes, evaluation))
    triton.write(folder, entry, default_class_names(loaded))
    print(f"=> wrote Triton model {folder} (config.pbtxt, {triton.LABELS_FILE}, 1/{entry.platform.filename}; "
          f"max_batch_size {args.max_batch_size}, dynamic batching)")


def _check(args: argparse.Namespace, model: nn.Module, image_size: int, device: torch.device, output: str,
           tolerance: float, batches: tuple[int, ...]) -> int:
    """The export against PyTorch on random images (``parity.check_parity``); 1 above ``tolerance``."""
    runner = (runners.onnx_runner if args.format == "onnx" else runners.torchscript_runner)(output, device)
    results = parity.check_parity(runner, model, image_size, device=device, batches=batches)
    for result in results:
        print(f"=> check batch {result.batch}: max abs diff {result.max_abs_diff:.3g} "
              f"(max |logit| {result.max_abs_output:.3g}, scaled {result.scaled():.3g}, tolerance {tolerance:g}), "
              f"top-1 agreement {100 * result.top1_agreement:.1f}%")
    worst = max(results, key=lambda r: r.scaled())
    if worst.scaled() > tolerance:
        print(f"error: the {args.format} export differs from PyTorch by {worst.max_abs_diff:.3g} "
              f"at batch {worst.batch} (scaled {worst.scaled():.3g} > --tolerance {tolerance:g}); {output} was "
              "written but is not faithful", file=sys.stderr)
        return 1
    print("=> check passed")
    return 0


def _post_training_int8(args: argparse.Namespace, loaded: LoadedModel, model: nn.Module,
                        evaluation: EvalPreprocessing, output: str, folder: Path | None) -> int:
    """``--int8-calibration``: ONNX Runtime static INT8 (see ``deploy.ptq``), checked on the
    calibration images against the fp32 model."""
    images = ptq.calibration_images(args.int8_calibration, args.calibration_images, evaluation)

    def report(tried: ptq.Tried) -> None:
        print(f"=> calibration {tried.recipe.describe()}: top-1 agreement with fp32 "
              f"{100 * tried.parity.top1_agreement:.1f}% on the calibration images", flush=True)

    chosen, tried = ptq.quantize_best(model, images, output, opset=args.opset, on_tried=report)
    write_onnx_metadata(output, loaded, evaluation)
    print(f"=> chose {chosen.recipe.describe()} of {len(tried)} calibration recipe(s) tried")
    print(f"=> wrote {output} (ONNX Runtime INT8: QLinearConv, U8S8, BatchNorm folded; calibrated on "
          f"{len(images)} images of {args.int8_calibration} with {chosen.recipe.describe()})")
    _write_triton_entry(args, loaded, evaluation, folder)
    if not args.check:
        return 0
    result = chosen.parity
    print(f"=> check on the calibration images: top-1 agreement with fp32 {100 * result.top1_agreement:.1f}%, "
          f"max abs diff {result.max_abs_diff:.3g} (max |logit| {result.max_abs_output:.3g})")
    if result.top1_agreement < args.min_agreement:
        print(f"error: the INT8 model agrees with fp32 on only {100 * result.top1_agreement:.1f}% of the calibration "
              f"images with the best of {len(tried)} calibration recipes (< --min-agreement {args.min_agreement:g}); "
              f"{output} was written but is not faithful",
              file=sys.stderr)
        return 1
    print("=> check passed")
    return 0
