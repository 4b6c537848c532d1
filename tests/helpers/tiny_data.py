"""A tiny ImageFolder dataset of random-noise images, for runs that only need to pass through."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


def write_imagefolder(root: Path, classes=("cat", "dog"), train_per_class: int = 8, val_per_class: int = 4,
                      size: int | Sequence[tuple[int, int]] = 24, seed: int = 0, ext: str = "jpg") -> Path:
    """``root/{train,val}/<class>/<n>.<ext>``; ``size`` is one square size, or (width, height) pairs
    used in turn. Returns ``root``."""
    rng = np.random.default_rng(seed)
    sizes = [(size, size)] if isinstance(size, int) else list(size)
    index = 0
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name in classes if count else ():
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                width, height = sizes[index % len(sizes)]
                index += 1
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{n}.{ext}")
    return root
