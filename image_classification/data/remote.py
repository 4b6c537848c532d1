"""Where shard files live: local paths, ``http(s)://`` URLs and fsspec URLs (``s3://``, ``gs://``, ...).

The shard layer (``image_classification.data.sources``) reaches files only through these
functions, so a remote location is one module's business:

* :func:`is_remote` -- whether a location is a URL rather than a local path;
* :func:`expand` -- a pattern to the sorted list of shard locations it names: brace ranges and
  lists (``train-{000000..000127}.tar``, ``{train,val}-0.tar``) first, then shell globs (``*``,
  ``?``, ``[...]``) on local paths and on filesystems that can list (``s3://``; not ``http``);
* :func:`exists` -- whether one location exists (an index file beside a shard, say);
* :func:`list_dir` -- the names in a folder (local or a listable URL), for format detection;
* :func:`join`, :func:`beside` -- a file's location in a folder, or beside another file (an index
  or ``classes.txt`` beside a shard), local or URL;
* :func:`local_copy` -- a local path holding the location's bytes: the path itself for a local
  file; for a URL a copy in the shard cache (:func:`default_cache_dir` unless one is named).

Remote reading is a sequential download of a whole shard on its first use: a shard is the unit a
loader reads through from start to end, and a local copy gives every reader (the pytorch
workers' seeks by index offset, DALI's file readers) an ordinary file. The copy is written to a
hidden ``.NAME.<pid>.part`` and renamed into place when complete, under a per-shard ``fcntl``
lock, so the ranks and DataLoader workers of one machine download each shard once and nobody
ever sees half a shard. A failed transfer (dropped connection, timeout, server error) is retried
``ATTEMPTS`` times with doubling pauses, then raises one :class:`UserError` line naming the URL.

The cache folder mirrors the URL (``<cache>/<scheme>/<host>/<path>``), never revalidates (shards
are immutable by convention: delete the folder to fetch again), and marks every file it writes
with a hidden ``.NAME.from`` beside it (the URL, without credentials or query). Only marked files
are ever deleted: with ``max_cache_bytes`` the least recently used marked shards are evicted
after a download until the marked total fits; files anyone else put there are never touched. An
evicted shard is fetched again on its next use; a reader that already has it open keeps its data
(POSIX unlink semantics).

Why fsspec: one well-kept API (open, glob, ls, exists) over http (aiohttp) and object stores
(s3fs; gcsfs/adlfs when installed), with credentials and endpoints taken from each store's usual
configuration (``AWS_*`` variables, ``~/.aws``, ``AWS_ENDPOINT_URL`` for MinIO and the like); the
retry, lock and cache policy above is ours because fsspec's own caches (``simplecache::``) have no
cross-process lock and no eviction that spares foreign files.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import hashlib
import os
import posixpath
import re
import shutil
import time
from typing import Iterator
from urllib.parse import urlsplit

import braceexpand

from image_classification.errors import UserError

ATTEMPTS = 4          # tries per download before the UserError
BACKOFF_S = 0.5       # pause after the first failed try; doubled after each further one
CHUNK = 4 << 20       # bytes per read of a download
CONNECT_TIMEOUT_S = 30
READ_TIMEOUT_S = 60   # a connection silent this long counts as dropped

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_GLOB = re.compile(r"[*?\[]")
_MARK_SUFFIX = ".from"
_UNLISTABLE = ("http", "https")


def is_remote(location: str) -> bool:
    return bool(_URL.match(location)) and not location.startswith("file://")


def cache_root() -> str:
    """This toolkit's cache folder: ``$XDG_CACHE_HOME/convnets``, i.e. ``~/.cache/convnets`` by default."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "convnets")


def default_cache_dir() -> str:
    """Where shard copies go when no cache folder is named: ``<cache_root()>/shards``."""
    return os.path.join(cache_root(), "shards")


