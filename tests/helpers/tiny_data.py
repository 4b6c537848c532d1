"""A tiny ImageFolder dataset of random-noise JPEGs, for runs that only need to pass through."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_imagefolder(root: Path, classes=("cat", "dog"), train_per_class: int = 8, val_per_class: int = 4,
                      size: int = 24, seed: int = 0) -> Path:
    """``root/{train,val}/<class>/<n>.jpg``; returns ``root``."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.jpg")
    return root
