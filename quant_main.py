#!/usr/bin/env python
"""Quantization-aware training: ``main.py`` with ``--quantize`` on (see README "Quantization").

    python quant_main.py --arch efficientnet-quant-b0 --pretrained-from-file b0.pth --epochs 10 ... /imagenet

Every main.py flag works the same; the model from ``--pretrained-from-file`` gets INT8 fake
quantizers, calibrated on ``--calib-batches`` training batches, and is fine-tuned through them.
"""
import sys

from image_classification.cli import main

if __name__ == "__main__":
    sys.exit(main(defaults={"quantize": True}))
