"""``.pth`` files on disk: the one safe reader and the atomic writer (a leaf: it imports nothing of
the project but its errors, so every module that reads or writes a file can use it).

A file is untrusted input: :func:`read_pth` never runs code from it, and says what is wrong in one
line. :func:`write_atomic` leaves either the old file or the complete new one, whatever the moment
of a crash; :func:`copy_atomic` makes another name for bytes already written.
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from image_classification.errors import UserError


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` so that a crash at any moment leaves either the old file or the
    complete new one: write a temporary file beside it, fsync, rename over, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def copy_atomic(source: Path, target: Path) -> None:
    """``target`` becomes a hard link to ``source`` (the same bytes, written once), or an atomic
    copy where the file system has no hard links. Either way it is replaced in one rename, and a
    later replacement of ``source`` (a new inode) leaves it unchanged."""
    tmp = target.with_name(f".{target.name}.tmp.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)


def serialize(state: Any) -> bytes:
    """``torch.save``'s bytes, to be written with :func:`write_atomic`."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


# torch's words for a class or function weights_only refuses ("Unsupported global: GLOBAL x.y",
# "Trying to load unsupported GLOBAL posix.system whose module posix is blocked").
_UNSAFE_GLOBAL = re.compile(r"(?:Unsupported (?:global|class): (?:GLOBAL )?|unsupported GLOBAL )([\w.]+)")


def read_pth(path: str | Path, kind: str = "weights file", hint: str = "") -> object:
    """The one reader of ``.pth`` files (checkpoints, weights): ``torch.load(weights_only=True)``,
    since a file is untrusted input and must not run code. torchvision's reference checkpoints
    store their args as an ``argparse.Namespace``, a plain attribute bag safe to rebuild: the one
    class allowed beyond torch's defaults. Any problem is one UserError line naming ``kind`` and
    the path (``hint`` is added where a file is corrupt)."""
    if not os.path.exists(path):
        raise UserError(f"{kind} {path} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{kind} {path} is a directory, not a file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = _UNSAFE_GLOBAL.search(str(error))
        if unsafe is None:
            raise UserError(f"{kind} {path} is not a readable PyTorch file (corrupt, or not saved by torch.save)"
                            f"{hint}") from None
        raise UserError(f"{kind} {path} holds a {unsafe.group(1)} object, which cannot be loaded safely "
                        "(it would need unsafe unpickling); re-save it as a plain state_dict of tensors") from None
    except PermissionError:
        raise UserError(f"{kind} {path} cannot be read: permission denied") from None
    except (RuntimeError, EOFError, ValueError, OSError, TypeError, KeyError, AttributeError, IndexError,
            zipfile.BadZipFile) as error:
        detail = str(error).strip().split(". ")[0].splitlines() if isinstance(error, RuntimeError) else []
        raise UserError(f"{kind} {path} is not a readable PyTorch file (truncated or corrupt?)"
                        f"{': ' + detail[0] if detail else ''}{hint}") from None
