"""The "synthetic" backend: one fixed random batch, made once on the device, replayed every step.

For measuring model throughput without any data pipeline cost. The images are ``randn`` (already
in the normalised range, so no normalisation runs) in the run's memory format; the labels are
uniform in ``[0, num_classes)``. Both come from a generator seeded with ``LoaderConfig.seed``.

Unlike the reference, an epoch is finite: ``synthetic_epoch_size`` samples across all processes
(default: 64 global batches), split by a :class:`sampling.ShardSampler` as the real backends'
samples are (a mid-epoch resume counts its samples the same way), though the samples are one batch. The same tensors are yielded every step: callers must not modify
them in place.
"""
from __future__ import annotations

from typing import Iterator

import torch

from image_classification.data.contract import Backend, LoaderConfig
from image_classification.data.loaders.sampling import SamplerEpochs, ShardSampler
from image_classification.errors import UserError

DEFAULT_BATCHES = 64
DEFAULT_CLASSES = 1000  # without --num-classes


class SyntheticLoader(SamplerEpochs):
    """Yields ``len(self)`` batches, all views of one device-resident batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, sampler: ShardSampler, class_names: list[str]):
        self.images = images
        self.labels = labels
        self.sampler = sampler
        self.num_classes = len(class_names)
        self.class_names = class_names
        self.description = ""  # nothing worth a line of its own

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.sampler.batch_size)

    def take_skipped(self) -> list[str]:
        return []

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        samples, batch = len(self.sampler), len(self.labels)
        for start in range(0, samples, batch):
            size = min(batch, samples - start)
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
    sampler = ShardSampler(epoch_size, batch_size=config.batch_size, rank=config.rank,
                           world_size=config.world_size, seed=config.seed, train=train)
    if train and len(sampler) == 0:
        raise UserError(f"synthetic epoch size {epoch_size} is smaller than one global batch "
                        f"({config.batch_size} x {config.world_size} processes)")
    images, labels = _fixed_batch(config, num_classes)
    return SyntheticLoader(images, labels, sampler=sampler, class_names=[str(i) for i in range(num_classes)])


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
