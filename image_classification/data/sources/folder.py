"""The ImageFolder format: its layout rules, checked when a loader is built, and its source.

The checks (:func:`scan_split`) make only directory listings and ``stat`` calls: nothing is
decoded, so a broken layout is reported in seconds with one actionable line instead of a traceback
deep inside a DataLoader worker. The scan returns the ``(path, class_index)`` list the dataset then
uses (a :class:`FolderSource`), so ImageFolder's own scan is not repeated.

Layout (ImageFolder): ``<data>/<split>/<class>/**/<image>``. Like ImageFolder, class folders are
sorted by name, files are found recursively (following symlinks) and files without an image
extension are ignored. Unlike ImageFolder, hidden entries (names starting with ".") are ignored, so
``.ipynb_checkpoints`` or ``._x.jpg`` metadata files do not become classes or corrupt samples.

Zero-byte files are skipped with a logged warning and counted in :attr:`SplitScan.zero_byte`; they
are almost always interrupted copies, and failing the whole run on one of them helps nobody.
A class folder that ends up with no usable image is an error, since the label would never occur.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from image_classification.data.sources.base import SampleSource
from image_classification.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
_SHOWN = 5  # names listed in an error message before "..."


@dataclass(frozen=True)
class SplitScan:
    """The usable images of one split."""

    root: str
    class_names: list[str]
    samples: list[tuple[str, int]]            # (path, class index), sorted by class then path
    zero_byte: list[str] = field(default_factory=list)  # skipped zero-byte files

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def scan_split(data_dir: str | None, split: str) -> SplitScan:
    """Check ``data_dir/split`` and list its images.

    Class indices always come from ``train/`` when it exists (ImageFolder would number ``val/`` on
    its own, silently mislabelling it if the class sets differ), and ``val/`` must then hold exactly
    the same classes. Without ``train/`` (evaluation only) ``val/`` numbers its own classes.
    """
    root = _split_dir(data_dir, split)
    names = class_folders(root)
    other = os.path.join(data_dir, _other(split))
    if os.path.isdir(other):
        other_names = class_folders(other)
        train_names, val_names = (other_names, names) if split == "val" else (names, other_names)
        _check_same_classes(data_dir, train=train_names, val=val_names)
    class_names = names  # equal to train's names once the check above has passed
    samples: list[tuple[str, int]] = []
    zero_byte: list[str] = []
    for index, name in enumerate(class_names):
        files, empty = _class_files(os.path.join(root, name))
        if not files:
            raise UserError(_empty_class_message(os.path.join(root, name), len(empty)))
        samples.extend((path, index) for path in files)
        zero_byte.extend(empty)
    if zero_byte:
        log.warning("skipping %d zero-byte file(s) in %s, e.g. %s", len(zero_byte), root, zero_byte[0])
    return SplitScan(root=root, class_names=class_names, samples=samples, zero_byte=zero_byte)


class FolderSource(SampleSource):
    """An ImageFolder split (a :func:`scan_split` result); sample ``i`` is a file."""

    kind = "folder"

    def __init__(self, scan: SplitScan):
        self.location = scan.root
        self.paths = [path for path, _ in scan.samples]
        self.labels = np.array([label for _, label in scan.samples], dtype=np.int64)
        self.shard_ids = np.zeros(len(self.paths), dtype=np.int64)
        self.class_names = list(scan.class_names)
        self.num_classes = len(self.class_names)
        self.skipped = list(scan.zero_byte)  # scan_split has logged them already

    def read(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as file:
            return file.read()

    def name(self, i: int) -> str:
        return self.paths[i]

    def describe(self) -> str:
        return f"folder {self.location}: {len(self)} images, {self.num_classes} classes"


def check_dataset(data_dir: str | None, splits: tuple[str, ...] = SPLITS) -> dict[str, SplitScan]:
    """Scan every split in ``splits`` (e.g. only ``("val",)`` when evaluating)."""
    return {split: scan_split(data_dir, split) for split in splits}


def class_folders(root: str) -> list[str]:
    """Sorted names of the (non-hidden) class folders in a split folder."""
    try:
        with os.scandir(root) as entries:
            names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    except OSError as error:
        raise UserError(f"cannot list {root}: {error.strerror or error}") from None
    if not names:
        raise UserError(f"no class folders in {root}: expected {root}/<class>/<image> (ImageFolder layout)")
    return names


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _split_dir(data_dir: str | None, split: str) -> str:
    if not data_dir:
        raise UserError("no data directory given: the pytorch backend needs DIR with DIR/train and DIR/val "
                        "(or use --data-backend synthetic)")
    if not os.path.isdir(data_dir):
        what = "is not a directory" if os.path.exists(data_dir) else "does not exist"
        raise UserError(f"data directory {data_dir} {what}: expected {data_dir}/{split}/<class>/<image>")
    root = os.path.join(data_dir, split)
    if not os.path.isdir(root):
        raise UserError(f"no {split}/ folder in {data_dir}: expected {root}/<class>/<image> (ImageFolder layout)")
    return root


def _other(split: str) -> str:
    return "val" if split == "train" else "train"


def _class_files(class_dir: str) -> tuple[list[str], list[str]]:
    """(non-empty image files, zero-byte image files) under ``class_dir``, sorted."""
    files: list[str] = []
    empty: list[str] = []

    def fail(error: OSError) -> None:
        raise UserError(f"cannot list {error.filename}: {error.strerror or error}")

    for folder, subfolders, names in os.walk(class_dir, onerror=fail, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(names):
            if not is_image_file(name):
                continue
            path = os.path.join(folder, name)
            try:
                size = os.stat(path).st_size
            except OSError as error:  # e.g. a dangling symlink
                raise UserError(f"cannot read {path}: {error.strerror or error}") from None
            (files if size > 0 else empty).append(path)
    return files, empty


def _empty_class_message(class_dir: str, zero_byte: int) -> str:
    extensions = ", ".join(IMG_EXTENSIONS)
    if zero_byte:
        return (f"class folder {class_dir} has no usable images (only {zero_byte} zero-byte file(s)): "
                "re-copy its images or remove the folder")
    return f"class folder {class_dir} has no images ({extensions}): add images or remove the folder"


def _check_same_classes(data_dir: str, *, train: list[str], val: list[str]) -> None:
    missing = sorted(set(train) - set(val))
    extra = sorted(set(val) - set(train))
    if not missing and not extra:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} train class(es) missing from val/: {_shorten(missing)}")
    if extra:
        parts.append(f"{len(extra)} val class(es) not in train/: {_shorten(extra)}")
    raise UserError(f"train/ and val/ in {data_dir} must hold the same class folders; " + "; ".join(parts))


def _shorten(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (", ..." if len(names) > _SHOWN else "")
