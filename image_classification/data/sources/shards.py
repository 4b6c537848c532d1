"""Shard sources: TFRecord or WebDataset shards read by sample number through their index files.

Layout in DIR: each split's shards by file-name prefix (:data:`SPLIT_PREFIXES`), ``classes.txt``
beside them (line k = class k; optional), an index file per shard (:mod:`.index`). The format
modules (:mod:`.tfrecord`, :mod:`.webdataset`) index a shard; a read is one ``pread`` of the
indexed bytes (a TFRecord frame is then checked and parsed).
"""
from __future__ import annotations

import logging
import os

import numpy as np

from image_classification.data import remote
from image_classification.data.sources.base import SampleSource, ShardError
from image_classification.data.sources.index import INDEX_SUFFIX, ShardIndex, shard_index
from image_classification.data.sources.tfrecord import frame_image, index_tfrecord
from image_classification.data.sources.webdataset import index_tar
from image_classification.errors import UserError

log = logging.getLogger(__name__)

SHARD_FORMATS = ("tfrecord", "webdataset")
#: file-name prefixes of each split's shards, by format (the first is the one written by prepare)
SPLIT_PREFIXES = {"tfrecord": {"train": ("train-",), "val": ("validation-",)},
                  "webdataset": {"train": ("train-",), "val": ("val-", "validation-")}}
CLASSES_FILE = "classes.txt"
#: not shards, though they may share a shard's prefix
NOT_SHARDS = (INDEX_SUFFIX, ".idx", ".txt", ".json", ".tsv", ".md5", ".tmp")
_INDEXERS = {"tfrecord": index_tfrecord, "webdataset": index_tar}
_SHOWN = 3


def open_shards(kind: str, where: str, files: list[str], *, index_dir: str | None, cache_dir: str | None,
                label_base: int, num_classes: int | None) -> ShardSource:
    """The source of the shard ``files`` (``where``: DIR or the pattern, for messages), each indexed."""
    indexes = [shard_index(shard, kind, build_index, index_dir=index_dir, cache_dir=cache_dir) for shard in files]
    names = _class_names(files[0], cache_dir)
    source = ShardSource(kind, where, files, indexes, label_base=label_base, num_classes=num_classes,
                         class_names=names, cache_dir=cache_dir)
    if source.skipped:
        log.warning("%s: left out %d sample(s) while indexing, e.g. %s", where, len(source.skipped),
                    "; ".join(source.skipped[:_SHOWN]))
    return source


def build_index(path: str, data_format: str) -> ShardIndex:
    """Scan the local shard ``path`` and index its samples (what cannot be used goes to ``skipped``)."""
    try:
        indexer = _INDEXERS[data_format]
    except KeyError:
        raise ValueError(f"not a shard format: {data_format}") from None
    return indexer(path)


def split_shards(location: str, split: str, kind: str) -> list[str]:
    """The ``kind`` shards of ``split`` in the folder ``location`` (none: an empty list)."""
    for prefix in SPLIT_PREFIXES[kind][split]:
        pattern = remote.join(location, prefix + ("*.tar" if kind == "webdataset" else "*"))
        files = [f for f in remote.expand(pattern) if not f.endswith(NOT_SHARDS)
                 and (kind == "webdataset" or not f.endswith(".tar"))]
        if files:
            return files
    return []


