"""Training checkpoints: atomic writes, safe loading, retention.

File layout in ``--workspace`` (reference names): ``--checkpoint-filename`` (``checkpoint.pth.tar``)
holding the latest state, ``checkpoint_XXXX.pth.tar`` after epoch XXXX (0-based; named after
``--checkpoint-filename``, kept per ``--gather-checkpoints``) and ``model_best.pth.tar`` when val
top-1 improves.

Keys: the reference's ``epoch`` (epochs completed), ``best_prec1``, ``state_dict`` (no ``module.``
prefix), ``optimizer`` and ``state_dict_ema``, plus what an exact resume needs: ``step_in_epoch``
(batches already done in epoch ``epoch``, non-zero only after an interruption), ``scaler``,
``ema_updates``, ``rng`` (one state per rank), ``arch``, ``num_classes``, ``class_names``,
``epochs_since_best``, ``has_best`` (``best_prec1`` is a score, not the 0 before any validation),
``validation_pending`` (epoch ``epoch - 1`` is trained, not yet validated), ``config`` (the
resolved flags) and ``epoch_files`` (the per-epoch files this run keeps, see :class:`Retention`).
"""
from __future__ import annotations

import io
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from image_classification.errors import UserError

FORMAT_VERSION = 2  # 2: epoch_files are absolute paths


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


@dataclass
class Retention:
    """``--gather-checkpoints``: per-epoch files to keep (0 none written, -1 all, N the last N),
    and the per-epoch files this run wrote and still keeps, as absolute paths (saved in the
    checkpoint as ``epoch_files``, so a resumed run knows them). Only those are ever deleted, and
    only inside the workspace being written: files of another run, even with the same names in
    another workspace this run was resumed into, are not this run's to remove."""
    keep: int = 0
    written: list[str] = field(default_factory=list)

    @classmethod
    def resumed(cls, keep: int, saved: dict[str, Any] | None, saved_at: str | Path | None) -> "Retention":
        """The retention of a run resumed from checkpoint ``saved`` read at ``saved_at``. Checkpoints
        before format 2 list bare names, relative to the workspace they were written in (that
        checkpoint's directory)."""
        origin = Path(saved_at).resolve().parent if saved_at else Path.cwd()
        return cls(keep, [str(origin / name) for name in (saved or {}).get("epoch_files", [])])


def epoch_filename(filename: str, epoch_index: int) -> str:
    """The per-epoch name for ``--checkpoint-filename``: checkpoint.pth.tar -> checkpoint_0003.pth.tar."""
    suffix = ".pth.tar" if filename.endswith(".pth.tar") else Path(filename).suffix
    return f"{filename[: len(filename) - len(suffix)]}_{epoch_index:04d}{suffix}"


def save(state: dict[str, Any], workspace: str | Path, *, epoch_index: int | None, is_best: bool,
         filename: str = "checkpoint.pth.tar", retention: Retention | None = None) -> list[Path]:
    """Write the checkpoint files for one save point and apply the retention policy.

    ``epoch_index`` names the per-epoch file (None for a mid-epoch save, which only updates the
    latest copy). Returns the paths written. A failed write (disk full, quota) is one UserError
    line naming the file; files written before, and the previous copy of that one, are intact.
    """
    workspace = Path(workspace)
    retention = retention if retention is not None else Retention()
    targets, kept, obsolete = [workspace / filename], list(retention.written), []
    if epoch_index is not None and retention.keep != 0:
        targets.insert(0, workspace / epoch_filename(filename, epoch_index))
        name = str(targets[0].resolve())
        kept = [n for n in kept if n != name] + [name]
        if retention.keep > 0:
            obsolete, kept = kept[: -retention.keep], kept[-retention.keep:]
    if is_best:
        targets.append(workspace / "model_best.pth.tar")
    data = serialize({"format_version": FORMAT_VERSION, **state, "epoch_files": kept})
    for target in targets:
        try:
            write_atomic(data, target)
        except OSError as error:
            raise UserError(f"could not write checkpoint {target}: {error.strerror or error}; the previous "
                            "checkpoint files are intact") from None
    retention.written = kept
    own = workspace.resolve()
    for name in obsolete:
        if Path(name).parent == own:  # never outside the workspace this run writes
            Path(name).unlink(missing_ok=True)
    return targets


def check_workspace(workspace: str | Path) -> None:
    """Fail before training, in one line, when ``--workspace`` cannot be created or written."""
    workspace = Path(workspace)
    try:
        workspace.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=workspace):
            pass
    except OSError as error:
        raise UserError(f"--workspace {workspace} cannot be written: {error.strerror or error}") from None


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
