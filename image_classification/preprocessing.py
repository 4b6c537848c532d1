"""Evaluation preprocessing as data: one record, one resolver.

An image becomes a model's input by: resize the shorter side to ``resize_size`` (with
``interpolation``), center-crop ``image_size``, scale to [0, 1], normalise with ``mean``/``std``.
:class:`EvalPreprocessing` is that recipe; training checkpoints save it (``eval_preprocessing``)
and ONNX exports carry it in their metadata. :func:`resolve` is the one rule that picks it, for
``main.py`` (training and ``--evaluate --onnx``), ``classify.py``, ``model2onnx.py``, PTQ
calibration and the Triton config: flags over the saved record over the architecture's default
(crop ``default_image_size``, resize crop + 32), as timm's ``resolve_data_config`` does. A crop
other than the saved one keeps the saved resize/crop ratio.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Collection, Mapping

import torch

from image_classification.data.contract import IMAGENET_MEAN, IMAGENET_STD
from image_classification.errors import UserError

#: What torchvision/PIL can do; DALI's "triangular" falls back to bilinear where only these exist.
PIL_INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class EvalPreprocessing:
    image_size: int
    resize_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def as_dict(self) -> dict[str, Any]:
        """Plain values: what a checkpoint stores (weights_only loads it) and ONNX metadata carries."""
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> EvalPreprocessing | None:
        """The record in ``values`` (numbers may be strings, mean/std JSON text: ONNX metadata),
        None when it has no image and resize size."""
        values = values or {}
        try:
            image_size, resize_size = int(values["image_size"]), int(values["resize_size"])
        except (KeyError, TypeError, ValueError):
            return None
        record = cls(image_size, resize_size, str(values.get("interpolation") or "bilinear"))
        for key in ("mean", "std"):
            value = values.get(key)
            value = json.loads(value) if isinstance(value, str) else value
            if isinstance(value, (list, tuple)) and len(value) == 3:
                record = dataclasses.replace(record, **{key: tuple(float(v) for v in value)})
        return record

    def metadata(self) -> dict[str, str]:
        """ONNX metadata_props values (strings)."""
        return {key: json.dumps(value) if isinstance(value, list) else str(value)
                for key, value in self.as_dict().items()}

    @property
    def pil_interpolation(self) -> str:
        return self.interpolation if self.interpolation in PIL_INTERPOLATIONS else "bilinear"

    def transform(self):
        """PIL image -> uint8 CHW tensor (resize, center crop), as the validation loader does."""
        from image_classification.data.loaders.transforms import val_transform
        return val_transform(self.image_size, self.resize_size, self.pil_interpolation)

    def normalize(self, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format):
        from image_classification.data.loaders.device import Normalize
        return Normalize(device, memory_format, mean=self.mean, std=self.std)

    def describe(self) -> str:
        return (f"shorter side resized to {self.resize_size} px ({self.interpolation}), center crop "
                f"{self.image_size}x{self.image_size},\nscaled to [0, 1], normalised with mean {list(self.mean)} "
                f"and std {list(self.std)}")


def resolve(saved: EvalPreprocessing | None, default_image_size: int, *, image_size: int | None = None,
            resize_size: int | None = None, interpolation: str | None = None,
            interpolations: Collection[str] | None = None) -> EvalPreprocessing:
    """Flags over ``saved`` over the architecture's default. ``interpolations``: what the consumer
    can do; a saved or default one it cannot falls back to bilinear (a flag is left to fail)."""
    crop = image_size or (saved.image_size if saved else default_image_size)
    if resize_size is None:
        if saved is None:
            resize_size = crop + 32
        elif crop == saved.image_size:
            resize_size = saved.resize_size
        else:
            resize_size = round(crop * saved.resize_size / saved.image_size)
    if resize_size < crop:
        raise UserError(f"the resize size {resize_size} is smaller than the crop {crop}")
    chosen = interpolation or (saved.interpolation if saved else "bilinear")
    if interpolation is None and interpolations is not None and chosen not in interpolations:
        chosen = "bilinear"
    base = saved or EvalPreprocessing(crop, resize_size)
    return EvalPreprocessing(crop, resize_size, chosen, base.mean, base.std)
