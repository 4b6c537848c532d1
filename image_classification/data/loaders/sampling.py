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

A mid-epoch position is an :class:`~image_classification.data.contract.EpochProgress`: the positions
of the epoch's permutation already trained, which does not depend on the number of processes, the
batch size or the workers. A resumed epoch lays out only the remaining positions, with the rules
above, over however many processes it now has; so each sample of the epoch is trained once, whatever
changed (fewer than ``world_size * batch_size`` of the rest are left out, as in any epoch). Resumed
with the split it was saved with, the layout of the rest is exactly what the uninterrupted run would
have trained.

Written by hand (rather than using DistributedSampler directly) because a mid-epoch resume must
skip the samples already trained on without decoding them, on any number of processes, and DALI
needs the same index list.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Sampler

from image_classification.data.contract import EpochProgress, LoaderConfig
from image_classification.errors import UserError

if TYPE_CHECKING:
    from image_classification.data.sources import SampleSource

#: ``--shard-shuffle-window`` when not given: a global shuffle for local data (random access is
#: cheap), 8 shards at a time for streamed shards (each rank then holds ~8 shards in its cache).
STREAMED_WINDOW = 8


def epoch_order(num_samples: int, *, epoch: int, seed: int, shard_ids=None, window: int = 0) -> torch.Tensor:
    """The epoch's permutation of the training samples: the same on every rank, for any world size."""
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    if window > 0 and shard_ids is not None:
        return _windowed_order(torch.as_tensor(shard_ids, dtype=torch.int64), window, generator)
    return torch.randperm(num_samples, generator=generator)


def rank_positions(positions: np.ndarray, *, rank: int, world_size: int, batch_size: int | None = None,
                   windowed: bool = False) -> np.ndarray:
    """The positions (of the epoch's permutation) that ``rank`` trains, out of ``positions`` still to
    train: every ``world_size``-th from the ``rank``-th on, or (``windowed``) the ``rank``-th of
    ``world_size`` contiguous blocks; cut to whole batches of ``batch_size`` when given."""
    per_rank = len(positions) // world_size
    mine = (positions[rank * per_rank:(rank + 1) * per_rank] if windowed
            else positions[rank:per_rank * world_size:world_size])
    return mine if batch_size is None else mine[:len(mine) // batch_size * batch_size]


def remaining_positions(num_samples: int, progress: EpochProgress) -> np.ndarray:
    """The positions of an epoch not in ``progress.done``, in order."""
    todo = np.ones(num_samples, dtype=bool)
    for start, stop in progress.done:
        todo[start:stop] = False
    return np.flatnonzero(todo)


def epoch_indices(num_samples: int, *, rank: int, world_size: int, epoch: int, seed: int,
                  train: bool, shard_ids=None, window: int = 0) -> list[int]:
    """Indices of the samples this rank sees in a whole ``epoch`` (before batching)."""
    if not train:
        return list(range(rank, num_samples, world_size))
    order = epoch_order(num_samples, epoch=epoch, seed=seed, shard_ids=shard_ids, window=window)
    mine = rank_positions(np.arange(num_samples), rank=rank, world_size=world_size,
                          windowed=window > 0 and shard_ids is not None)
    return order[torch.from_numpy(mine)].tolist()


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
    """A sampler over an epoch's permutation that can start part-way into an epoch
    (:meth:`set_epoch` with an :class:`EpochProgress`), on any number of processes."""

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
        self.progress = EpochProgress()

    def set_epoch(self, epoch: int, progress: EpochProgress | None = None) -> None:
        """Select the epoch's shuffle and (training) leave out what ``progress`` says is trained."""
        self.epoch = epoch
        progress = progress or EpochProgress()
        if progress.then_batches and progress.then_batches[0]:
            progress = self._trained(EpochProgress(progress.done), *progress.then_batches)
        if progress.started and not self.train:
            raise ValueError("a validation split has no mid-epoch position")
        self.progress = progress

    @property
    def _windowed(self) -> bool:
        return self.window > 0 and self.shard_ids is not None

    def _trained(self, progress: EpochProgress, batches: int, batch_size: int, world_size: int) -> EpochProgress:
        """``progress`` plus the first ``batches`` batches of every rank of that layout of the rest."""
        rest = remaining_positions(self.num_samples, progress)
        taken = [rank_positions(rest, rank=rank, world_size=world_size, batch_size=batch_size,
                                windowed=self._windowed)[:batches * batch_size] for rank in range(world_size)]
        done = [np.arange(start, stop) for start, stop in progress.done]
        return EpochProgress.from_positions(np.concatenate([*done, *taken]).astype(np.int64))

    def progress_after(self, batches: int) -> EpochProgress:
        """Where the epoch stands once every rank has trained ``batches`` batches since :meth:`set_epoch`."""
        return self._trained(self.progress, batches, self.batch_size, self.world_size)

    def indices(self) -> list[int]:
        if not self.train:
            return list(range(self.rank, self.num_samples, self.world_size))
        order = epoch_order(self.num_samples, epoch=self.epoch, seed=self.seed, shard_ids=self.shard_ids,
                            window=self.window)
        mine = rank_positions(remaining_positions(self.num_samples, self.progress), rank=self.rank,
                              world_size=self.world_size, batch_size=self.batch_size, windowed=self._windowed)
        return order[torch.from_numpy(mine)].tolist()

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        if not self.train:
            return len(range(self.rank, self.num_samples, self.world_size))
        return (self.num_samples - self.progress.samples) // self.world_size // self.batch_size * self.batch_size


class SamplerEpochs:
    """The :class:`~image_classification.data.contract.Loader` protocol's epoch methods, for a loader
    whose batches follow ``self.sampler`` (every backend's)."""
    sampler: ShardSampler

    def set_epoch(self, epoch: int, progress: EpochProgress | None = None) -> None:
        self.sampler.set_epoch(epoch, progress)

    def progress_after(self, batches: int) -> EpochProgress:
        return self.sampler.progress_after(batches)

    @property
    def epoch_size(self) -> int:
        return self.sampler.num_samples

    @property
    def batches_trained(self) -> int:
        """The epoch's trained samples in batches of this split (where a resumed epoch's count starts)."""
        sampler = self.sampler
        return sampler.progress.samples // (sampler.batch_size * sampler.world_size)


def shuffle_window(requested: int | None, streamed: bool) -> int:
    """The shard-window size: ``--shard-shuffle-window`` if given, else 0 (global) or STREAMED_WINDOW."""
    if requested is None:
        return STREAMED_WINDOW if streamed else 0
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
