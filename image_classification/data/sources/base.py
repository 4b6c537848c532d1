"""The source model: the samples of one split as a random-access list, whatever the storage format.

Every format of this package gives a :class:`SampleSource`; every backend reads through one.
"""
from __future__ import annotations

import numpy as np


class ShardError(Exception):
    """A sample's bytes in a shard are damaged (CRC mismatch, short read): the pytorch backend skips
    the sample and counts it, DALI stops with one line naming the shard."""


class SampleSource:
    """The samples of one split. ``labels`` are already mapped to ``0..num_classes-1``."""

    kind: str
    location: str
    labels: np.ndarray       # int64 per sample
    shard_ids: np.ndarray    # int64 per sample (folder: all 0); the shard-window shuffle uses it
    num_classes: int
    class_names: list[str]
    skipped: list[str]       # what indexing left out (no label, truncated tail), reported once
    streamed: bool = False   # some shard is a URL (data.loaders.sampling picks its shuffle window by it)
    in_shards: bool = False  # samples grouped in shard files: --shard-shuffle-window applies (data.loaders.sampling)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> bytes:
        """The encoded image (JPEG/PNG/WebP bytes; packed: PPM or JPEG) of sample ``i``; ShardError/OSError
        when damaged."""
        raise NotImplementedError

    def name(self, i: int) -> str:
        """Where sample ``i`` lives, for messages."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError
