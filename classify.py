#!/usr/bin/env python
"""Classify images with a trained model and print the top-k classes.

    python classify.py --arch resnet50 --weights W.pth --image cat.jpg [dog.png ...]
    python classify.py --pretrained-from-file workspace/model_best.pth.tar --image photos/ --json

``--weights`` and ``--pretrained-from-file`` take a weights file (ours, NGC or torchvision) or a
training checkpoint (``--ema`` picks its EMA weights). Preprocessing is the evaluation one:
resize the shorter side to size+32, center crop, ImageNet mean/std; the size is the model's
default (224, B4 380), or the one a training checkpoint was trained with, or ``--image-size``.
Class names come from ``--labels FILE``, else the checkpoint, else the ImageNet list for
1000-class models, else class indices. Output per image: its path, then ``<class>: <pct>%``
lines, best first (or one JSON document with ``--json``).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from image_classification import config
from image_classification.deploy import classifying, loading
from image_classification.errors import exit_status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="classify.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", nargs="+", action="extend", required=True, metavar="PATH",
                        help="image file(s) and/or folder(s) of images (searched recursively)")
    parser.add_argument("--arch", "-a", default=None, metavar="ARCH",
                        help="model architecture (default: the checkpoint's, else resnet50)")
    parser.add_argument("--precision", default="AMP", type=str.upper, metavar="P",
                        help="AMP (fp16 on CUDA; on the CPU BatchNorm folded, and bf16 with channels_last where the "
                             "CPU has native bf16, fp32 elsewhere: the measured fastest CPU path) | FP32 | TF32 "
                             "(default: AMP)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="torch.compile the model (BACKEND default: inductor); pays off over many batches, "
                             "the --json output reports the compile time (default: off, eager)")
    parser.add_argument("--topk", default=None, metavar="K",
                        help=f"classes to show per image (default: {config.DEFAULT_TOPK}, or all when the model "
                             "has fewer)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--labels", default=None, metavar="FILE",
                        help="class names, one per line in class-index order")
    parser.add_argument("--image-size", default=None, type=int, metavar="PX",
                        help="center-crop size (default: the checkpoint's or the architecture's, "
                             "e.g. 224; B4 380)")
    parser.add_argument("--resize-size", default=None, type=int, metavar="PX",
                        help="resize the shorter side to PX before cropping (default: image size + 32)")
    parser.add_argument("--interpolation", default=None, choices=("bilinear", "bicubic"),
                        help="resize filter (default: the checkpoint's, else bilinear)")
    parser.add_argument("-b", "--batch-size", default=16, type=int, metavar="N",
                        help="images per forward pass (default: 16)")
    config.add_onnx_flag(parser)
    loading.add_model_flags(parser)  # --weights/--pretrained-from-file, --ema, --pretrained, --num-classes, ...
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return exit_status(lambda: classifying.run(build_parser().parse_args(argv)))
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