class ShardSource(SampleSource):
    """TFRecord or WebDataset shards, each with its :class:`ShardIndex`; a read is one ``pread``."""

    in_shards = True

    def __init__(self, kind: str, location: str, shards: list[str], indexes: list[ShardIndex], *,
                 label_base: int, num_classes: int | None, class_names: list[str] | None, cache_dir: str | None):
        self.kind = kind
        self.location = location
        self.shards = shards
        self.cache_dir = cache_dir
        self.shard_sizes = [index.shard_size for index in indexes]
        self.shard_ids = _joined([[s] * len(index.offsets) for s, index in enumerate(indexes)])
        self.offsets = _joined([index.offsets for index in indexes])
        self.sizes = _joined([index.sizes for index in indexes])
        self.keys = [key for index in indexes for key in index.keys]
        stored = _joined([index.labels for index in indexes])
        self.skipped = [f"{shard}: {what}" for shard, index in zip(shards, indexes) for what in index.skipped]
        if not len(stored):
            raise UserError(f"no samples in the {len(shards)} {kind} shard(s) of {location}"
                            + (f" ({len(self.skipped)} left out, e.g. {self.skipped[0]})" if self.skipped else ""))
        self.label_base = label_base
        self.labels = stored - label_base
        synsets = {int(label) - label_base: synset for index in indexes
                   for label, synset in zip(index.labels, index.synsets) if synset}
        if num_classes is None:
            num_classes = len(class_names) if class_names else int(self.labels.max()) + 1
        self.num_classes = num_classes
        self._check_labels()
        self.class_names = class_names or [synsets.get(k, str(k)) for k in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise UserError(f"{location}: {CLASSES_FILE} names {len(self.class_names)} classes "
                            f"but --num-classes is {num_classes}")
        self.streamed = any(remote.is_remote(shard) for shard in shards)
        self._local: dict[int, str] = {}  # shard -> local path, checked against the index (per process)

    def read(self, i: int) -> bytes:
        shard = int(self.shard_ids[i])
        path = self._local_path(shard)
        offset, size = int(self.offsets[i]), int(self.sizes[i])
        try:
            file = open(path, "rb")
        except FileNotFoundError:  # a cached copy evicted since: fetch it again
            self._local.pop(shard, None)
            file = open(self._local_path(shard), "rb")
        with file:
            data = os.pread(file.fileno(), size, offset)
        if len(data) != size:
            raise ShardError(f"{self.name(i)}: shard ends at byte {offset + len(data)}, the sample needs {size} bytes")
        if self.kind == "tfrecord":
            return frame_image(data, self.name(i))
        return data

    def name(self, i: int) -> str:
        shard = self.shards[int(self.shard_ids[i])]
        return f"{shard} record {self.keys[i]}" if self.kind == "tfrecord" else f"{shard}: {self.keys[i]}"

    def describe(self) -> str:
        skipped = f", {len(self.skipped)} left out" if self.skipped else ""
        return (f"{self.kind} {self.location}: {len(self.shards)} shard(s), {len(self)} samples, "
                f"{self.num_classes} classes{skipped}")

    def _local_path(self, shard: int) -> str:
        path = self._local.get(shard)
        if path is None:
            path = remote.local_copy(self.shards[shard], self.cache_dir)
            size = os.path.getsize(path)
            if size != self.shard_sizes[shard]:
                raise ShardError(f"{self.shards[shard]} has {size} bytes but its index was made for "
                                 f"{self.shard_sizes[shard]}: delete the stale {INDEX_SUFFIX} file")
            self._local[shard] = path
        return path

    def _check_labels(self) -> None:
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= self.num_classes))
        if not len(bad):
            return
        i = int(bad[0])
        stored = int(self.labels[i]) + self.label_base
        base = (f" minus --tfrecord-label-base {self.label_base} = {int(self.labels[i])}"
                if self.kind == "tfrecord" else "")
        hint = (" (TF-slim files store 1-based labels with 0 for background: keep --tfrecord-label-base 1, "
                "or use --tfrecord-label-base 0 --num-classes 1001 to train a 1001-class model)"
                if self.kind == "tfrecord" else " (set --num-classes or list the classes in classes.txt)")
        raise UserError(f"{self.name(i)}: label {stored}{base} is outside 0..{self.num_classes - 1}"
                        f"{f' ({len(bad)} such samples)' if len(bad) > 1 else ''}{hint}")


def _joined(parts: list[list[int]]) -> np.ndarray:
    return np.concatenate([np.asarray(part, dtype=np.int64) for part in parts] or [np.zeros(0, np.int64)])


def _class_names(first_shard: str, cache_dir: str | None) -> list[str] | None:
    """``classes.txt`` beside the shards (one name a line), or None."""
    location = remote.beside(first_shard, CLASSES_FILE)
    if not remote.exists(location):
        return None
    with open(remote.local_copy(location, cache_dir), encoding="utf-8") as file:
        return [line.strip() for line in file if line.strip()]
