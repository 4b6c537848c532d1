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
and checks it on the calibration images instead (``image_classification.deploy.ptq``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from image_classification.deploy import export_and_check, exporting, loading, ptq
from image_classification.errors import exit_status


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
    parser.add_argument("--format", default="onnx", choices=exporting.FORMATS,
                        help="onnx | torchscript (default: onnx)")
    parser.add_argument("--exporter", default="auto", choices=exporting.EXPORTERS,
                        help="ONNX exporter: dynamo (torch.export, needs onnxscript) | legacy (TorchScript-based) "
                             "| auto = dynamo when onnxscript is installed (default: auto)")
    parser.add_argument("--opset", default=exporting.DEFAULT_ONNX_OPSET, type=int, metavar="N",
                        help=f"ONNX opset, at least {exporting.MIN_ONNX_OPSET} "
                             f"(default: {exporting.DEFAULT_ONNX_OPSET})")
    parser.add_argument("--check", default=True, action=argparse.BooleanOptionalAction,
                        help="compare the export with PyTorch at batch 1 and 4 (default: on)")
    parser.add_argument("--tolerance", default=None, type=float, metavar="T",
                        help="largest accepted |export - pytorch| / max(1, max |pytorch|) (default: 1e-4; "
                             f"{export_and_check.INT8_TOLERANCE:g} for a QAT checkpoint, whose INT8 rounding may "
                             "differ by a step)")
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
                        help="--int8-calibration: least accepted top-1 agreement with fp32 "
                             f"(default: {ptq.MIN_AGREEMENT:g})")
    parser.add_argument("--calibration-images", default=256, type=int, metavar="N",
                        help="--int8-calibration: images used (default: 256)")
    parser.add_argument("--triton-repository", default=None, metavar="DIR",
                        help="write the export as a Triton model repository entry: DIR/NAME/config.pbtxt, "
                             "DIR/NAME/labels.txt and DIR/NAME/1/model.onnx (or model.pt)")
    parser.add_argument("--triton-model-name", default=None, metavar="NAME",
                        help="model name in the Triton repository (default: the arch, plus -int8 for a QAT checkpoint)")
    parser.add_argument("--max-batch-size", default=32, type=int, metavar="N",
                        help="Triton max_batch_size, also checked by the parity run (default: 32)")
    loading.add_model_flags(parser)  # --weights/--pretrained-from-file, --ema, --pretrained, --num-classes, ...
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return exit_status(lambda: export_and_check.run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
