"""Data backend registry and the contract every backend fulfils.

A backend turns a :class:`LoaderConfig` into a :class:`Loader`: an iterable of
``(images, labels)`` batches that are already on ``config.device`` -- images float32, normalised
with the ImageNet mean/std, ``[N, 3, H, W]`` in ``config.memory_format``; labels int64 ``[N]``.
MixUp/CutMix and one-hot targets are the engine's business, not the backend's.

Sharding and epoch length follow ``image_classification.data.sampling`` for every backend, so the
LR schedule and the checkpoints mean the same thing whichever backend produced the batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

import torch

from image_classification.errors import UserError

if TYPE_CHECKING:
    from image_classification.data.sampling import EpochProgress

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "triangular")
AUGMENTATIONS = ("none", "autoaugment", "randaugment", "trivialaugment")
DATA_FORMATS = ("auto", "folder", "tfrecord", "webdataset", "packed")  # what DIR holds (data.sources)


@dataclass(frozen=True)
class LoaderConfig:
    data_dir: str | None          # DIR: an ImageFolder root (train/, val/) or a folder of shards (None for synthetic)
    image_size: int               # training crop / validation crop (stage-wise training: one loader per size)
    val_resize_size: int          # validation: resize the shorter side to this, then center crop
    batch_size: int               # per process
    workers: int
    prefetch: int
    interpolation: str
    augmentation: str             # one of AUGMENTATIONS
    memory_format: torch.memory_format
    device: torch.device
    rank: int = 0
    world_size: int = 1
    seed: int = 0                 # always set: main draws one when --seed is not given
    num_classes: int | None = None  # --num-classes as given: synthetic (default 1000) and shard sources (default:
                                    # from the data) use it; a folder's class folders decide
    synthetic_epoch_size: int = 0  # synthetic only: samples per epoch (0 = backend default)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # training random-resized-crop area range
    randaugment_num_ops: int = 2  # augmentation "randaugment": operations per image
    randaugment_magnitude: int = 9  # augmentation "randaugment": strength, 0..30 (torchvision's and DALI's bins)
    idle_priority: bool = False   # loader workers/threads run only on CPU cycles the model leaves (data.priority)
    # where the samples are (data.sources): DIR's format is detected unless data_format says it
    data_format: str = "auto"     # one of DATA_FORMATS
    train_shards: str | None = None  # a shard pattern (glob, brace range, URL) replacing DIR for train
    val_shards: str | None = None    # ... and for val
    index_dir: str | None = None  # --data-idx-dir: shard index files (looked up first, built here if writable)
    cache_dir: str | None = None  # --shard-cache: remote shard copies and built index files
    tfrecord_label_base: int = 1  # subtracted from TFRecord labels (TF-slim stores 1-based labels)
    shard_window: int | None = None  # --shard-shuffle-window; None: data.sampling's default for the source
    # normalisation on the device: the run's preprocessing record (ImageNet's, or an --onnx file's)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


class Loader(Protocol):
    """What the engine needs from a backend's loader."""

    num_classes: int
    class_names: list[str]
    description: str  # where the samples come from (format, shards, samples), for the run's first lines
    epoch_size: int   # samples in an epoch's permutation (all processes together)

    def __len__(self) -> int:
        """Batches this process yields per epoch."""

    def set_epoch(self, epoch: int, progress: EpochProgress | None = None) -> None:
        """Select the epoch's shuffle; a training epoch leaves out the samples ``progress`` says are
        trained (a mid-epoch resume, on any number of processes)."""

    def progress_after(self, batches: int) -> EpochProgress:
        """Where the epoch stands once every process has trained ``batches`` batches since ``set_epoch``."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ...

    def take_skipped(self) -> list[str]:
        """Files skipped as unreadable since the last call (and forget them)."""


@dataclass(frozen=True)
class Backend:
    name: str
    train_loader: Callable[[LoaderConfig], Loader]
    val_loader: Callable[[LoaderConfig], Loader]
    description: str = ""
    interpolations: tuple[str, ...] = ("bilinear", "bicubic")  # the --interpolation names it can do


_BACKENDS: dict[str, Callable[[], Backend]] = {}


def register(name: str, factory: Callable[[], Backend]) -> None:
    """Register a backend lazily: ``factory`` runs only when the backend is chosen, so an optional
    dependency (DALI) is imported only by the runs that use it."""
    _BACKENDS[name] = factory


def unregister(name: str) -> None:
    """Remove the backend registered as ``name`` (a plugin's or a test's)."""
    del _BACKENDS[name]


def names() -> list[str]:
    _ensure_loaded()
    return list(_BACKENDS)


def get(name: str) -> Backend:
    _ensure_loaded()
    try:
        factory = _BACKENDS[name]
    except KeyError:
        raise UserError(f"unknown --data-backend {name!r}; choose one of: {', '.join(_BACKENDS)}") from None
    return factory()


def _ensure_loaded() -> None:
    from image_classification.data import backends  # noqa: F401  (registers the built-in backends)
