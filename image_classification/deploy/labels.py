"""Class names: the shipped ImageNet list, ``--labels`` files, and which names a model gets."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from image_classification.errors import UserError

if TYPE_CHECKING:
    from image_classification.deploy.loading import LoadedModel

IMAGENET_CLASSES_FILE = Path(__file__).resolve().parent.parent / "data" / "imagenet_classes.txt"


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order (shipped with the package)."""
    names = IMAGENET_CLASSES_FILE.read_text(encoding="utf-8").splitlines()
    if len(names) != 1000:
        raise RuntimeError(f"{IMAGENET_CLASSES_FILE} has {len(names)} lines, expected 1000")
    return names


def read_labels(path: str) -> list[str]:
    """A class-names file: one name per line, in class-index order."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"labels file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"labels file {path} cannot be read: {error}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise UserError(f"labels file {path} is empty; it needs one class name per line")
    return [line.strip() for line in lines]


def default_class_names(loaded: LoadedModel) -> list[str]:
    """The checkpoint's class names, else ImageNet's for 1000 classes, else the indices."""
    if loaded.class_names is not None:
        return loaded.class_names
    if loaded.num_classes == 1000:
        return imagenet_classes()
    return [str(i) for i in range(loaded.num_classes)]


def class_names(loaded: LoadedModel, labels: str | None) -> list[str]:
    """``--labels`` (one name per class), else :func:`default_class_names`."""
    if labels is not None:
        names = read_labels(labels)
        if len(names) != loaded.num_classes:
            raise UserError(f"labels file {labels} has {len(names)} names but the model has "
                            f"{loaded.num_classes} classes")
        return names
    return default_class_names(loaded)