def expand(pattern: str) -> list[str]:
    """The sorted shard locations a pattern names (brace ranges, then globs; see the module docstring).

    Every name the braces expand to must exist (a glob among them must match something): a typo in
    a range or an incomplete copy stops the run with one line rather than training on part of the
    data. Remote names without a glob are returned unchecked (checking 1024 shards would cost 1024
    requests); a missing one fails when :func:`local_copy` fetches it.
    """
    try:
        names = list(braceexpand.braceexpand(pattern))
    except braceexpand.UnbalancedBracesError:
        raise UserError(f"{pattern}: unbalanced braces in the shard pattern") from None
    found: set[str] = set()
    missing: list[str] = []
    for name in names:
        if not is_remote(name):
            matches = glob.glob(_strip_file_scheme(name))
        elif _GLOB.search(urlsplit(name).path):
            fs, path = _filesystem(name)
            _require_listable(fs, name)
            matches = [fs.unstrip_protocol(match) for match in _call(name, fs.glob, path)]
        else:
            matches = [name]
        found.update(matches)
        if not matches:
            missing.append(name)
    if missing and found:  # (nothing at all: the caller says what it looked for)
        shown = [_public(name) if is_remote(name) else name for name in missing[:3]]
        raise UserError(f"{_public(pattern) if is_remote(pattern) else pattern}: {len(missing)} of the {len(names)} "
                        f"shard(s) it names do not exist ({', '.join(shown)}{', ...' if len(missing) > 3 else ''})")
    return sorted(found)


def exists(location: str) -> bool:
    if not is_remote(location):
        return os.path.exists(_strip_file_scheme(location))
    fs, path = _filesystem(location)
    return bool(_call(location, fs.exists, path))


def list_dir(location: str) -> list[str]:
    """The sorted entry names (files and folders, like ``os.listdir``) in a local or listable folder."""
    if not is_remote(location):
        folder = _strip_file_scheme(location)
        if not os.path.isdir(folder):
            raise UserError(f"{location}: not a folder")
        return sorted(os.listdir(folder))
    fs, path = _filesystem(location)
    _require_listable(fs, location)
    try:
        entries = _call(location, fs.ls, path.rstrip("/"), detail=False)
    except FileNotFoundError:
        raise UserError(f"{location}: not found") from None
    return sorted(posixpath.basename(entry.rstrip("/")) for entry in entries)


def join(folder: str, name: str) -> str:
    """The location of ``name`` in ``folder`` (a local path or a URL)."""
    return folder.rstrip("/") + "/" + name if is_remote(folder) else os.path.join(folder, name)


def beside(location: str, name: str) -> str:
    """The location of ``name`` in the folder that holds ``location``."""
    return join(location.rsplit("/", 1)[0] if is_remote(location) else os.path.dirname(location), name)


def local_copy(location: str, cache_dir: str | None = None, max_cache_bytes: int | None = None) -> str:
    """A local file with the location's bytes (see the module docstring); fetched once per machine."""
    if not is_remote(location):
        return _strip_file_scheme(location)
    cache = cache_dir or default_cache_dir()
    target = cache_path(cache, location)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with _locked(target):
        if os.path.exists(target):
            os.utime(target)  # the LRU clock
            return target
        _download(location, target)
    if max_cache_bytes is not None:
        evict(cache, max_cache_bytes, keep=target)
    return target


def cache_path(cache_dir: str, location: str) -> str:
    """Where :func:`local_copy` keeps a URL's copy: ``<cache>/<scheme>/<host[:port]>/<path>``.

    Credentials never reach the file name; a query string (a signed URL) adds a ``q-<hash>`` folder
    so different queries do not share a copy.
    """
    parts = urlsplit(location)
    segments = [segment for segment in parts.path.split("/") if segment not in ("", ".")]
    if not segments or ".." in segments:
        raise UserError(f"{location}: not a shard URL (it must name a file, without '..')")
    host = parts.hostname or "_"
    if parts.port:
        host = f"{host}_{parts.port}"
    if parts.query:
        segments.insert(-1, "q-" + hashlib.sha256(parts.query.encode()).hexdigest()[:16])
    return os.path.join(cache_dir, parts.scheme, host, *segments)


def evict(cache_dir: str, max_bytes: int, keep: str | None = None) -> list[str]:
    """Delete least recently used shards this cache wrote until they total ``max_bytes``; the deleted paths.

    Only files with a ``.NAME.from`` mark are candidates; ``keep`` (the shard just handed out) and
    shards whose lock another process holds are spared.
    """
    marked = []
    for folder, _, names in os.walk(cache_dir):
        for name in names:
            if name.startswith(".") and name.endswith(_MARK_SUFFIX):
                shard = os.path.join(folder, name[1:-len(_MARK_SUFFIX)])
                with contextlib.suppress(FileNotFoundError):
                    stat = os.stat(shard)
                    marked.append((stat.st_mtime, stat.st_size, shard))
    total = sum(size for _, size, _ in marked)
    deleted = []
    for _, size, shard in sorted(marked):
        if total <= max_bytes:
            break
        if shard == keep:
            continue
        with _locked(shard, wait=False) as held:
            if not held:
                continue
            for path in (shard, _mark_path(shard)):
                with contextlib.suppress(FileNotFoundError):  # another process evicted it meanwhile
                    os.remove(path)
        total -= size
        deleted.append(shard)
    return deleted


