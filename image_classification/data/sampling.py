"""Which samples each process sees each epoch -- one definition shared by every backend.

Training: the epoch order is a permutation seeded with ``seed + epoch``; its last
``num_samples % world_size`` samples are left out (a different few each epoch), and rank ``r``
takes every ``world_size``-th sample from the ``r``-th on (as ``DistributedSampler``), so a run on
N processes with batch B trains on the same samples per step as one process with batch N*B. Each
rank then drops its last incomplete batch. So every sample is trained on by at most one rank (and,
through the DataLoader's batches, one worker) per epoch, none twice; fewer than
``world_size * batch_size`` are left out. (``DistributedSampler`` pads by wrapping around instead,
so a few samples were seen twice.)

With ``window`` W > 0 (shard sources, ``--shard-shuffle-window``) the permutation is local: the
shards are permuted, taken W at a time, and the samples of each group of W shards are permuted
among themselves; rank ``r`` then takes the ``r``-th of ``world_size`` equal contiguous blocks, so
it reads about ``1/world_size`` of the shards, a few at a time -- what streamed shards need (each
node fetches its share, not every shard) -- at the cost of a less global shuffle.

Validation does not shuffle and does not pad: ranks get uneven strided shares and the engine sums
correct counts across ranks, so every image is scored exactly once.

Written by hand (rather than using DistributedSampler directly) because a mid-epoch resume must
skip the batches already trained on without decoding them, and DALI needs the same index list.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.data import Sampler

from image_classification.data.registry import LoaderConfig

from image_classification.errors import UserError

if TYPE_CHECKING:
    from image_classification.data.sources import SampleSource

#: ``--shard-shuffle-window`` when not given: a global shuffle for local data (random access is
#: cheap), 8 shards at a time for streamed shards (each rank then holds ~8 shards in its cache).
STREAMED_WINDOW = 8


def epoch_indices(num_samples: int, *, rank: int, world_size: int, epoch: int, seed: int,
                  train: bool, shard_ids=None, window: int = 0) -> list[int]:
    """Indices of the samples this rank sees in ``epoch`` (before batching).

    ``shard_ids`` (the shard of each sample) and ``window`` select the shard-window shuffle.
    """
    if not train:
        return list(range(rank, num_samples, world_size))
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    per_rank = num_samples // world_size
    if window > 0 and shard_ids is not None:
        order = _windowed_order(torch.as_tensor(shard_ids, dtype=torch.int64), window, generator)
        return order[rank * per_rank:(rank + 1) * per_rank].tolist()
    order = torch.randperm(num_samples, generator=generator)
    return order[rank:per_rank * world_size:world_size].tolist()


def _windowed_order(shard_ids: torch.Tensor, window: int, generator: torch.Generator) -> torch.Tensor:
    """Shards permuted and grouped ``window`` at a time; the samples of a group permuted together."""
    num_shards = int(shard_ids.max()) + 1 if len(shard_ids) else 0
    position = torch.empty(num_shards, dtype=torch.int64)
    position[torch.randperm(num_shards, generator=generator)] = torch.arange(num_shards)
    group = position[shard_ids] // window
    tie = torch.randperm(len(shard_ids), generator=generator)  # a random order inside each group
    return torch.argsort(group * len(shard_ids) + tie)


def num_batches(num_samples: int, *, world_size: int, batch_size: int, train: bool, rank: int = 0) -> int:
    """Batches per epoch for ``rank``: full batches only when training, all samples when validating."""
    if train:
        return (num_samples // world_size) // batch_size
    shard = len(range(rank, num_samples, world_size))
    return -(-shard // batch_size)


def require_full_batch(num_samples: int, *, batch_size: int, world_size: int, source: str) -> None:
    """Training drops incomplete batches: refuse a split that would give an empty epoch."""
    if num_batches(num_samples, world_size=world_size, batch_size=batch_size, train=True) == 0:
        raise UserError(f"{source} has {num_samples} images, less than one batch per process "
                        f"({batch_size} x {world_size} processes): lower --batch-size")


class ShardSampler(Sampler[int]):
    """A sampler over :func:`epoch_indices` that can start part-way into an epoch."""

    def __init__(self, num_samples: int, *, batch_size: int, rank: int, world_size: int, seed: int, train: bool,
                 shard_ids=None, window: int = 0):
        self.num_samples = num_samples
        self.shard_ids = shard_ids
        self.window = window
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
                                epoch=self.epoch, seed=self.seed, train=self.train,
                                shard_ids=self.shard_ids, window=self.window)
        if self.train:  # drop the last incomplete batch
            indices = indices[: len(indices) // self.batch_size * self.batch_size]
        return indices[self.start_batch * self.batch_size:]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.indices())


def shuffle_window(requested: int | None, streamed: bool) -> int:
    """The shard-window size: ``--shard-shuffle-window`` if given, else 0 (global) or STREAMED_WINDOW."""
    if requested is None:
        return STREAMED_WINDOW if streamed else 0
    if requested < 0:
        raise UserError(f"--shard-shuffle-window must be >= 0, got {requested}")
    return requested


def source_sampler(source: SampleSource, config: LoaderConfig, *, train: bool) -> ShardSampler:
    """The sampler over a :class:`~image_classification.data.sources.SampleSource` of one split;
    training refuses a split with less than one batch per process."""
    if train:
        require_full_batch(len(source), batch_size=config.batch_size, world_size=config.world_size,
                           source=str(source.location))
    sharded = source.in_shards
    return ShardSampler(len(source), batch_size=config.batch_size, rank=config.rank, world_size=config.world_size,
                        seed=config.seed, train=train, shard_ids=source.shard_ids if sharded else None,
                        window=shuffle_window(config.shard_window, source.streamed) if sharded else 0)
