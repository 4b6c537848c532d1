"""Cap an image's shorter side: the one resize rule of ``prepare`` (copies) and ``prepare --to`` (shards).

Why the shorter side: see :mod:`image_classification.data.prepare.cli`.
"""
from __future__ import annotations

from typing import BinaryIO

from PIL import Image

_JPEG_MODES = ("L", "RGB", "CMYK")


def target_size(width: int, height: int, max_size: int | None) -> tuple[int, int]:
    """``(width, height)`` with the shorter side ``max_size`` (aspect kept, rounded), or unchanged."""
    short = min(width, height)
    if max_size is None or short <= max_size:
        return width, height
    if width <= height:
        return max_size, max(1, round(height * max_size / width))
    return max(1, round(width * max_size / height)), max_size


def load_capped(source: str | BinaryIO, max_size: int | None) -> tuple[Image.Image, str, bool]:
    """The image in ``source`` (a path or a binary file) decoded (resized when its shorter side is over
    ``max_size``), its format, whether resized.

    Raises whatever PIL raises on a file it cannot decode: every image is fully decoded here.
    """
    if isinstance(source, str):
        with open(source, "rb") as file:
            return load_capped(file, max_size)
    image = Image.open(source)
    image_format = image.format
    size = target_size(*image.size, max_size)
    if size == image.size:
        image.load()  # only to find unreadable files
        return image, image_format, False
    # Decode at the smallest JPEG scale that is still at least the target size (no-op otherwise).
    image.draft(image.mode, size)
    image.load()
    if image.mode in ("1", "P"):  # palette images must be resampled in full colour
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    return image.resize(size, Image.Resampling.LANCZOS), image_format, True


def save_image(image: Image.Image, image_format: str, target: str | BinaryIO, quality: int) -> None:
    """Save in ``image_format`` (JPEG/WebP at ``quality``), keeping EXIF and the colour profile."""
    options = {}
    if image_format in ("JPEG", "WEBP"):
        options["quality"] = quality
    if image_format == "JPEG" and image.mode not in _JPEG_MODES:
        image = image.convert("RGB")
    for key in ("exif", "icc_profile"):
        if key in image.info:
            options[key] = image.info[key]
    image.save(target, format=image_format, **options)
