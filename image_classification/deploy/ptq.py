"""Post-training INT8 quantization for ONNX Runtime on the CPU (``model2onnx.py --int8-calibration DIR``).

ONNX Runtime's own tooling does the quantization; this module only prepares what it needs, in
the form its documentation recommends for x86: BatchNorm folded into the convolutions before the
export, ``quant_pre_process`` (shape inference and graph fusions), unsigned 8-bit activations and
signed 8-bit per-channel weights (U8S8, what the VNNI kernels take), QOperator nodes
(``QLinearConv``), and MinMax ranges from real images of the training split, preprocessed exactly
as for evaluation. On 2 AMD EPYC cores (ResNet50, 224 px, batch 8) this runs at 5.4x PyTorch fp32
and 2.2x PyTorch bf16 (``benchmarks/inference_sweep.py --paths``); exported without the folding
and pre-processing, the same quantization ran slower than fp32.

Calibration is chosen, not assumed (:func:`quantize_best`): MinMax ranges lose accuracy on models
with large logits or outlier activations (a ResNet18 on face crops: 84 % top-1 agreement), so the
:data:`RECIPES` -- ONNX Runtime's MinMax, Percentile and Entropy calibration, with symmetric
activations, or with the first and last layers kept in fp32 -- are tried in order, each scored by
top-1 agreement with the fp32 model on the calibration images; the first to agree on every image
wins at once, otherwise the best one (the earlier on a tie: they are ordered fastest first).
``model2onnx.py`` reports every recipe tried and the choice, and still refuses the file when even
the best stays below ``--min-agreement``.

A QAT checkpoint (``quant_main.py``) exports its own quantizers instead (``model2onnx.py --int8``):
Q/DQ pairs in TensorRT's form, for GPUs.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from image_classification.checkpoints import files
from image_classification.data.sources.folder import scan_split
from image_classification.data.loaders.transforms import open_rgb
from image_classification.deploy import exporting, fast_cpu, runners
from image_classification.deploy.parity import Parity, compare
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


@dataclass(frozen=True)
class Recipe:
    """One way to calibrate: ONNX Runtime's ``method`` (MinMax, Percentile, Entropy), per-channel
    weights, symmetric activation ranges, and whether the first and last layers stay fp32."""
    method: str = "MinMax"
    per_channel: bool = True
    symmetric_activations: bool = False
    keep_ends_fp32: bool = False

    def describe(self) -> str:
        options = ["per-channel" if self.per_channel else "per-tensor",
                   "symmetric activations" if self.symmetric_activations else "U8 activations"]
        if self.keep_ends_fp32:
            options.append("first/last layer fp32")
        return f"{self.method} ({', '.join(options)})"


#: Tried in this order (fastest first: MinMax needs one pass, the histogram methods more, and
#: fp32 end layers cost speed); the first to agree on every calibration image ends the search.
RECIPES = (Recipe("MinMax"), Recipe("Percentile"), Recipe("Entropy"), Recipe("MinMax", symmetric_activations=True),
           Recipe("Percentile", keep_ends_fp32=True), Recipe("Entropy", keep_ends_fp32=True))


@dataclass(frozen=True)
class Tried:
    recipe: Recipe
    parity: Parity


def quantize(model: nn.Module, images: torch.Tensor, output: str, *, opset: int, batch_size: int = 32,
             qdq: bool = False, recipe: Recipe = RECIPES[0]) -> None:
    """Write ``model`` (fp32, eval) to ``output`` as an INT8 ONNX model calibrated on ``images`` by
    ``recipe``: QOperator nodes (``QLinearConv``), or QuantizeLinear/DequantizeLinear pairs with ``qdq``."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = _prepare(model, images, tmp, opset)
        _quantize_prepared(prepared, images, output, batch_size=batch_size, qdq=qdq, recipe=recipe)


def quantize_best(model: nn.Module, images: torch.Tensor, output: str, *, opset: int, batch_size: int = 32,
                  recipes: tuple[Recipe, ...] = RECIPES,
                  on_tried: Callable[[Tried], None] = lambda tried: None) -> tuple[Tried, list[Tried]]:
    """Quantize with each of ``recipes`` in turn (see the module docstring) and write the best to
    ``output``; returns (the choice, every recipe tried). ``on_tried`` sees each as it is scored."""
    tried: list[Tried] = []
    best: Tried | None = None
    with tempfile.TemporaryDirectory() as tmp:
        prepared = _prepare(model, images, tmp, opset)
        candidate = os.path.join(tmp, "candidate.onnx")
        for recipe in recipes:
            _quantize_prepared(prepared, images, candidate, batch_size=batch_size, qdq=False, recipe=recipe)
            result = Tried(recipe, agreement(model, candidate, images, batch_size))
            tried.append(result)
            on_tried(result)
            if best is None or result.parity.top1_agreement > best.parity.top1_agreement:
                best = result
                os.replace(candidate, os.path.join(tmp, "best.onnx"))
            if best.parity.top1_agreement >= 1.0:
                break
        with open(os.path.join(tmp, "best.onnx"), "rb") as handle:
            files.write_atomic(handle.read(), output)
    return best, tried


def _prepare(model: nn.Module, images: torch.Tensor, folder: str, opset: int) -> str:
    """The BatchNorm-folded fp32 export, pre-processed for quantization (``quant_pre_process``)."""
    from onnxruntime import quantization as ortq
    fp32, prepared = os.path.join(folder, "fp32.onnx"), os.path.join(folder, "prepared.onnx")
    exporting.export_onnx(fast_cpu.fold_batchnorm(model), images[:1], fp32, opset=opset, exporter="legacy")
    ortq.quant_pre_process(fp32, prepared)
    return prepared


def _quantize_prepared(prepared: str, images: torch.Tensor, output: str, *, batch_size: int, qdq: bool,
                       recipe: Recipe) -> None:
    import onnx
    from onnxruntime import quantization as ortq

    batches = [images[i:i + batch_size].numpy() for i in range(0, len(images), batch_size)]

    class Reader(ortq.CalibrationDataReader):
        def __init__(self):
            self.items = iter([{exporting.INPUT_NAME: batch} for batch in batches])

        def get_next(self):
            return next(self.items, None)

    exclude = None
    if recipe.keep_ends_fp32:
        weighted = [node.name for node in onnx.load(prepared).graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]
        exclude = [weighted[0], weighted[-1]] if weighted else None
    quant_format = ortq.QuantFormat.QDQ if qdq else ortq.QuantFormat.QOperator
    ortq.quantize_static(prepared, output, Reader(), quant_format=quant_format, per_channel=recipe.per_channel,
                         activation_type=ortq.QuantType.QUInt8, weight_type=ortq.QuantType.QInt8,
                         calibrate_method=getattr(ortq.CalibrationMethod, recipe.method), nodes_to_exclude=exclude,
                         extra_options={"ActivationSymmetric": recipe.symmetric_activations})


def agreement(model: nn.Module, output: str, images: torch.Tensor, batch_size: int = 32) -> Parity:
    """The quantized file against the fp32 PyTorch model on ``images``: top-1 agreement, max abs diff."""
    runner = runners.onnx_runner(output, torch.device("cpu"))
    with torch.no_grad():
        reference = torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    logits = torch.cat([runner(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    return compare(logits, reference)
