"""Where shard files live: local paths today; ``http(s)://`` and fsspec URLs (``s3://``) next.

The shard layer (``image_classification.data.sources``) reaches files only through these four
functions, so a remote location is one module's business:

* :func:`is_remote` -- whether a location is a URL rather than a local path;
* :func:`expand` -- a pattern (brace ranges ``train-{000000..000127}.tar``, shell globs) to the
  sorted list of shard locations it names;
* :func:`exists` -- whether one location exists (an index file beside a shard, say);
* :func:`local_copy` -- a local path holding the location's bytes: the path itself for a local
  file; for a URL a copy in the shard cache, fetched sequentially once (with retries) and renamed
  into place atomically, so concurrent ranks and workers on one machine share it.

This stub handles local paths only; URLs are a one-line error until the remote part lands.
"""
from __future__ import annotations

import glob
import os
import re

from image_classification.errors import UserError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(location: str) -> bool:
    return bool(_URL.match(location)) and not location.startswith("file://")


def expand(pattern: str) -> list[str]:
    """The sorted shard locations a (local) glob pattern names."""
    _local_only(pattern)
    return sorted(glob.glob(_strip_file_scheme(pattern)))


def exists(location: str) -> bool:
    _local_only(location)
    return os.path.exists(_strip_file_scheme(location))


def local_copy(location: str, cache_dir: str | None = None) -> str:
    _local_only(location)
    return _strip_file_scheme(location)


def _strip_file_scheme(location: str) -> str:
    return location[len("file://"):] if location.startswith("file://") else location


def _local_only(location: str) -> None:
    if is_remote(location):
        raise UserError(f"{location}: remote shards are not supported yet")
