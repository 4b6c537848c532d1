"""CPU image transforms for the pytorch backend, and a robust image opener.

The transforms stop at uint8 CHW tensors: the float conversion and the mean/std normalisation run
on the device (see ``image_classification.data.loaders.device``), where they are cheap, and a uint8 batch
is a quarter of the bytes to copy.

The whole chain runs on PIL images and converts to a tensor only at the end, because torchvision's
tensor kernels do not support bicubic interpolation for the affine operations inside AutoAugment,
RandAugment and TrivialAugmentWide, and every step must use the interpolation the user chose.
All randomness comes from torch's global generator, so seeding it before a call makes the output
reproducible.
"""
from __future__ import annotations

from typing import BinaryIO, Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from image_classification.data.contract import AUGMENTATIONS
from image_classification.errors import UserError

Transform = Callable[[Image.Image], torch.Tensor]

#: interpolations this backend can do, by ``--interpolation`` name.
PIL_INTERPOLATIONS = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}
_TRANSPARENCY_BACKGROUND = (255, 255, 255)


def interpolation_mode(name: str) -> v2.InterpolationMode:
    """The torchvision mode for ``--interpolation``; a UserError for DALI-only or unknown names."""
    if name == "triangular":
        raise UserError("--interpolation triangular is only available with a dali backend; "
                        "use --interpolation bilinear or bicubic with --data-backend pytorch")
    try:
        return PIL_INTERPOLATIONS[name]
    except KeyError:
        raise UserError(f"unknown --interpolation {name!r}; choose bilinear or bicubic "
                        "(or triangular with a dali backend)") from None


def augmentation(name: str, interpolation: v2.InterpolationMode, randaugment: tuple[int, int] = (2, 9)
                 ) -> list[v2.Transform]:
    """The ``--augmentation`` policy as a (possibly empty) list of transforms; ``randaugment`` is
    RandAugment's (number of ops, magnitude)."""
    if name == "none":
        return []
    if name == "autoaugment":
        return [v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=interpolation)]
    if name == "randaugment":
        num_ops, magnitude = randaugment
        return [v2.RandAugment(num_ops=num_ops, magnitude=magnitude, interpolation=interpolation)]
    if name == "trivialaugment":
        return [v2.TrivialAugmentWide(interpolation=interpolation)]
    raise UserError(f"unknown --augmentation {name!r}; choose one of: {', '.join(AUGMENTATIONS)}")


def train_transform(image_size: int, interpolation: str = "bilinear", augment: str = "none",
                    crop_scale: tuple[float, float] = (0.08, 1.0), randaugment: tuple[int, int] = (2, 9)
                    ) -> Transform:
    """RandomResizedCrop → horizontal flip → optional policy → uint8 CHW tensor."""
    mode = interpolation_mode(interpolation)
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=crop_scale, ratio=(3 / 4, 4 / 3),
                             interpolation=mode, antialias=True),
        v2.RandomHorizontalFlip(),
        *augmentation(augment, mode, randaugment),
        v2.PILToTensor(),
    ])


def val_transform(image_size: int, resize_size: int, interpolation: str = "bilinear") -> Transform:
    """Resize the shorter side to ``resize_size`` → center crop ``image_size`` → uint8 CHW tensor."""
    mode = interpolation_mode(interpolation)
    return v2.Compose([
        v2.Resize(resize_size, interpolation=mode, antialias=True),
        v2.CenterCrop(image_size),
        v2.PILToTensor(),
    ])


def open_rgb(source: str | BinaryIO) -> Image.Image:
    """Decode ``source`` (a path, or a binary file such as ``BytesIO``) fully into an 8-bit RGB PIL image.

    Raises whatever PIL raises for unreadable files (the caller decides whether to skip them).
    Transparent images are composited over white rather than having their alpha dropped, which
    would expose whatever colour the transparent pixels happen to store (often black).
    """
    if isinstance(source, str):
        with open(source, "rb") as file:
            return open_rgb(file)
    image = Image.open(source)
    image.load()  # decode now, while the file is open: truncated data fails here, not later
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see :func:`open_rgb`)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image))).convert("RGB")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _TRANSPARENCY_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Scale a high-bit-depth grayscale array to 0..255 without clipping.

    Integer data is read as 16-bit (0..65535, the range of every 16-bit PNG/TIFF) when it fits;
    other integer ranges and float data are stretched from their minimum to their maximum, except
    floats already in 0..1.
    """
    values = pixels.astype(np.float64)
    if pixels.dtype.kind in "ui" and values.size and values.min() >= 0 and values.max() <= 65535:
        scaled = values / 257.0  # 65535 / 255
    elif pixels.dtype.kind == "f" and values.size and values.min() >= 0 and values.max() <= 1:
        scaled = values * 255.0
    else:
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.rint(scaled).clip(0, 255).astype(np.uint8)
