"""Shard index files: what one holds, where it is found or built, and the lock around building it.

A shard gets a small index (byte offset, size, label, key per sample) so a read is one ``pread``
by sample number -- what exact mid-epoch resume, the per-rank split of
:mod:`~image_classification.data.loaders.sampling` and DALI's ``external_source`` need (see
:mod:`image_classification.data.sources`). The format modules (:mod:`.tfrecord`,
:mod:`.webdataset`) scan a shard into a :class:`ShardIndex`; this module owns the file.

Index files (one per shard, ``<shard file name>.samples.tsv``; see :func:`write_index`) are looked up
in ``index_dir`` (``--data-idx-dir``), then beside the shard, then in the cache folder, and built
when missing or stale (shard size changed) into ``index_dir`` if writable, else the cache folder.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable

from image_classification.data import remote
from image_classification.errors import UserError

INDEX_SUFFIX = ".samples.tsv"
INDEX_VERSION = 1


@dataclass
class ShardIndex:
    """What a read needs of one shard: per sample the bytes to read and the stored label."""

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


def shard_index(shard: str, data_format: str, build: Callable[[str, str], ShardIndex], *,
                index_dir: str | None = None, cache_dir: str | None = None) -> ShardIndex:
    """The index of ``shard``: found (in ``index_dir``, beside the shard, in the cache folder) or built
    by ``build(local path, data_format)``."""
    name = index_name(shard)
    cached = os.path.join(index_cache_dir(cache_dir), f"{_location_hash(shard)}-{name}")
    local_size = None if remote.is_remote(shard) else file_size(shard)
    beside = remote.beside(shard, name)
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
            index = build(remote.local_copy(shard, cache_dir), data_format)
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


def file_size(path: str) -> int:
    """The size of a local shard; one UserError line when it cannot be read."""
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