def _download(location: str, target: str) -> None:
    """Fetch ``location`` to ``target`` via a hidden part file, retrying failed transfers."""
    fs, path = _filesystem(location)
    part = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{os.getpid()}.part")
    failure = ""
    try:
        for attempt in range(ATTEMPTS):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                with fs.open(path, "rb") as source, open(part, "wb") as sink:
                    shutil.copyfileobj(source, sink, CHUNK)
                    expected = getattr(source, "size", None)
                    written = sink.tell()
                if expected is None or written == expected:
                    break
                failure = f"received {written} of {expected} bytes"
            except FileNotFoundError:
                raise UserError(f"shard {_public(location)}: not found") from None
            except PermissionError as error:
                raise UserError(f"shard {_public(location)}: access denied ({_one_line(error)})") from None
            except _transfer_errors() as error:
                failure = _one_line(error)
        else:
            raise UserError(f"shard {_public(location)}: download failed after {ATTEMPTS} attempts: {failure}")
        with open(_mark_path(target), "w") as mark:
            mark.write(_public(location) + "\n")
        os.replace(part, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(part)  # only ever our own part file (its name holds our pid)


def _filesystem(location: str):
    """The fsspec filesystem and path for a URL; streams (no range requests) and timeouts for http."""
    import fsspec

    options = {}
    scheme = urlsplit(location).scheme.lower()
    if scheme in _UNLISTABLE:
        import aiohttp
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
        options = {"block_size": 0, "client_kwargs": {"timeout": timeout}}
    try:
        return fsspec.core.url_to_fs(location, **options)
    except (ImportError, ValueError) as error:
        raise UserError(f"{_public(location)}: cannot open this kind of URL ({_one_line(error)})") from None


def _call(location: str, action, *args, **kwargs):
    """``action(*args)`` (a listing or existence query) with the download's retry rule."""
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        try:
            return action(*args, **kwargs)
        except (FileNotFoundError, PermissionError):
            raise
        except _transfer_errors() as error:
            failure = _one_line(error)
    raise UserError(f"{_public(location)}: failed after {ATTEMPTS} attempts: {failure}")


def _transfer_errors() -> tuple[type[BaseException], ...]:
    """What a dropped connection, a timeout or a server error raise through fsspec's backends."""
    errors: list[type[BaseException]] = [OSError, TimeoutError, asyncio.TimeoutError]
    with contextlib.suppress(ImportError):
        import aiohttp
        errors.append(aiohttp.ClientError)
    with contextlib.suppress(ImportError):
        import botocore.exceptions
        errors.extend((botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError))
    return tuple(errors)


def _require_listable(fs, location: str) -> None:
    if any(protocol in _UNLISTABLE for protocol in _protocols(fs)):
        raise UserError(f"{location}: an HTTP server cannot be listed; name the shards with a brace range, "
                        "e.g. --train-shards 'https://host/data/train-{000000..000127}.tar'")


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


@contextlib.contextmanager
def _locked(shard: str, wait: bool = True) -> Iterator[bool]:
    """Hold the shard's ``.NAME.lock`` (an flock: released by the kernel if the process dies).

    Yields whether the lock is held (always, when waiting). Lock files are left in place: removing
    one would let two processes lock different files of the same name.
    """
    lock_path = os.path.join(os.path.dirname(shard), f".{os.path.basename(shard)}.lock")
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _mark_path(shard: str) -> str:
    return os.path.join(os.path.dirname(shard), f".{os.path.basename(shard)}{_MARK_SUFFIX}")


def _public(location: str) -> str:
    """The URL without credentials or query, fit to print and to store."""
    parts = urlsplit(location)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _strip_file_scheme(location: str) -> str:
    return location[len("file://"):] if location.startswith("file://") else location
