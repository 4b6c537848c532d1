"""The "synthetic" backend: one fixed random batch, made once on the device, replayed every step.

For measuring model throughput without any data pipeline cost. The images are ``randn`` (already
in the normalised range, so no normalisation runs) in the run's memory format; the labels are
uniform in ``[0, num_classes)``. Both come from a generator seeded with ``LoaderConfig.seed``.

Unlike the reference, an epoch is finite: ``synthetic_epoch_size`` samples across all processes
(default: 64 global batches), split into batches by :func:`sampling.num_batches`, the same epoch
arithmetic as the real backends. The same tensors are yielded every step: callers must not modify
them in place.
"""
from __future__ import annotations

from typing import Iterator

import torch

from image_classification.data.registry import Backend, LoaderConfig
from image_classification.data.sampling import num_batches
from image_classification.errors import UserError

DEFAULT_BATCHES = 64
DEFAULT_CLASSES = 1000  # without --num-classes


class SyntheticLoader:
    """Yields ``len(self)`` batches, all views of one device-resident batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, length: int, last_batch: int,
                 class_names: list[str]):
        self.images = images
        self.labels = labels
        self.length = length
        self.last_batch = last_batch  # size of the final batch (smaller only when validating)
        self.num_classes = len(class_names)
        self.class_names = class_names
        self.description = ""  # nothing worth a line of its own
        self.start_batch = 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start_batch = start_batch

    def take_skipped(self) -> list[str]:
        return []

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(self.start_batch, self.length):
            size = self.last_batch if step == self.length - 1 else len(self.labels)
            yield self.images[:size], self.labels[:size]


def train_loader(config: LoaderConfig) -> SyntheticLoader:
    return _loader(config, train=True)


def val_loader(config: LoaderConfig) -> SyntheticLoader:
    return _loader(config, train=False)


def _loader(config: LoaderConfig, *, train: bool) -> SyntheticLoader:
    num_classes = DEFAULT_CLASSES if config.num_classes is None else config.num_classes
    if num_classes < 1:
        raise UserError(f"the synthetic backend needs --num_classes >= 1, got {num_classes}")
    global_batch = config.batch_size * config.world_size
    epoch_size = config.synthetic_epoch_size or DEFAULT_BATCHES * global_batch
    length = num_batches(epoch_size, world_size=config.world_size, batch_size=config.batch_size,
                         train=train, rank=config.rank)
    if train and length == 0:
        raise UserError(f"synthetic epoch size {epoch_size} is smaller than one global batch "
                        f"({config.batch_size} x {config.world_size} processes)")
    shard = len(range(config.rank, epoch_size, config.world_size))
    last_batch = config.batch_size if train else shard - (length - 1) * config.batch_size
    images, labels = _fixed_batch(config, num_classes)
    return SyntheticLoader(images, labels, length=length, last_batch=last_batch,
                           class_names=[str(i) for i in range(num_classes)])


def _fixed_batch(config: LoaderConfig, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=config.device)
    generator.manual_seed(config.seed)
    shape = (config.batch_size, 3, config.image_size, config.image_size)
    images = torch.randn(shape, generator=generator, device=config.device)
    labels = torch.randint(0, num_classes, (config.batch_size,), generator=generator,
                           device=config.device, dtype=torch.int64)
    return images.contiguous(memory_format=config.memory_format), labels


BACKEND = Backend("synthetic", train_loader=train_loader, val_loader=val_loader,
                  description="one fixed random batch on the device (throughput benchmarks)")
