"""The packed form of a split: images decoded once, capped, stored back to back in one memory-mapped file.

``python -m image_classification.data.prepare --to packed SRC DST`` writes it
(:mod:`~image_classification.data.prepare.pack`); every backend reads it through :class:`PackedSource`, a
:class:`~image_classification.data.sources.base.SampleSource` like the folder and the shards, so
sharding, shuffling, exact resume and the bad-input rules are theirs unchanged.

Layout, per split (``train``, ``val``) in DST::

    <split>.packed        the samples' bytes back to back: each a binary PPM ("P6", 8-bit RGB;
                          the raw pixels behind a ~15-byte header) or a JPEG, by the header's encoding
    <split>.packed.npy    the index, a NumPy structured array: per sample offset, size (bytes),
                          label, height, width, CRC-32C of its bytes
    <split>.packed.json   the header, written last: format name and version, encoding (raw|jpeg),
                          JPEG quality, the shorter-side cap, class names, sample count, the data
                          file's length and the index file's length and CRC-32C

Why each sample is a PPM rather than bare pixels: it is self-describing, so a sample's bytes are
"an encoded image" like a JPEG in a shard, and both the pytorch backend (PIL reads a PPM with one
copy: ~0.06 ms for 213x160, against ~0.5 ms to decode the same image as a JPEG q90) and DALI
(``fn.decoders`` reads PNM) take it through their existing paths with no second code path.

Integrity, checked where it is cheap: on open, the header's version, the data file's length
(a truncated copy) and the index's length and CRC, each failure one line naming the file; on every
read, the sample's CRC-32C (a few microseconds per 100 KB), a mismatch being a
:class:`~image_classification.data.sources.base.ShardError` that the pytorch backend skips and counts
and DALI turns into one line, as for a damaged shard record.

The data file is memory-mapped (``numpy.memmap``) on first read in each process, so DataLoader
workers share the page cache and a read is one copy out of it.
"""
from __future__ import annotations

import json
import os

import google_crc32c
import numpy as np

from image_classification.data.sources.base import SampleSource, ShardError
from image_classification.errors import UserError

FORMAT = "packed"
FORMAT_NAME = "convnets-packed"
VERSION = 1
ENCODINGS = ("raw", "jpeg")
DATA_SUFFIX = ".packed"
INDEX_SUFFIX = ".packed.npy"
HEADER_SUFFIX = ".packed.json"
#: what a reader needs from the header (the writer also records the split, the input's digest and description)
HEADER_KEYS = ("encoding", "quality", "max_size", "samples", "classes", "data_bytes", "index_bytes", "index_crc32c",
               "left_out")
INDEX_DTYPE = np.dtype([("offset", "<u8"), ("size", "<u8"), ("label", "<i8"), ("height", "<u4"),
                        ("width", "<u4"), ("crc32c", "<u4")])


def paths(location: str, split: str) -> dict[str, str]:
    """The ``data``, ``index`` and ``header`` file of ``split`` in ``location``."""
    return {"data": os.path.join(location, split + DATA_SUFFIX), "index": os.path.join(location, split + INDEX_SUFFIX),
            "header": os.path.join(location, split + HEADER_SUFFIX)}


def holds(location: str, split: str) -> bool:
    """Whether ``location`` holds a packed ``split`` (its header is the mark of a complete one)."""
    return os.path.isfile(paths(location, split)["header"])


def file_crc(path: str) -> int:
    """CRC-32C of a whole file, read in 8 MB blocks."""
    crc = 0
    with open(path, "rb") as file:
        while block := file.read(8 << 20):
            crc = google_crc32c.extend(crc, block)
    return crc


def read_header(path: str) -> dict:
    """The header in ``path``, checked for the format name and version; one-line UserError otherwise."""
    try:
        with open(path, encoding="utf-8") as file:
            header = json.load(file)
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise UserError(f"{path} is not a packed-dataset header ({error}): convert again") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise UserError(f"{path} is not a packed-dataset header (no \"format\": \"{FORMAT_NAME}\"): convert again")
    if header.get("version") != VERSION:
        raise UserError(f"{path}: packed format version {header.get('version')}, this convnets reads version "
                        f"{VERSION}: convert again with this version's prepare --to packed")
    missing = [key for key in HEADER_KEYS if key not in header]
    if missing:
        raise UserError(f"{path} is not a complete packed-dataset header (no {', '.join(missing)}): convert again")
    return header


class PackedSource(SampleSource):
    """One packed split; sample ``i`` is bytes ``offset .. offset+size`` of the data file."""

    kind = FORMAT

    def __init__(self, location: str, split: str, num_classes: int | None = None):
        files = paths(location, split)
        self.location, self.data_path = location, files["data"]
        header = read_header(files["header"])
        self.encoding, self.quality, self.max_size = header["encoding"], header["quality"], header["max_size"]
        _check_length(files["data"], header["data_bytes"], files["header"])
        _check_length(files["index"], header["index_bytes"], files["header"])
        if file_crc(files["index"]) != header["index_crc32c"]:
            raise UserError(f"{files['index']}: CRC mismatch with its header {files['header']} "
                            "(the file is damaged or from another conversion): convert again")
        try:
            self.index = np.load(files["index"], allow_pickle=False)
        except (OSError, ValueError) as error:
            raise UserError(f"{files['index']} is not a packed index ({error}): convert again") from None
        if self.index.dtype != INDEX_DTYPE or len(self.index) != header["samples"]:
            raise UserError(f"{files['index']} does not match its header {files['header']}: convert again")
        self.labels = self.index["label"].astype(np.int64)
        self.shard_ids = np.zeros(len(self.labels), dtype=np.int64)
        self.class_names = list(header["classes"])
        self.num_classes = num_classes if num_classes is not None else len(self.class_names)
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise UserError(f"{files['index']}: labels {self.labels.min()}..{self.labels.max()} do not fit "
                            f"{self.num_classes} classes (--num-classes)")
        self.skipped = []
        self._data: np.memmap | None = None  # mapped on first read, in the process that reads

    def read(self, i: int) -> bytes:
        if self._data is None:
            self._data = np.memmap(self.data_path, dtype=np.uint8, mode="r")
        entry = self.index[i]
        offset, size = int(entry["offset"]), int(entry["size"])
        data = self._data[offset:offset + size].tobytes()
        if google_crc32c.value(data) != int(entry["crc32c"]):
            raise ShardError(f"{self.name(i)}: CRC mismatch (the file is damaged)")
        return data

    def name(self, i: int) -> str:
        return f"{self.data_path} sample {i}"

    def describe(self) -> str:
        what = "raw" if self.encoding == "raw" else f"JPEG q{self.quality}"
        return (f"packed {self.data_path}: {len(self)} images ({what}, shorter side <= {self.max_size} px), "
                f"{self.num_classes} classes")

    def __getstate__(self) -> dict:
        # A memmap pickles as a copy of the whole array: a process that gets this source pickled maps its own.
        return {**self.__dict__, "_data": None}


def _check_length(path: str, expected: int, header: str) -> None:
    try:
        size = os.path.getsize(path)
    except OSError as error:
        raise UserError(f"cannot read {path} (named by {header}): {error.strerror or error}") from None
    if size != expected:
        what = "truncated" if size < expected else "longer than written"
        raise UserError(f"{path} is {what}: {size} bytes, its header {header} says {expected}: "
                        "copy it again or convert again")
