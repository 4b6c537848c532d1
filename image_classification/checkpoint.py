"""Training checkpoints: atomic writes, safe loading, retention.

File layout in ``--workspace`` (reference names): ``checkpoint_XXXX.pth.tar`` after epoch XXXX
(0-based), a copy named ``--checkpoint-filename`` (``checkpoint.pth.tar``) holding the latest
state, and ``model_best.pth.tar`` when val top-1 improves.

Keys: the reference's ``epoch`` (epochs completed), ``best_prec1``, ``state_dict`` (no ``module.``
prefix), ``optimizer`` and ``state_dict_ema``, plus what an exact resume needs: ``step_in_epoch``
(batches already done in epoch ``epoch``, non-zero only after an interruption), ``scaler``,
``scheduler``, ``ema_updates``, ``rng`` (one state per rank), ``arch``, ``num_classes``,
``class_names``, ``epochs_since_best`` and ``config`` (the resolved flags).
"""
from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from image_classification.errors import UserError

FORMAT_VERSION = 1
EPOCH_FILE = re.compile(r"checkpoint_(\d{4,})\.pth\.tar$")


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


def serialize(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save(state: dict[str, Any], workspace: str | Path, *, epoch_index: int | None, is_best: bool,
         filename: str = "checkpoint.pth.tar", keep: int = 0) -> list[Path]:
    """Write the checkpoint files for one save point and apply the retention policy.

    ``epoch_index`` names the per-epoch file (None for a mid-epoch save, which only updates the
    latest copy). ``keep``: per-epoch files to keep (0 none, -1 all, N the last N).
    Returns the paths written.
    """
    workspace = Path(workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    data = serialize({"format_version": FORMAT_VERSION, **state})
    targets = [workspace / filename]
    if epoch_index is not None and keep != 0:
        targets.insert(0, workspace / f"checkpoint_{epoch_index:04d}.pth.tar")
    if is_best:
        targets.append(workspace / "model_best.pth.tar")
    for target in targets:
        write_atomic(data, target)
    prune_epoch_files(workspace, keep)
    return targets


def prune_epoch_files(workspace: Path, keep: int) -> None:
    if keep < 0:
        return
    epoch_files = sorted((int(m.group(1)), p) for p in workspace.iterdir() if (m := EPOCH_FILE.match(p.name)))
    for _, path in epoch_files[: max(0, len(epoch_files) - keep)]:
        path.unlink(missing_ok=True)


def load(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True``; any problem is one UserError line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"checkpoint {path} cannot be loaded safely (weights_only): {first_line}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise UserError(f"checkpoint {path} is truncated or corrupt ({type(error).__name__}); "
                        "use an earlier checkpoint_XXXX.pth.tar or model_best.pth.tar") from None
    if not isinstance(state, dict) or "state_dict" not in state or "epoch" not in state:
        raise UserError(f"{path} is not a training checkpoint (no 'state_dict'/'epoch'); "
                        "to start from plain weights use --pretrained-from-file")
    return state
