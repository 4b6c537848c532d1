"""The samples of one split, wherever they are stored: one object every backend reads through.

A :class:`SampleSource` is a random-access list of ``(encoded image bytes, label)``:

* ``folder``: an ImageFolder tree, listed by :func:`~image_classification.data.checks.scan_split`
  (which owns the folder rules);
* ``tfrecord``: TF-slim's ImageNet files (``train-00000-of-01024`` ... ``validation-*``), each
  record a ``tf.train.Example`` with ``image/encoded`` and ``image/class/label`` (1-based: TF-slim
  keeps 0 for a background class; ``tfrecord_label_base`` is subtracted);
* ``webdataset``: tar shards (``train-*.tar`` / ``val-*.tar``) with members ``KEY.jpg|jpeg|png|webp``
  and ``KEY.cls`` (the 0-based label as text);
* ``packed``: ``train.packed`` / ``val.packed`` with their index and header, images decoded once and
  stored raw or as JPEG in one memory-mapped file a split (:mod:`~image_classification.data.packed`).

Why the shard index and reader are written here rather than taken from ``webdataset``/``wids``,
``tfrecord`` or ``torchdata``: those libraries iterate a shard as a stream, with their own
shuffle buffers and their own split across ranks and workers, so they cannot give a sample *by
number*. Exact mid-epoch resume, the per-rank split of :mod:`~image_classification.data.sampling`
(the one definition every backend follows) and the DALI backend's ``external_source`` all need
random access by sample number. So each shard gets a small index (byte offset, size, label, key per
sample) and a read is one ``pread`` of those bytes. The libraries still do the parsing: ``tarfile``
lists a tar's members and their data offsets, the ``tfrecord`` package's ``example_pb2`` parses a
``tf.train.Example``, and ``google-crc32c`` checks TFRecord frames (masked CRC-32C, as TensorFlow).

Index files (one per shard, ``<shard file name>.samples.tsv``; see :func:`write_index`) are looked up
in ``index_dir`` (``--data-idx-dir``), then beside the shard, then in the cache folder, and built
when missing or stale (shard size changed) into ``index_dir`` if writable, else the cache folder.

Files are reached only through :mod:`image_classification.data.remote`, so shards given as URLs
work wherever that module can fetch them.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import struct
import tarfile
import tempfile
from dataclasses import dataclass, field

import google_crc32c
import numpy as np

from image_classification.data import remote
from image_classification.data.checks import SplitScan, scan_split
from image_classification.data.registry import DATA_FORMATS, LoaderConfig
from image_classification.errors import UserError

log = logging.getLogger(__name__)

FORMATS = DATA_FORMATS
SHARD_FORMATS = ("tfrecord", "webdataset")
#: file-name prefixes of each split's shards, by format (the first is the one written by prepare)
SPLIT_PREFIXES = {"tfrecord": {"train": ("train-",), "val": ("validation-",)},
                  "webdataset": {"train": ("train-",), "val": ("val-", "validation-")}}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INDEX_SUFFIX = ".samples.tsv"
INDEX_VERSION = 1
CLASSES_FILE = "classes.txt"
#: not shards, though they may share a shard's prefix
_NOT_SHARDS = (INDEX_SUFFIX, ".idx", ".txt", ".json", ".tsv", ".md5", ".tmp")
_TF_LABEL = "image/class/label"
_TF_IMAGE = "image/encoded"
_TF_SYNSET = "image/class/synset"
_SHOWN = 3


class ShardError(Exception):
    """A sample's bytes in a shard are damaged (CRC mismatch, short read): the pytorch backend skips
    the sample and counts it, DALI stops with one line naming the shard."""


# ---------------------------------------------------------------- the source

class SampleSource:
    """The samples of one split. ``labels`` are already mapped to ``0..num_classes-1``."""

    kind: str
    location: str
    labels: np.ndarray       # int64 per sample
    shard_ids: np.ndarray    # int64 per sample (folder: all 0); the shard-window shuffle uses it
    num_classes: int
    class_names: list[str]
    skipped: list[str]       # what indexing left out (no label, truncated tail), reported once
    streamed: bool = False   # some shard is a URL (data.sampling picks its shuffle window by it)
    in_shards: bool = False  # samples grouped in shard files: --shard-shuffle-window applies (data.sampling)

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


class FolderSource(SampleSource):
    """An ImageFolder split (a :func:`scan_split` result); sample ``i`` is a file."""

    kind = "folder"

    def __init__(self, scan: SplitScan):
        self.location = scan.root
        self.paths = [path for path, _ in scan.samples]
        self.labels = np.array([label for _, label in scan.samples], dtype=np.int64)
        self.shard_ids = np.zeros(len(self.paths), dtype=np.int64)
        self.class_names = list(scan.class_names)
        self.num_classes = len(self.class_names)
        self.skipped = list(scan.zero_byte)  # scan_split has logged them already

    def read(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as file:
            return file.read()

    def name(self, i: int) -> str:
        return self.paths[i]

    def describe(self) -> str:
        return f"folder {self.location}: {len(self)} images, {self.num_classes} classes"


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
            return tfrecord_image(data, self.name(i))
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


# ---------------------------------------------------------------- opening a split

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
        from image_classification.data.packed import PackedSource  # noqa: PLC0415 -- it imports this module
        return PackedSource(location, split, num_classes)
    where = shards or location
    indexes = [shard_index(shard, kind, index_dir=index_dir, cache_dir=cache_dir) for shard in files]
    names = _class_names(files[0], cache_dir)
    source = ShardSource(kind, where, files, indexes, label_base=tfrecord_label_base if kind == "tfrecord" else 0,
                         num_classes=num_classes, class_names=names, cache_dir=cache_dir)
    if source.skipped:
        log.warning("%s: left out %d sample(s) while indexing, e.g. %s", where, len(source.skipped),
                    "; ".join(source.skipped[:_SHOWN]))
    return source


def detect_format(location: str | None, split: str, *, data_format: str = "auto",
                  shards: str | None = None) -> tuple[str, list[str]]:
    """``(format, shard locations)`` of ``split``: a ``shards`` pattern if given, else what DIR holds
    (``DIR/<split>/`` folder, ``train-*.tar`` WebDataset shards, ``train-*`` TFRecord files)."""
    if shards:
        files = [f for f in remote.expand(shards) if not f.endswith(_NOT_SHARDS)]
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
    if data_format in ("auto", "packed") and not remote.is_remote(location) and _holds_packed(location, split):
        return "packed", []
    if data_format == "packed":
        if remote.is_remote(location):
            raise UserError(f"--data-format packed: {location} is a URL; a packed dataset is memory-mapped: copy it "
                            "to a local disk")
        raise UserError(f"--data-format packed: no {split}.packed.json in {location} "
                        "(write one with: python -m image_classification.data.prepare --to packed SRC DST)")
    candidates = (data_format,) if data_format != "auto" else SHARD_FORMATS[::-1]  # a .tar is not a TFRecord
    for kind in candidates:
        files = _split_shards(location, split, kind)
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


def _holds_packed(location: str, split: str) -> bool:
    from image_classification.data import packed  # noqa: PLC0415 -- it imports this module
    return packed.holds(location, split)


def _split_shards(location: str, split: str, kind: str) -> list[str]:
    for prefix in SPLIT_PREFIXES[kind][split]:
        pattern = _join(location, prefix + ("*.tar" if kind == "webdataset" else "*"))
        files = [f for f in remote.expand(pattern) if not f.endswith(_NOT_SHARDS)
                 and (kind == "webdataset" or not f.endswith(".tar"))]
        if files:
            return files
    return []


def _join(location: str, name: str) -> str:
    return location.rstrip("/") + "/" + name if remote.is_remote(location) else os.path.join(location, name)


def _class_names(first_shard: str, cache_dir: str | None) -> list[str] | None:
    """``classes.txt`` beside the shards (one name a line), or None."""
    location = _join(os.path.dirname(first_shard) if not remote.is_remote(first_shard)
                     else first_shard.rsplit("/", 1)[0], CLASSES_FILE)
    if not remote.exists(location):
        return None
    with open(remote.local_copy(location, cache_dir), encoding="utf-8") as file:
        return [line.strip() for line in file if line.strip()]


# ---------------------------------------------------------------- index files

@dataclass
class ShardIndex:
    """What :func:`read` needs of one shard: per sample the bytes to read and the stored label."""

    format: str                  # "tfrecord" | "webdataset"
    shard_size: int              # bytes of the shard the index describes (a mismatch = stale)
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)    # as stored (TF-slim: 1-based)
    keys: list[str] = field(default_factory=list)      # tfrecord: record number; webdataset: KEY
    synsets: list[str] = field(default_factory=list)   # tfrecord: image/class/synset ("" if none)
    skipped: list[str] = field(default_factory=list)   # samples left out, and why

    def add(self, offset: int, size: int, label: int, key: str, synset: str = "") -> None:
        self.offsets.append(offset)
        self.sizes.append(size)
        self.labels.append(label)
        self.keys.append(key)
        self.synsets.append(synset)


def index_name(shard: str) -> str:
    """The index file name of a shard location: ``<shard file name>.samples.tsv``."""
    return shard.rstrip("/").rsplit("/", 1)[-1] + INDEX_SUFFIX


def write_index(path: str, index: ShardIndex) -> None:
    """Write ``index`` to ``path`` atomically (a temporary file renamed into place).

    Format (UTF-8 text; ``#`` lines are comments except the first)::

        # convnets-index 1 <format> <shard size in bytes>
        # skipped <what was left out>            (any number)
        <offset>\\t<size>\\t<label as stored>\\t<key>[\\t<synset>]

    ``offset``/``size``: the bytes a read takes -- a tar member's data, or a whole TFRecord frame
    (length, length CRC, data, data CRC) so the CRCs are checked on every read.
    """
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; others (a web server) may serve it
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(f"# convnets-index {INDEX_VERSION} {index.format} {index.shard_size}\n")
            for what in index.skipped:
                file.write(f"# skipped {_one_line(what)}\n")
            synsets = index.synsets or [""] * len(index.offsets)
            for offset, size, label, key, synset in zip(index.offsets, index.sizes, index.labels, index.keys, synsets):
                tail = f"\t{_one_line(synset)}" if synset else ""
                file.write(f"{offset}\t{size}\t{label}\t{_one_line(key)}{tail}\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_index(path: str) -> ShardIndex | None:
    """The index in ``path``, or None when it is not a readable index of this version."""
    try:
        with open(path, encoding="utf-8") as file:
            header = file.readline().split()
            if len(header) != 5 or header[:3] != ["#", "convnets-index", str(INDEX_VERSION)]:
                return None
            index = ShardIndex(format=header[3], shard_size=int(header[4]))
            for line in file:
                if line.startswith("# skipped "):
                    index.skipped.append(line[len("# skipped "):].rstrip("\n"))
                    continue
                if line.startswith("#"):
                    continue
                parts = line.rstrip("\n").split("\t")
                index.add(int(parts[0]), int(parts[1]), int(parts[2]), parts[3], parts[4] if len(parts) > 4 else "")
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None
    return index


def build_index(path: str, data_format: str) -> ShardIndex:
    """Scan the local shard ``path`` and index its samples (what cannot be used goes to ``skipped``)."""
    if data_format == "tfrecord":
        return _index_tfrecord(path)
    if data_format == "webdataset":
        return _index_tar(path)
    raise ValueError(f"not a shard format: {data_format}")


def shard_index(shard: str, data_format: str, *, index_dir: str | None = None,
                cache_dir: str | None = None) -> ShardIndex:
    """The index of ``shard``: found (in ``index_dir``, beside the shard, in the cache folder) or built."""
    name = index_name(shard)
    cached = os.path.join(index_cache_dir(cache_dir), f"{_location_hash(shard)}-{name}")
    local_size = None if remote.is_remote(shard) else _size(shard)
    beside = _join(os.path.dirname(shard) if not remote.is_remote(shard) else shard.rsplit("/", 1)[0], name)
    for candidate in ([os.path.join(index_dir, name)] if index_dir else []) + [beside, cached]:
        if candidate == beside and not remote.exists(candidate):
            continue
        path = remote.local_copy(candidate, cache_dir) if candidate == beside else candidate
        index = read_index(path)
        # A remote shard's size is checked when it is first read (ShardSource._local_path).
        if index is not None and index.format == data_format and local_size in (None, index.shard_size):
            return index
    # Into --data-idx-dir unless a (stale) index of someone else's is there: never overwrite it.
    mine = os.path.join(index_dir, name) if index_dir and _writable(index_dir) else None
    target = mine if mine and not os.path.exists(mine) else cached
    with _building(target):  # ranks and workers on one machine build each index once
        index = read_index(target)
        if index is None or index.format != data_format or local_size not in (None, index.shard_size):
            index = build_index(remote.local_copy(shard, cache_dir), data_format)
            write_index(target, index)
    return index


@contextlib.contextmanager
def _building(target: str):
    """An exclusive lock on ``target + ".lock"`` (processes of one machine wait for the builder).

    The index is in place before the lock file is removed, so a process arriving later finds it
    without locking, and one that waited re-reads it under the lock.
    """
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    lock = target + ".lock"
    with open(lock, "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock)
            fcntl.flock(file, fcntl.LOCK_UN)


def _umask() -> int:
    """The process umask, read without setting it (``os.umask`` would change it for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def index_cache_dir(cache_dir: str | None) -> str:
    """Where built index files go when ``--data-idx-dir`` is not given (or not writable)."""
    if cache_dir:
        return os.path.join(cache_dir, "index")
    return os.path.join(remote.cache_root(), "index")


def _location_hash(location: str) -> str:
    return hashlib.blake2b(os.path.abspath(location).encode() if not remote.is_remote(location)
                           else location.encode(), digest_size=6).hexdigest()


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None


def _writable(directory: str) -> bool:
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


def _one_line(text: str) -> str:
    return text.replace("\t", " ").replace("\n", " ")


# ---------------------------------------------------------------- TFRecord

def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C (TensorFlow's ``crc32c::Mask``)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _index_tfrecord(path: str) -> ShardIndex:
    from tfrecord import example_pb2

    size = _size(path)
    index = ShardIndex(format="tfrecord", shard_size=size)
    with open(path, "rb") as file:
        record = 0
        while True:
            offset = file.tell()
            header = file.read(12)
            if not header:
                break
            if len(header) < 12:
                index.skipped.append(f"truncated record {record} at byte {offset} ({size - offset} bytes ignored)")
                break
            length, length_crc = struct.unpack("<QI", header)
            if masked_crc(header[:8]) != length_crc:
                index.skipped.append(f"record {record}: length CRC mismatch at byte {offset} "
                                     f"(the remaining {size - offset} bytes ignored)")
                break
            if offset + 12 + length + 4 > size:
                index.skipped.append(f"truncated record {record} at byte {offset} ({size - offset} bytes ignored)")
                break
            data = file.read(length)
            file.seek(4, os.SEEK_CUR)  # the data CRC is checked on every read
            label, synset, problem = _tf_label(data, example_pb2)
            if problem:
                index.skipped.append(f"record {record}: {problem}")
            else:
                index.add(offset, 12 + length + 4, label, str(record), synset)
            record += 1
    return index


def _tf_label(data: bytes, example_pb2) -> tuple[int, str, str | None]:
    example = example_pb2.Example()
    try:
        example.ParseFromString(data)
    except Exception:  # noqa: BLE001 -- protobuf's DecodeError and friends
        return 0, "", "not a tf.train.Example"
    features = example.features.feature
    if _TF_IMAGE not in features or not features[_TF_IMAGE].bytes_list.value:
        return 0, "", f"no {_TF_IMAGE}"
    if _TF_LABEL not in features or not features[_TF_LABEL].int64_list.value:
        return 0, "", f"no {_TF_LABEL}"
    synset = features[_TF_SYNSET].bytes_list.value if _TF_SYNSET in features else []
    return int(features[_TF_LABEL].int64_list.value[0]), synset[0].decode("utf-8", "replace") if synset else "", None


def tfrecord_image(frame: bytes, name: str) -> bytes:
    """``image/encoded`` of one whole TFRecord frame, after checking both of its CRCs."""
    from tfrecord import example_pb2

    length, length_crc = struct.unpack("<QI", frame[:12])
    data = frame[12:12 + length]
    if masked_crc(frame[:8]) != length_crc or len(frame) != 12 + length + 4:
        raise ShardError(f"{name}: bad record frame (length CRC mismatch)")
    (data_crc,) = struct.unpack("<I", frame[12 + length:])
    if masked_crc(data) != data_crc:
        raise ShardError(f"{name}: data CRC mismatch (the shard is damaged)")
    example = example_pb2.Example()
    try:
        example.ParseFromString(data)
        return example.features.feature[_TF_IMAGE].bytes_list.value[0]
    except Exception as error:  # noqa: BLE001 -- protobuf's DecodeError; no image/encoded
        raise ShardError(f"{name}: not a tf.train.Example with {_TF_IMAGE} ({error})") from None


# ---------------------------------------------------------------- WebDataset tar

def _index_tar(path: str) -> ShardIndex:
    size = _size(path)
    index = ShardIndex(format="webdataset", shard_size=size)
    images: dict[str, tarfile.TarInfo] = {}
    labels: dict[str, tarfile.TarInfo] = {}
    order: list[str] = []
    end = 0  # where the last member's data ends
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                end = member.offset_data + member.size
                if not member.isfile():
                    continue
                key, _, extension = _split_key(member.name)
                if key not in images and key not in labels:
                    order.append(key)
                if extension.lower() in IMAGE_EXTENSIONS and key not in images:
                    images[key] = member
                elif extension == "cls":
                    labels[key] = member
    except tarfile.ReadError as error:
        if end <= size:  # (a member cut short is reported below, as its sample)
            index.skipped.append(f"unreadable tar data after byte {end} ({error}); the rest ignored")
    else:
        # tarfile ends its iteration without a word at a header it cannot read past the first
        # member (a copy cut inside a header, garbage): what follows the last member must be the
        # archive's zero end blocks, or data was lost.
        tail = -(-end // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if _holds_data(path, tail, size):
            index.skipped.append(f"unreadable tar data after byte {tail} ({size - tail} bytes ignored: a header cut "
                                 "short or damaged)")
    with open(path, "rb") as file:
        for key in order:
            image, label = images.get(key), labels.get(key)
            if image is None:
                index.skipped.append(f"{key}: no image ({'/'.join(IMAGE_EXTENSIONS)})")
                continue
            if label is None:
                index.skipped.append(f"{key}: no .cls label")
                continue
            if max(image.offset_data + image.size, label.offset_data + label.size) > size:
                index.skipped.append(f"{key}: truncated (the shard ends at byte {size})")
                continue
            text = os.pread(file.fileno(), label.size, label.offset_data)
            try:
                value = int(text.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                index.skipped.append(f"{key}.cls is not an integer: {text[:20]!r}")
                continue
            index.add(image.offset_data, image.size, value, key)
    return index


def _holds_data(path: str, start: int, stop: int, chunk: int = 1 << 20) -> bool:
    """Whether bytes ``start..stop`` of ``path`` are anything but zeros."""
    with open(path, "rb") as file:
        file.seek(start)
        while start < stop:
            block = file.read(min(chunk, stop - start))
            if not block:
                return False
            if block.count(0) != len(block):
                return True
            start += len(block)
    return False


def _split_key(name: str) -> tuple[str, str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), dot, extension

