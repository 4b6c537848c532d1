"""Post-training INT8 quantization for ONNX Runtime on the CPU (``model2onnx.py --int8-calibration DIR``).

ONNX Runtime's own tooling does the quantization; this module only prepares what it needs, in
the form its documentation recommends for x86: BatchNorm folded into the convolutions before the
export, ``quant_pre_process`` (shape inference and graph fusions), unsigned 8-bit activations and
signed 8-bit per-channel weights (U8S8, what the VNNI kernels take), QOperator nodes
(``QLinearConv``), and MinMax ranges from real images of the training split, preprocessed exactly
as for evaluation. On 2 AMD EPYC cores (ResNet50, 224 px, batch 8) this runs at 5.4x PyTorch fp32
and 2.2x PyTorch bf16 (``benchmarks/inference_sweep.py --paths``); exported without the folding
and pre-processing, the same quantization ran slower than fp32.

A QAT checkpoint (``quant_main.py``) exports its own quantizers instead (``model2onnx.py --int8``):
Q/DQ pairs in TensorRT's form, for GPUs.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
from torch import nn

from image_classification import export, inference
from image_classification.data.checks import scan_split
from image_classification.data.transforms import open_rgb
from image_classification.errors import UserError
from image_classification.preprocessing import EvalPreprocessing

#: By default the quantized model must pick the fp32 model's top-1 class on at least this share of
#: the calibration images, or model2onnx.py exits 1 (``--min-agreement``). Deep models keep it
#: easily (ResNet18 on the digits: 100 %); a 3-layer CNN loses a few percent.
MIN_AGREEMENT = 0.99


def calibration_images(data_dir: str, count: int, evaluation: EvalPreprocessing) -> torch.Tensor:
    """``count`` images spread evenly over ``data_dir/train`` (or ``data_dir`` itself when it is a
    split), as a normalised float32 NCHW batch with the evaluation preprocessing."""
    if count < 1:
        raise UserError(f"--calibration-images must be positive, got {count}")
    if not os.path.isdir(data_dir):
        raise UserError(f"--int8-calibration {data_dir}: no such directory")
    split_root, split = (data_dir, "train") if os.path.isdir(os.path.join(data_dir, "train")) else \
        (os.path.dirname(os.path.abspath(data_dir)), os.path.basename(os.path.abspath(data_dir)))
    samples = scan_split(split_root, split).samples
    step = max(1, len(samples) // count)
    chosen = samples[::step][:count]
    transform = evaluation.transform()
    pixels = torch.stack([transform(open_rgb(path)) for path, _ in chosen])
    return evaluation.normalize(torch.device("cpu"))(pixels)


def quantize(model: nn.Module, images: torch.Tensor, output: str, *, opset: int, batch_size: int = 32,
             qdq: bool = False) -> None:
    """Write ``model`` (fp32, eval) to ``output`` as an INT8 ONNX model calibrated on ``images``:
    QOperator nodes (``QLinearConv``), or QuantizeLinear/DequantizeLinear pairs with ``qdq``."""
    from onnxruntime import quantization as ortq

    batches = [images[i:i + batch_size].numpy() for i in range(0, len(images), batch_size)]

    class Reader(ortq.CalibrationDataReader):
        def __init__(self):
            self.items = iter([{export.INPUT_NAME: batch} for batch in batches])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        fp32, prepared = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "prepared.onnx")
        export.export_onnx(inference.fold_batchnorm(model), images[:1], fp32, opset=opset, exporter="legacy")
        ortq.quant_pre_process(fp32, prepared)
        quant_format = ortq.QuantFormat.QDQ if qdq else ortq.QuantFormat.QOperator
        ortq.quantize_static(prepared, output, Reader(), quant_format=quant_format, per_channel=True,
                             activation_type=ortq.QuantType.QUInt8, weight_type=ortq.QuantType.QInt8)


def agreement(model: nn.Module, output: str, images: torch.Tensor, batch_size: int = 32) -> export.Parity:
    """The quantized file against the fp32 PyTorch model on ``images``: top-1 agreement, max abs diff."""
    runner = export.onnx_runner(output, torch.device("cpu"))
    with torch.no_grad():
        reference = torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    logits = torch.cat([runner(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    return export.Parity(batch=len(images), max_abs_diff=float((logits - reference).abs().max()),
                         max_abs_output=float(reference.abs().max()),
                         top1_agreement=float(np.mean((logits.argmax(1) == reference.argmax(1)).numpy())))
