"""Writing a model as ONNX or TorchScript, with a dynamic batch axis."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from image_classification.errors import UserError

FORMATS = ("onnx", "torchscript")
EXPORTERS = ("auto", "dynamo", "legacy")
MIN_ONNX_OPSET = 13
DEFAULT_ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def resolve_exporter(name: str) -> str:
    """``auto``: torch's dynamo exporter when onnxscript is installed, else the legacy one."""
    if name not in EXPORTERS:
        raise UserError(f"unknown --exporter {name!r}; choose one of: {', '.join(EXPORTERS)}")
    has_onnxscript = importlib.util.find_spec("onnxscript") is not None
    if name == "auto":
        return "dynamo" if has_onnxscript else "legacy"
    if name == "dynamo" and not has_onnxscript:
        raise UserError("--exporter dynamo needs the onnxscript package (pip install onnxscript); "
                        "or use --exporter legacy")
    return name


@contextlib.contextmanager
def quiet_deprecations():
    """The legacy ONNX exporter and torch.jit are deprecated upstream; we choose them knowingly
    (no onnxscript / TorchScript requested), so their warnings are noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # Model Optimizer's quantizers
        warnings.filterwarnings("ignore", message=r".*(legacy TorchScript-based ONNX|will be removed"
                                                  r"|torch\.jit\.\w+` is deprecated).*")
        yield


def export_onnx(model: nn.Module, example: torch.Tensor, path: str, *, opset: int = DEFAULT_ONNX_OPSET,
                exporter: str = "auto") -> str:
    """Write ``model`` as ONNX with a dynamic batch axis; returns the exporter used."""
    if opset < MIN_ONNX_OPSET:
        raise UserError(f"--opset must be at least {MIN_ONNX_OPSET}, got {opset}")
    exporter = resolve_exporter(exporter)
    _prepare_output(path)
    common = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset)
    with torch.no_grad(), quiet_deprecations():
        if exporter == "dynamo":
            # A batch of 1 would be specialised to a constant by torch.export.
            if example.shape[0] < 2:
                example = example.expand(2, *example.shape[1:]).contiguous()
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(model, (example,), path, dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes=({0: batch},), **common)
        else:
            torch.onnx.export(model, (example,), path, dynamo=False, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              **common)
    return exporter


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str) -> str:
    """Write ``torch.jit.script(model)`` (shape-agnostic); fall back to tracing if scripting fails.
    Returns the method used."""
    _prepare_output(path)
    with quiet_deprecations():
        try:
            module = torch.jit.script(model)
            method = "script"
        except Exception:  # noqa: BLE001 - any scripting failure: tracing is the documented fallback
            with torch.no_grad():
                module = torch.jit.trace(model, example, check_trace=False)
            method = "trace"
        torch.jit.save(module, path)
    return method


def _prepare_output(path: str) -> None:
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise UserError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output directory {parent} is not writable")
