"""Which samples each process sees each epoch -- one definition shared by every backend.

Training follows ``torch.utils.data.DistributedSampler`` (shuffle with ``seed + epoch``, pad by
wrapping around to a multiple of the world size, take every ``world_size``-th index) and drops the
last incomplete batch. Validation does not shuffle and does not pad: ranks get uneven shards and the
engine sums correct counts across ranks, so every image is scored exactly once.

Written by hand (rather than using DistributedSampler directly) because a mid-epoch resume must
skip the batches already trained on without decoding them, and DALI needs the same index list.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler

from image_classification.errors import UserError


def epoch_indices(num_samples: int, *, rank: int, world_size: int, epoch: int, seed: int,
                  train: bool) -> list[int]:
    """Indices of the samples this rank sees in ``epoch`` (before batching)."""
    if train:
        generator = torch.Generator()
        generator.manual_seed(seed + epoch)
        order = torch.randperm(num_samples, generator=generator).tolist()
        per_rank = -(-num_samples // world_size)  # ceil
        total = per_rank * world_size
        while len(order) < total:  # wrap around, as DistributedSampler does
            order += order[: total - len(order)]
        return order[rank:total:world_size]
    return list(range(rank, num_samples, world_size))


def num_batches(num_samples: int, *, world_size: int, batch_size: int, train: bool, rank: int = 0) -> int:
    """Batches per epoch for ``rank``: full batches only when training, all samples when validating."""
    if train:
        return (-(-num_samples // world_size)) // batch_size
    shard = len(range(rank, num_samples, world_size))
    return -(-shard // batch_size)


def require_full_batch(num_samples: int, *, batch_size: int, world_size: int, source: str) -> None:
    """Training drops incomplete batches: refuse a split that would give an empty epoch."""
    if num_batches(num_samples, world_size=world_size, batch_size=batch_size, train=True) == 0:
        raise UserError(f"{source} has {num_samples} images, less than one batch per process "
                        f"({batch_size} x {world_size} processes): lower --batch-size")


class ShardSampler(Sampler[int]):
    """A sampler over :func:`epoch_indices` that can start part-way into an epoch."""

    def __init__(self, num_samples: int, *, batch_size: int, rank: int, world_size: int, seed: int, train: bool):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.train = train
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def indices(self) -> list[int]:
        indices = epoch_indices(self.num_samples, rank=self.rank, world_size=self.world_size,
                                epoch=self.epoch, seed=self.seed, train=self.train)
        if self.train:  # drop the last incomplete batch
            indices = indices[: len(indices) // self.batch_size * self.batch_size]
        return indices[self.start_batch * self.batch_size:]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.indices())
