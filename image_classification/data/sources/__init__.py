"""The samples of one split, wherever they are stored: one object every backend reads through.

This front finds which format DIR (or a shard pattern) holds and opens it (:func:`open_split`,
:func:`open_source`, :func:`detect_format`). A :class:`~.base.SampleSource` is a random-access list
of ``(encoded image bytes, label)``; one module per format:

* ``folder`` (:mod:`.folder`): an ImageFolder tree, listed by :func:`~.folder.scan_split` (which
  owns the folder rules);
* ``tfrecord`` (:mod:`.tfrecord`): TF-slim's ImageNet files (``train-00000-of-01024`` ...
  ``validation-*``), each record a ``tf.train.Example`` with ``image/encoded`` and
  ``image/class/label`` (1-based: TF-slim keeps 0 for a background class; ``tfrecord_label_base``
  is subtracted);
* ``webdataset`` (:mod:`.webdataset`): tar shards (``train-*.tar`` / ``val-*.tar``) with members
  ``KEY.jpg|jpeg|png|webp`` and ``KEY.cls`` (the 0-based label as text);
* ``packed`` (:mod:`.packed`): ``train.packed`` / ``val.packed`` with their index and header, images
  decoded once and stored raw or as JPEG in one memory-mapped file a split.

Both shard formats are read through :mod:`.shards` and their index files (:mod:`.index`).

Why the shard index and reader are written here rather than taken from ``webdataset``/``wids``,
``tfrecord`` or ``torchdata``: those libraries iterate a shard as a stream, with their own
shuffle buffers and their own split across ranks and workers, so they cannot give a sample *by
number*. Exact mid-epoch resume, the per-rank split of :mod:`~image_classification.data.loaders.sampling`
(the one definition every backend follows) and the DALI backend's ``external_source`` all need
random access by sample number. So each shard gets a small index (byte offset, size, label, key per
sample) and a read is one ``pread`` of those bytes. The libraries still do the parsing: ``tarfile``
lists a tar's members and their data offsets, the ``tfrecord`` package's ``example_pb2`` parses a
``tf.train.Example``, and ``google-crc32c`` checks TFRecord frames (masked CRC-32C, as TensorFlow).

Files are reached only through :mod:`image_classification.data.remote`, so shards given as URLs
work wherever that module can fetch them.
"""
from __future__ import annotations

import logging
import os

from image_classification.data import remote
from image_classification.data.contract import DATA_FORMATS, LoaderConfig
from image_classification.data.sources import packed
from image_classification.data.sources.base import SampleSource, ShardError
from image_classification.data.sources.folder import FolderSource, scan_split
from image_classification.data.sources.shards import (NOT_SHARDS, SHARD_FORMATS, SPLIT_PREFIXES, open_shards,
                                                      split_shards)
from image_classification.errors import UserError

__all__ = ["FORMATS", "SampleSource", "ShardError", "detect_format", "open_source", "open_split"]

log = logging.getLogger(__name__)

FORMATS = DATA_FORMATS


def open_split(config: LoaderConfig, split: str) -> SampleSource:
    """The source of ``split`` as a backend's :class:`LoaderConfig` describes it."""
    source = open_source(config.data_dir, split, data_format=config.data_format,
                         shards=config.train_shards if split == "train" else config.val_shards,
                         index_dir=config.index_dir, cache_dir=config.cache_dir,
                         tfrecord_label_base=config.tfrecord_label_base, num_classes=config.num_classes)
    if source.kind == "packed":  # stored smaller than this run needs: say so (the results differ from the original's)
        flag, needed = ("--image-size", config.image_size) if split == "train" else ("--val-resize-size",
                                                                                        config.val_resize_size)
        if source.max_size < needed:
            log.warning("%s stores images with the shorter side <= %d px, less than %s %d: they are enlarged "
                        "(convert again with a larger prepare --max-size)", source.location, source.max_size,
                        flag, needed)
    return source


def open_source(location: str | None, split: str, *, data_format: str = "auto", shards: str | None = None,
                index_dir: str | None = None, cache_dir: str | None = None, tfrecord_label_base: int = 1,
                num_classes: int | None = None) -> SampleSource:
    """The samples of ``split`` ("train" or "val") in ``location`` (DIR), or of the ``shards`` pattern.

    ``data_format`` "auto" detects the format (:func:`detect_format`); ``num_classes`` (the user's
    ``--num-classes``) fixes the class count of shard sources, else ``classes.txt`` beside the
    shards does, else the largest label + 1.
    """
    if data_format not in FORMATS:
        raise UserError(f"unknown --data-format {data_format!r}; choose one of: {', '.join(FORMATS)}")
    kind, files = detect_format(location, split, data_format=data_format, shards=shards)
    if kind == "folder":
        return FolderSource(scan_split(location, split))
    if kind == "packed":
        return packed.PackedSource(location, split, num_classes)
    return open_shards(kind, shards or location, files, index_dir=index_dir, cache_dir=cache_dir,
                       label_base=tfrecord_label_base if kind == "tfrecord" else 0, num_classes=num_classes)


def detect_format(location: str | None, split: str, *, data_format: str = "auto",
                  shards: str | None = None) -> tuple[str, list[str]]:
    """``(format, shard locations)`` of ``split``: a ``shards`` pattern if given, else what DIR holds
    (``DIR/<split>/`` folder, ``train-*.tar`` WebDataset shards, ``train-*`` TFRecord files)."""
    if shards:
        files = [f for f in remote.expand(shards) if not f.endswith(NOT_SHARDS)]
        if not files:
            raise UserError(f"--{split}-shards {shards} names no file")
        if data_format in ("folder", "packed"):
            raise UserError(f"--data-format {data_format} cannot read --{split}-shards {shards}")
        kind = data_format if data_format != "auto" else (
            "webdataset" if all(f.endswith(".tar") for f in files) else "tfrecord")
        return kind, files
    if not location or data_format == "folder":
        return "folder", []
    if data_format == "auto" and not remote.is_remote(location) and os.path.isdir(os.path.join(location, split)):
        return "folder", []
    if data_format in ("auto", "packed") and not remote.is_remote(location) and packed.holds(location, split):
        return "packed", []
    if data_format == "packed":
        if remote.is_remote(location):
            raise UserError(f"--data-format packed: {location} is a URL; a packed dataset is memory-mapped: copy it "
                            "to a local disk")
        raise UserError(f"--data-format packed: no {split}.packed.json in {location} "
                        "(write one with: python -m image_classification.data.prepare --to packed SRC DST)")
    candidates = (data_format,) if data_format != "auto" else SHARD_FORMATS[::-1]  # a .tar is not a TFRecord
    for kind in candidates:
        files = split_shards(location, split, kind)
        if files:
            return kind, files
    if data_format != "auto":
        wanted = " or ".join(f"{p}*{'.tar' if data_format == 'webdataset' else ''}"
                             for p in SPLIT_PREFIXES[data_format][split])
        raise UserError(f"--data-format {data_format}: no {wanted} files in {location}")
    if remote.is_remote(location):
        raise UserError(f"found no {split} shards at {location} (a URL that cannot be listed?): name them with "
                        f"--{split}-shards PATTERN, e.g. {location.rstrip('/')}/{split}-{{000000..000127}}.tar")
    return "folder", []  # neither: scan_split reports the missing folder

