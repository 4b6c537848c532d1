#!/usr/bin/env python
"""Export a model to ONNX (or TorchScript) with a dynamic batch axis, then check the export.

    python model2onnx.py --arch resnet50 --pretrained-from-file model.pth            # -> model.onnx
    python model2onnx.py --arch resnet50 --weights model.pth --format torchscript    # -> model.torchscript.pt

After writing the file, the export is run (onnxruntime, or the reloaded TorchScript module) next
to the eager PyTorch model on random images at batch 1 and 4, and the largest difference of the
logits is printed. Above ``--tolerance`` (relative to the output magnitude when outputs exceed
1) the command exits with status 1; ``--no-check`` skips the check.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from image_classification import config, export, runtime
from image_classification.errors import UserError, exit_status

CHECK_BATCHES = (1, 4)


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
    parser.add_argument("--tolerance", default=1e-4, type=float, metavar="T",
                        help="largest accepted |export - pytorch| / max(1, max |pytorch|) (default: 1e-4)")
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
    model = loaded.model.to(device).eval()
    image_size = args.image_size or loaded.trained_image_size or loaded.spec.default_image_size
    output = args.output or export.default_output(args.pretrained_from_file, loaded.arch, args.format)
    example = torch.randn(args.batch_size, 3, image_size, image_size, device=device)

    if args.format == "onnx":
        used = export.export_onnx(model, example, output, opset=args.opset, exporter=args.exporter)
        print(f"=> wrote {output} (ONNX opset {args.opset}, {used} exporter, input '{export.INPUT_NAME}' "
              f"[batch, 3, {image_size}, {image_size}], output '{export.OUTPUT_NAME}' [batch, {loaded.num_classes}])")
    else:
        used = export.export_torchscript(model, example, output)
        print(f"=> wrote {output} (TorchScript via torch.jit.{used}, input [batch, 3, {image_size}, {image_size}])")
    if not args.check:
        return 0

    runner = (export.onnx_runner if args.format == "onnx" else export.torchscript_runner)(output, device)
    results = export.check_parity(runner, model, image_size, device=device, batches=CHECK_BATCHES)
    for result in results:
        print(f"=> check batch {result.batch}: max abs diff {result.max_abs_diff:.3g} "
              f"(max |logit| {result.max_abs_output:.3g}, scaled {result.scaled():.3g}, tolerance {args.tolerance:g})")
    worst = max(results, key=lambda r: r.scaled())
    if worst.scaled() > args.tolerance:
        print(f"error: the {args.format} export differs from PyTorch by {worst.max_abs_diff:.3g} at batch {worst.batch} "
              f"(scaled {worst.scaled():.3g} > --tolerance {args.tolerance:g}); {output} was written but is "
              "not faithful", file=sys.stderr)
        return 1
    print("=> check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
