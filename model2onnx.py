#!/usr/bin/env python
"""Export a model to ONNX (or TorchScript) with a dynamic batch axis, then check the export.

    python model2onnx.py --arch resnet50 --pretrained-from-file model.pth            # -> model.onnx
    python model2onnx.py --arch resnet50 --weights model.pth --format torchscript    # -> model.torchscript.pt
    python model2onnx.py --weights checkpoint.pth.tar --int8-calibration DATA      # INT8 for ONNX Runtime (CPU)

After writing the file, the export is run (onnxruntime, or the reloaded TorchScript module) next
to the eager PyTorch model on random images at batch 1 and 4, and the largest difference of the
logits is printed. Above ``--tolerance`` (relative to the output magnitude when outputs exceed
1) the command exits with status 1; ``--no-check`` skips the check. A QAT checkpoint exports with
Q/DQ nodes (TensorRT's INT8 form); ``--int8-calibration`` quantizes an fp32 model for ONNX Runtime
and checks it on the calibration images instead (``image_classification.ptq``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from image_classification import config, export, preprocessing, ptq, quantization, runtime, triton
from image_classification.errors import UserError, exit_status

CHECK_BATCHES = (1, 4)
INT8_TOLERANCE = 0.25  # ORT and PyTorch may round a tie differently: one INT8 step, propagated


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="model2onnx.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", "-a", default=None, metavar="ARCH",
                        help="model architecture (default: the checkpoint's, else resnet50)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="device to export and check on (default: auto, CUDA when available)")
    parser.add_argument("--image-size", default=None, type=int, metavar="PX",
                        help="input size of the example batch and the check "
                             "(default: the checkpoint's or the architecture's)")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help="output file (default: the weights name with .onnx or .torchscript.pt, "
                             "else ARCH.onnx)")
    parser.add_argument("-b", "--batch-size", default=1, type=int, metavar="N",
                        help="batch of the example input; the exported batch axis is dynamic anyway (default: 1)")
    parser.add_argument("--format", default="onnx", choices=export.FORMATS, help="onnx | torchscript (default: onnx)")
    parser.add_argument("--exporter", default="auto", choices=export.EXPORTERS,
                        help="ONNX exporter: dynamo (torch.export, needs onnxscript) | legacy (TorchScript-based) "
                             "| auto = dynamo when onnxscript is installed (default: auto)")
    parser.add_argument("--opset", default=export.DEFAULT_ONNX_OPSET, type=int, metavar="N",
                        help=f"ONNX opset, at least {export.MIN_ONNX_OPSET} (default: {export.DEFAULT_ONNX_OPSET})")
    parser.add_argument("--check", default=True, action=argparse.BooleanOptionalAction,
                        help="compare the export with PyTorch at batch 1 and 4 (default: on)")
    parser.add_argument("--tolerance", default=None, type=float, metavar="T",
                        help="largest accepted |export - pytorch| / max(1, max |pytorch|) (default: 1e-4; "
                             f"{INT8_TOLERANCE:g} for a QAT checkpoint, whose INT8 rounding may differ by a step)")
    parser.add_argument("--int8", action="store_true",
                        help="require a QAT checkpoint (quant_main.py) and export it with INT8 QuantizeLinear/"
                             "DequantizeLinear nodes (a QAT checkpoint is always exported so; this makes a "
                             "non-QAT file an error)")
    parser.add_argument("--int8-calibration", default=None, metavar="DIR",
                        help="post-training INT8 for ONNX Runtime on the CPU: calibrate on images of DIR/train "
                             "(an ImageFolder root, or one split folder) and write QLinearConv ONNX; ONNX Runtime's "
                             "calibration methods (MinMax, Percentile, Entropy; symmetric activations; first/last "
                             "layer fp32) are tried and the one whose top-1 agrees best with fp32 on those images is "
                             "kept and reported; exit 1 when even it agrees on fewer than --min-agreement of them")
    parser.add_argument("--min-agreement", default=ptq.MIN_AGREEMENT, type=float, metavar="F",
                        help=f"--int8-calibration: least accepted top-1 agreement with fp32 (default: {ptq.MIN_AGREEMENT:g})")
    parser.add_argument("--calibration-images", default=256, type=int, metavar="N",
                        help="--int8-calibration: images used (default: 256)")
    parser.add_argument("--triton-repository", default=None, metavar="DIR",
                        help="write the export as a Triton model repository entry: DIR/NAME/config.pbtxt, "
                             "DIR/NAME/labels.txt and DIR/NAME/1/model.onnx (or model.pt)")
    parser.add_argument("--triton-model-name", default=None, metavar="NAME",
                        help="model name in the Triton repository (default: the arch, plus -int8 for a QAT checkpoint)")
    parser.add_argument("--max-batch-size", default=32, type=int, metavar="N",
                        help="Triton max_batch_size, also checked by the parity run (default: 32)")
    export.add_model_flags(parser)  # --weights/--pretrained-from-file, --ema, --pretrained, --num-classes, ...
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return exit_status(lambda: run(build_parser().parse_args(argv)))


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.image_size is not None and args.image_size < 32:
        raise UserError(f"--image-size must be at least 32, got {args.image_size}")
    weights_path = export.weights_path(args, "exporting a randomly initialised model")
    loaded = export.load_model(args.arch, weights_path, ema=args.ema, num_classes=args.num_classes,
                               options=config.model_options(args))
    device = runtime.select_device(args.device, 0)
    if device.type == "cuda":  # a strict FP32 reference for the check
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    quantized = quantization.is_quantized(loaded.model)
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
    model = loaded.model.to(device).eval()
    evaluation = preprocessing.resolve(loaded.preprocessing, loaded.spec.default_image_size, image_size=args.image_size)
    image_size = evaluation.image_size
    tolerance = args.tolerance if args.tolerance is not None else INT8_TOLERANCE if quantized else 1e-4
    int8 = quantized or args.int8_calibration is not None
    output, folder = _output_path(args, loaded, int8)
    example = torch.randn(args.batch_size, 3, image_size, image_size, device=device)

    if args.int8_calibration is not None:
        return _post_training_int8(args, loaded, model.cpu(), evaluation, output, folder)
    if args.format == "onnx":
        used = export.export_onnx(model, example, output, opset=args.opset,
                                  exporter="legacy" if quantized else args.exporter)
        export.write_onnx_metadata(output, loaded, evaluation)
        print(f"=> wrote {output} (ONNX opset {args.opset}, {used} exporter, input '{export.INPUT_NAME}' "
              f"[batch, 3, {image_size}, {image_size}], output '{export.OUTPUT_NAME}' [batch, {loaded.num_classes}])")
    else:
        used = export.export_torchscript(model, example, output)
        print(f"=> wrote {output} (TorchScript via torch.jit.{used}, input [batch, 3, {image_size}, {image_size}])")
    _write_triton_entry(args, loaded, evaluation, folder)
    if not args.check:
        return 0

    runner = (export.onnx_runner if args.format == "onnx" else export.torchscript_runner)(output, device)
    batches = CHECK_BATCHES if folder is None else (*CHECK_BATCHES, args.max_batch_size)
    results = export.check_parity(runner, model, image_size, device=device, batches=batches)
    for result in results:
        print(f"=> check batch {result.batch}: max abs diff {result.max_abs_diff:.3g} "
              f"(max |logit| {result.max_abs_output:.3g}, scaled {result.scaled():.3g}, tolerance {tolerance:g}), "
              f"top-1 agreement {100 * result.top1_agreement:.1f}%")
    worst = max(results, key=lambda r: r.scaled())
    if worst.scaled() > tolerance:
        print(f"error: the {args.format} export differs from PyTorch by {worst.max_abs_diff:.3g} at batch {worst.batch} "
              f"(scaled {worst.scaled():.3g} > --tolerance {tolerance:g}); {output} was written but is "
              "not faithful", file=sys.stderr)
        return 1
    print("=> check passed")
    return 0


def _write_triton_entry(args: argparse.Namespace, loaded: export.LoadedModel,
                        evaluation: preprocessing.EvalPreprocessing, folder) -> None:
    if folder is None:
        return
    entry = triton.Entry(name=folder.name, platform=triton.PLATFORMS[args.format], image_size=evaluation.image_size,
                         num_classes=loaded.num_classes, max_batch_size=args.max_batch_size,
                         preprocessing=_preprocessing(loaded, evaluation))
    triton.write(folder, entry, export.default_class_names(loaded))
    print(f"=> wrote Triton model {folder} (config.pbtxt, {triton.LABELS_FILE}, 1/{entry.platform.filename}; "
          f"max_batch_size {args.max_batch_size}, dynamic batching)")


def _post_training_int8(args: argparse.Namespace, loaded: export.LoadedModel, model: torch.nn.Module,
                        evaluation: preprocessing.EvalPreprocessing, output: str, folder) -> int:
    """``--int8-calibration``: ONNX Runtime static INT8 (see ``image_classification.ptq``), checked on
    the calibration images against the fp32 model."""
    images = ptq.calibration_images(args.int8_calibration, args.calibration_images, evaluation)

    def report(tried: ptq.Tried) -> None:
        print(f"=> calibration {tried.recipe.describe()}: top-1 agreement with fp32 "
              f"{100 * tried.parity.top1_agreement:.1f}% on the calibration images", flush=True)

    chosen, tried = ptq.quantize_best(model, images, output, opset=args.opset, on_tried=report)
    export.write_onnx_metadata(output, loaded, evaluation)
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


def _output_path(args: argparse.Namespace, loaded: export.LoadedModel, quantized: bool):
    """(export file, Triton model folder or None)."""
    if args.triton_repository is None:
        return args.output or export.default_output(args.pretrained_from_file, loaded.arch, args.format), None
    if args.output is not None:
        raise UserError("--output and --triton-repository exclude each other (the repository fixes the file name)")
    if args.max_batch_size < 1:
        raise UserError(f"--max-batch-size must be positive, got {args.max_batch_size}")
    name = args.triton_model_name or loaded.arch + ("-int8" if quantized else "")
    folder = triton.prepare(args.triton_repository, name)
    return str(folder / "1" / triton.PLATFORMS[args.format].filename), folder


def _preprocessing(loaded: export.LoadedModel, evaluation: preprocessing.EvalPreprocessing) -> str:
    return (f"{loaded.arch}, {loaded.num_classes} classes, exported by convnets model2onnx.py.\n"
            f"Input: RGB image, {evaluation.describe()}, float32 NCHW.\n"
            "Output: logits (softmax gives probabilities); labels.txt names the classes.")


if __name__ == "__main__":
    sys.exit(main())
