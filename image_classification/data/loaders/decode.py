"""Decode no more JPEG pixels than the training crop needs.

libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size in the DCT domain, which skips most of
the inverse DCT, colour conversion and upsampling work; PIL exposes this as ``Image.draft``. A
training sample, though, is a *random* crop resized to the output size, so the reduction must be
chosen per sample, after the crop is known:

1. the file's header gives the full image size (nothing is decoded yet);
2. the crop is drawn with ``v2.RandomResizedCrop``'s own parameter code (``make_params``) on that
   full size -- the same generator draws, in the same order, as when the crop is applied to a fully
   decoded image, so the crop geometry in original-image pixels and every later random draw (flip,
   policy) are unchanged;
3. the reduction is the largest of 8, 4, 2, 1 that still leaves the crop window at least the output
   size in decoded pixels on both sides, so the final resize never enlarges what a full decode
   would have shrunk;
4. the window is resized from the reduced image, its box divided by the reduction (a fractional
   box, which PIL's resize takes as is).

Non-JPEG files (and JPEGs whose crop is too small to reduce) take the full decode. The output
differs from a full decode only by resampling (a few grey levels), not by geometry.
"""
from __future__ import annotations

import math
from typing import BinaryIO, Callable

from PIL import Image
from torchvision.transforms import v2

from image_classification.data.loaders.transforms import open_rgb, to_rgb

#: libjpeg's DCT-domain scales PIL's draft can select, largest first.
REDUCTIONS = (8, 4, 2, 1)

Box = tuple[float, float, float, float]  # left, top, right, bottom


def reduction(crop_height: int, crop_width: int, out_height: int, out_width: int) -> int:
    """The largest JPEG scale divisor whose decoded crop still has ``out`` pixels on each side
    (1 when the crop is smaller than the output: it is enlarged, as from a full decode)."""
    return next((factor for factor in REDUCTIONS
                 if crop_height >= factor * out_height and crop_width >= factor * out_width), 1)


class CropDecoder:
    """``source`` (a path or a binary file) → the RGB crop of ``crop`` (a ``v2.RandomResizedCrop``),
    decoded as small as it may be.

    Draws from torch's global generator exactly as ``crop(full_image)`` would; ``reduce=False``
    decodes every file in full (same crop, same draws), for comparison.
    """

    def __init__(self, crop: v2.RandomResizedCrop, reduce: bool = True):
        self.crop = crop
        self.reduce = reduce
        self.out_height, self.out_width = crop.size
        self.resample = Image.Resampling[v2.InterpolationMode(crop.interpolation).name]

    def __call__(self, source: str | BinaryIO) -> Image.Image:
        image, (left, top, right, bottom), _ = self.decode(source)
        # Crop the whole pixels the window touches, then resample the (fractional) window inside
        # them: with no reduction this is exactly v2's crop-then-resize, bit for bit.
        region = (math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom))
        inner = (left - region[0], top - region[1], right - region[0], bottom - region[1])
        return image.crop(region).resize((self.out_width, self.out_height), self.resample, box=inner)

    def decode(self, source: str | BinaryIO) -> tuple[Image.Image, Box, int]:
        """The decoded RGB image, the crop window in its pixels, and the reduction used."""
        if isinstance(source, str):
            with open(source, "rb") as file:
                return self.decode(file)
        image = Image.open(source)
        params = self.crop.make_params([image])  # needs only the header's size
        top, left, height, width = (params[key] for key in ("top", "left", "height", "width"))
        factor = 1
        if self.reduce:
            factor = reduction(height, width, self.out_height, self.out_width)
            factor = _draft(image, factor) if factor > 1 else 1
        image.load()  # decode now, while the file is open: truncated data fails here
        box = (left / factor, top / factor, (left + width) / factor, (top + height) / factor)
        return to_rgb(image), box, factor


def _draft(image: Image.Image, factor: int) -> int:
    """Ask PIL to decode ``image`` at 1/``factor`` scale; the factor it set up (1 if not a JPEG)."""
    width, height = image.size
    configured = image.draft(image.mode, (width // factor, height // factor))
    if configured is None:
        return 1
    _, (_, _, scaled_width, _) = configured
    return round(width / scaled_width)


def split_crop(transform: v2.Compose, reduce: bool = True
               ) -> tuple[Callable[[str | BinaryIO], Image.Image], v2.Compose]:
    """``(decoder, the rest of the chain)``: a :class:`CropDecoder` taking over ``transform``'s
    leading RandomResizedCrop, or a full decode (:func:`open_rgb`) and ``transform`` unchanged."""
    steps = transform.transforms
    if not steps or not isinstance(steps[0], v2.RandomResizedCrop):
        return open_rgb, transform
    return CropDecoder(steps[0], reduce), v2.Compose(steps[1:])
