"""Running an exported file: ONNX Runtime and reloaded TorchScript behind one call signature
(a batch of images in, logits out), and :class:`OnnxModel`, an ONNX file as an ``nn.Module``."""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from image_classification.deploy.exporting import quiet_deprecations
from image_classification.deploy.metadata import read_onnx_metadata
from image_classification.errors import UserError

Runner = Callable[[torch.Tensor], torch.Tensor]


def onnx_session(path: str, device: torch.device):
    import onnxruntime as ort

    providers: list = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        # The CUDA provider computes fp32 convolutions/GEMMs in TF32 unless told not to (use_tf32
        # defaults to true), which fails a strict fp32 parity check on Ampere and newer.
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0, "use_tf32": 0}))
    return ort.InferenceSession(path, providers=providers)


def onnx_runner(path: str, device: torch.device, session=None) -> Runner:
    session = session or onnx_session(path, device)
    input_name = session.get_inputs()[0].name

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {input_name: images.cpu().numpy()})[0])
    return run


def torchscript_runner(path: str, device: torch.device) -> Runner:
    with quiet_deprecations():
        module = torch.jit.load(path, map_location=device).eval()

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), quiet_deprecations():
            return module(images.to(device)).cpu()
    return run


class OnnxModel(nn.Module):
    """An exported ONNX file run by ONNX Runtime behind the ``nn.Module`` call interface, so the
    evaluation loop and classify.py can score the deployed artifact itself (inference only)."""

    def __init__(self, path: str, device: torch.device):
        super().__init__()
        if not os.path.isfile(path):
            raise UserError(f"ONNX file {path} does not exist")
        try:
            session = onnx_session(path, device)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"{path} is not a loadable ONNX model ({detail})") from None
        shape, input_shape = session.get_outputs()[0].shape, session.get_inputs()[0].shape
        self.num_classes = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None
        self.image_size = input_shape[-1] if len(input_shape) == 4 and isinstance(input_shape[-1], int) else None
        metadata = read_onnx_metadata(session.get_modelmeta().custom_metadata_map)
        self.preprocessing = metadata.preprocessing
        names = metadata.class_names
        self.class_names = names if names and len(names) == self.num_classes else None
        self.path = path
        self._run = onnx_runner(path, device, session)

    def check_classes(self, num_classes: int) -> None:
        if self.num_classes is not None and self.num_classes != num_classes:
            raise UserError(f"{self.path} outputs {self.num_classes} classes but the data has {num_classes}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images.float().contiguous()).to(images.device)
