"""Export scikit-learn's bundled handwritten digits as a small ImageFolder dataset.

    python -m image_classification.data.digits OUTDIR [--val-fraction 0.2] [--size 32] [--seed 0]
        [--classes 6-9] [--train-per-class N]

1797 8x8 grayscale digits (10 classes) ship inside scikit-learn, so this gives a real,
learnable dataset without a download: enough to check that a training run converges on CPU.
Layout: ``OUTDIR/{train,val}/<digit>/<n>.jpg``, where ``n`` is the sample's index in
``load_digits()``; the split is stratified by class and fixed by ``--seed``.

A marker file (``.digits-export.json``, ignored by the dataset checks) identifies a previous
export: re-running with the same settings does nothing, with other settings it rewrites the
export, and any other non-empty OUTDIR is refused.

``--classes`` keeps some digits (two datasets with other classes: pretrain on one, fine-tune on the
other), ``--train-per-class`` the first N training images of each (a small target dataset).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import Counter

import numpy as np
from PIL import Image

from image_classification.errors import UserError

MARKER = ".digits-export.json"
_MAX_VALUE = 16  # load_digits pixel values are 0..16


def write_digits(outdir: str, size: int = 32, val_fraction: float = 0.2, seed: int = 0,
                 classes: list[int] | None = None, train_per_class: int | None = None) -> dict:
    """Write the export; return ``{"outdir", "train", "val", "classes", "size", "written"}``.
    ``classes``: only these digits; ``train_per_class``: at most that many training images per class."""
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if size < 8:
        raise UserError(f"--size must be at least 8 (the digits are 8x8), got {size}")
    if classes is not None and (not classes or not set(classes) <= set(range(10))):
        raise UserError(f"--classes must name digits 0-9, got {classes}")
    if train_per_class is not None and train_per_class < 1:
        raise UserError(f"--train-per-class must be at least 1, got {train_per_class}")
    settings = {"size": size, "val_fraction": val_fraction, "seed": seed,
                **({"classes": sorted(set(classes))} if classes is not None else {}),
                **({"train_per_class": train_per_class} if train_per_class is not None else {})}
    previous = _previous_export(outdir)
    if previous is not None and previous.get("settings") == settings and previous.get("complete"):
        return {**previous["summary"], "outdir": outdir, "written": False}

    images, labels, train_idx, val_idx = _split(val_fraction, seed)
    if classes is not None:
        train_idx = [i for i in train_idx if labels[i] in classes]
        val_idx = [i for i in val_idx if labels[i] in classes]
    if train_per_class is not None:
        train_idx = _first_per_class(train_idx, labels, train_per_class)
    _reset(outdir, settings)
    for split, indices in (("train", train_idx), ("val", val_idx)):
        for index in indices:
            _save(images[index], size, os.path.join(outdir, split, str(labels[index]), f"{index}.jpg"))
    summary = {"train": len(train_idx), "val": len(val_idx), "classes": len({labels[i] for i in val_idx}), "size": size}
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


def _first_per_class(indices: list[int], labels: np.ndarray, limit: int) -> list[int]:
    kept, counts = [], Counter()
    for index in indices:
        if counts[labels[index]] < limit:
            kept.append(index)
            counts[labels[index]] += 1
    return kept


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


def _digit_range(text: str) -> list[int]:
    """``0-5`` or ``1,3,7`` -> a list of digits."""
    try:
        if "-" in text:
            first, last = (int(part) for part in text.split("-", 1))
            return list(range(first, last + 1))
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected digits like 0-5 or 1,3,7, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m image_classification.data.digits", description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="where to write train/ and val/")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each class put in val/ (default 0.2)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    parser.add_argument("--classes", type=_digit_range, default=None, metavar="DIGITS",
                        help="only these digits, e.g. 0-5 or 1,3,7 (default: all 10)")
    parser.add_argument("--train-per-class", type=int, default=None, metavar="N",
                        help="at most N training images per class (default: all, about 144)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = write_digits(args.outdir, size=args.size, val_fraction=args.val_fraction, seed=args.seed,
                              classes=args.classes, train_per_class=args.train_per_class)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    action = "wrote" if result["written"] else "already up to date:"
    print(f"{action} {result['train']} train and {result['val']} val images "
          f"({result['classes']} classes, {result['size']}x{result['size']} px) in {args.outdir}")
    return 0
