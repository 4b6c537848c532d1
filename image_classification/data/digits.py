"""Export scikit-learn's bundled handwritten digits as a small ImageFolder dataset.

    python -m image_classification.data.digits OUTDIR [--val-fraction 0.2] [--size 32] [--seed 0]

1797 8x8 grayscale digits (10 classes) ship inside scikit-learn, so this gives a real,
learnable dataset without a download: enough to check that a training run converges on CPU.
Layout: ``OUTDIR/{train,val}/<digit>/<n>.jpg``, where ``n`` is the sample's index in
``load_digits()``; the split is stratified by class and fixed by ``--seed``.

A marker file (``.digits-export.json``, ignored by the dataset checks) identifies a previous
export: re-running with the same settings does nothing, with other settings it rewrites the
export, and any other non-empty OUTDIR is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np
from PIL import Image

from image_classification.errors import UserError

MARKER = ".digits-export.json"
_MAX_VALUE = 16  # load_digits pixel values are 0..16


def write_digits(outdir: str, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write the export; return ``{"outdir", "train", "val", "classes", "size", "written"}``."""
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if size < 8:
        raise UserError(f"--size must be at least 8 (the digits are 8x8), got {size}")
    settings = {"size": size, "val_fraction": val_fraction, "seed": seed}
    previous = _previous_export(outdir)
    if previous is not None and previous.get("settings") == settings and previous.get("complete"):
        return {**previous["summary"], "outdir": outdir, "written": False}

    images, labels, train_idx, val_idx = _split(val_fraction, seed)
    _reset(outdir, settings)
    for split, indices in (("train", train_idx), ("val", val_idx)):
        for index in indices:
            _save(images[index], size, os.path.join(outdir, split, str(labels[index]), f"{index}.jpg"))
    summary = {"train": len(train_idx), "val": len(val_idx), "classes": len(set(labels.tolist())), "size": size}
    _write_marker(outdir, {"settings": settings, "summary": summary, "complete": True})
    return {**summary, "outdir": outdir, "written": True}


def _split(val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(indices, test_size=val_fraction, random_state=seed,
                                          stratify=digits.target)
    return digits.images, digits.target, sorted(train_idx.tolist()), sorted(val_idx.tolist())


def _save(pixels: np.ndarray, size: int, path: str) -> None:
    gray = np.rint(pixels * (255.0 / _MAX_VALUE)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(gray).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, format="JPEG", quality=95)


def _previous_export(outdir: str) -> dict | None:
    """The marker of a previous export in ``outdir``; None when empty or missing; UserError otherwise."""
    if not os.path.exists(outdir):
        return None
    if not os.path.isdir(outdir):
        raise UserError(f"{outdir} exists and is not a directory: choose another OUTDIR")
    if not os.listdir(outdir):
        return None
    try:
        with open(os.path.join(outdir, MARKER)) as file:
            return json.load(file)
    except (OSError, ValueError):
        raise UserError(f"{outdir} is not empty and is not a digits export: choose an empty or new OUTDIR") from None


def _reset(outdir: str, settings: dict) -> None:
    """Clear a previous export and mark the folder as an export in progress.

    The marker is written first, so an interrupted export is still recognised (and redone).
    """
    for split in ("train", "val"):
        shutil.rmtree(os.path.join(outdir, split), ignore_errors=True)
    os.makedirs(outdir, exist_ok=True)
    _write_marker(outdir, {"settings": settings, "complete": False})


def _write_marker(outdir: str, content: dict) -> None:
    with open(os.path.join(outdir, MARKER), "w") as file:
        json.dump(content, file, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m image_classification.data.digits", description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="where to write train/ and val/")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each class put in val/ (default 0.2)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    args = parser.parse_args(argv)
    try:
        result = write_digits(args.outdir, size=args.size, val_fraction=args.val_fraction, seed=args.seed)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    action = "wrote" if result["written"] else "already up to date:"
    print(f"{action} {result['train']} train and {result['val']} val images "
          f"({result['classes']} classes, {result['size']}x{result['size']} px) in {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
