"""The loader contract: what a data backend is given, what it gives back, and how an epoch's
progress is told.

A backend turns a :class:`LoaderConfig` into a :class:`Loader`: an iterable of
``(images, labels)`` batches that are already on ``config.device`` -- images float32, normalised
with the ImageNet mean/std, ``[N, 3, H, W]`` in ``config.memory_format``; labels int64 ``[N]``.
MixUp/CutMix and one-hot targets are the engine's business, not the backend's.

Sharding and epoch length follow ``image_classification.data.loaders.sampling`` for every backend, so
the LR schedule and the checkpoints mean the same thing whichever backend produced the batches (its
``SamplerEpochs`` gives a loader driven by a sampler the epoch methods of :class:`Loader`).
Backends import this module; :mod:`image_classification.data.registry` maps ``--data-backend``
names to them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import numpy as np
import torch

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
    idle_priority: bool = False   # loader workers/threads run only on CPU cycles the model leaves (loaders.priority)
    # where the samples are (data.sources): DIR's format is detected unless data_format says it
    data_format: str = "auto"     # one of DATA_FORMATS
    train_shards: str | None = None  # a shard pattern (glob, brace range, URL) replacing DIR for train
    val_shards: str | None = None    # ... and for val
    index_dir: str | None = None  # --data-idx-dir: shard index files (looked up first, built here if writable)
    cache_dir: str | None = None  # --shard-cache: remote shard copies and built index files
    tfrecord_label_base: int = 1  # subtracted from TFRecord labels (TF-slim stores 1-based labels)
    shard_window: int | None = None  # --shard-shuffle-window; None: data.loaders.sampling's default for the source
    # normalisation on the device: the run's preprocessing record (ImageNet's, or an --onnx file's)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


@dataclass(frozen=True)
class EpochProgress:
    """How far an epoch's training has got, independent of how it was split.

    ``done``: sorted, disjoint half-open ranges of positions in the epoch's permutation (see
    :func:`~image_classification.data.loaders.sampling.epoch_order`)
    already trained. ``then_batches``: on top of those, the first batches of
    every rank of a layout with ``(batches, batch_size, world_size)`` -- how checkpoints written
    before positions were recorded (``step_in_epoch`` only) still resume; the sampler turns it into
    ranges. ``EpochProgress()`` is an epoch's start.
    """
    done: tuple[tuple[int, int], ...] = ()
    then_batches: tuple[int, int, int] | None = None

    @property
    def started(self) -> bool:
        return bool(self.done) or bool(self.then_batches and self.then_batches[0])

    @property
    def samples(self) -> int:
        """Samples of the epoch trained (``then_batches`` counted as its ranks trained them)."""
        extra = self.then_batches[0] * self.then_batches[1] * self.then_batches[2] if self.then_batches else 0
        return sum(stop - start for start, stop in self.done) + extra

    def record(self) -> list[list[int]]:
        """For the checkpoint (``epoch_progress``); only ranges (the sampler resolved the rest)."""
        if self.then_batches and self.then_batches[0]:
            raise ValueError("resolve then_batches with ShardSampler.progress_after first")
        return [[start, stop] for start, stop in self.done]

    @classmethod
    def after_batches(cls, batches: int, *, batch_size: int, world_size: int) -> "EpochProgress":
        """An epoch's first ``batches`` batches on every rank of a split (``-b``, processes)."""
        return cls(then_batches=(batches, batch_size, world_size)) if batches else cls()

    @classmethod
    def from_record(cls, ranges) -> "EpochProgress":
        return cls(done=tuple((int(start), int(stop)) for start, stop in ranges))

    @classmethod
    def from_positions(cls, positions: np.ndarray) -> "EpochProgress":
        """The ranges covering a set of positions."""
        if len(positions) == 0:
            return cls()
        positions = np.unique(positions)
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        starts = positions[np.concatenate(([0], breaks))]
        stops = positions[np.concatenate((breaks - 1, [len(positions) - 1]))] + 1
        return cls(done=tuple(zip(starts.tolist(), stops.tolist())))


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

