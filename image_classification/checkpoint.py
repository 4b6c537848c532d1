"""Training checkpoints: the schema's one owner (:func:`capture` writes every key, :func:`restore`
reads them back, :func:`check_format` refuses a newer ``format_version``), atomic writes written
once and hard-linked, the one safe ``.pth`` reader (:func:`read_pth`, weights files too), retention.

File layout in ``--workspace`` (reference names): ``--checkpoint-filename`` (``checkpoint.pth.tar``)
holding the latest state, ``checkpoint_XXXX.pth.tar`` after epoch XXXX (0-based; named after
``--checkpoint-filename``, kept per ``--gather-checkpoints``) and ``model_best.pth.tar`` when val
top-1 improves.

Keys: the reference's ``epoch`` (epochs completed), ``best_prec1``, ``state_dict`` (no ``module.``
prefix), ``optimizer`` and ``state_dict_ema``, plus what an exact resume needs: ``epoch_progress``
(the ranges of epoch ``epoch``'s permutation already trained, non-empty only after an
interruption; it does not depend on the split, so a resume may change the number of processes,
``-b`` or the workers), ``step_in_epoch`` (the same in batches of the saving run's split, for
older readers), ``split`` (the saving run's processes, ``-b`` and global batch), ``scaler``,
``ema_updates``, ``rng`` (one state per rank), ``arch``, ``num_classes``, ``class_names``,
``epochs_since_best``, ``has_best`` (``best_prec1`` is a score, not the 0 before any validation),
``validation_pending`` (epoch ``epoch - 1`` is trained, not yet validated), ``target_epoch`` (the
epoch whose validation reached ``--target-top1``, or None), ``finetune`` (``freeze_backbone_epochs``,
``backbone_lr_scale`` and the ``classifier`` they apply to: a resumed run keeps them), ``config`` (the
resolved flags) and ``epoch_files`` (the per-epoch files this run keeps, see :class:`Retention`).
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from image_classification.errors import UserError

if TYPE_CHECKING:
    from image_classification.data.contract import EpochProgress
    from image_classification.engine.ema import ModelEma
    from image_classification.engine.loop import RunState
    from image_classification.engine.trainer import TrainComponents
    from image_classification.preprocessing import EvalPreprocessing

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


def _copy_atomic(source: Path, target: Path) -> None:
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


def save(state: dict[str, Any], workspace: str | Path, *, epoch_index: int | None, is_best: bool,
         filename: str = "checkpoint.pth.tar", retention: Retention | None = None) -> list[Path]:
    """Write the checkpoint files for one save point and apply the retention policy.

    ``epoch_index`` names the per-epoch file (None for a mid-epoch save, which only updates the
    latest copy). The bytes are written once; the other files are hard links to the first (or
    atomic copies). Returns the paths written. A failed write (disk full, quota) is one UserError
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
            if target is targets[0]:
                write_atomic(data, target)
            else:
                _copy_atomic(targets[0], target)
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


def check_format(state: dict[str, Any], path: str | Path) -> None:
    """A checkpoint from a newer convnets (a format this code does not know) is one clear line."""
    version = state.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format_version {version}, newer than this convnets reads "
                        f"({FORMAT_VERSION}); update convnets to load it")


def load(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint safely (:func:`read_pth`) and check its format."""
    state = read_pth(path, "checkpoint", hint="; use an earlier checkpoint_XXXX.pth.tar or model_best.pth.tar")
    if not isinstance(state, dict) or "state_dict" not in state or "epoch" not in state:
        raise UserError(f"{path} is not a training checkpoint (no 'state_dict'/'epoch'); "
                        "to start from plain weights use --pretrained-from-file")
    check_format(state, path)
    return state



def is_training_checkpoint(obj: object) -> bool:
    """A training checkpoint (``epoch`` and a ``state_dict``), as opposed to a plain weights file."""
    return isinstance(obj, Mapping) and "epoch" in obj and isinstance(obj.get("state_dict"), Mapping)


@dataclass(frozen=True)
class ModelRecord:
    """What a checkpoint says about its model, for loading it outside training (None: not saved)."""
    arch: str | None
    num_classes: int | None
    class_names: list[str] | None
    options: dict[str, Any] = field(default_factory=dict)  # the model flags it was trained with


def model_record(saved: Mapping[str, Any]) -> ModelRecord:
    """The ``arch``, ``num_classes``, ``class_names`` and model options (from ``config``) that
    :func:`capture` wrote."""
    from image_classification.config import MODEL_OPTION_DESTS
    names = saved.get("class_names")
    config = saved.get("config") if isinstance(saved.get("config"), Mapping) else {}
    return ModelRecord(saved.get("arch") or None, int(saved["num_classes"]) if saved.get("num_classes") else None,
                       [str(name) for name in names] if isinstance(names, (list, tuple)) else None,
                       {key: config[key] for key in MODEL_OPTION_DESTS if config.get(key) is not None})


# ---------------------------------------------------------------- the keys: written and read here only

def capture(parts: TrainComponents, state: RunState, *, args, class_names: list[str], rng: list[dict], seed: int,
            evaluation: EvalPreprocessing) -> dict[str, Any]:
    """Everything a checkpoint holds (see the module docstring), from the run's parts and state."""
    from image_classification import quantization
    from image_classification.engine.loop import NO_BEST
    # best_prec1 keeps the reference's meaning and range (0 before any validation, e.g. --training-only);
    # has_best says whether it is a score, so a resumed run's first validation is a new best.
    saved = {
        "epoch": state.epoch, "epoch_progress": state.progress.record(),
        "step_in_epoch": state.progress.samples // (args.batch_size * parts.world_size),
        "split": {"processes": parts.world_size, "batch_size": args.batch_size,
                  "global_batch": args.batch_size * parts.world_size * parts.accumulation_steps,
                  "lr": parts.optimizer.param_groups[0].get("initial_lr")},  # the schedule's base LR
        "best_prec1": max(state.best_top1, 0.0),
        "has_best": state.best_top1 != NO_BEST, "validation_pending": state.validation_pending,
        "epochs_since_best": state.epochs_since_best, "target_epoch": state.target_epoch, "arch": args.arch,
        "num_classes": len(class_names), "class_names": class_names, "state_dict": parts.module.state_dict(),
        "optimizer": parts.optimizer.state_dict(), "scaler": parts.scaler.state_dict(), "rng": rng,
        "config": {**vars(args), "seed": seed}, "eval_preprocessing": evaluation.as_dict(),
        "finetune": {"freeze_backbone_epochs": args.freeze_backbone_epochs, "backbone_lr_scale": args.backbone_lr_scale,
                     "classifier": parts.finetune.head if parts.finetune is not None else None},
    }
    if quantization.is_quantized(parts.module):
        saved[quantization.CHECKPOINT_KEY] = quantization.state(parts.module)
    if parts.ema is not None:
        saved.update(state_dict_ema=parts.ema.state_dict(), ema_updates=parts.ema.updates)
    return saved


@dataclass(frozen=True)
class SavedSplit:
    """How the run that wrote a checkpoint split its batches (its ``split`` key)."""
    processes: int
    global_batch: int
    lr: float | None  # the schedule's base LR (after --lr-base-batch scaling)


def saved_split(saved: Mapping[str, Any]) -> SavedSplit | None:
    """The split of the run that wrote ``saved``; None when it did not say (older files)."""
    split = saved.get("split")
    if not split:
        return None
    return SavedSplit(int(split["processes"]), int(split["global_batch"]),
                      None if split.get("lr") is None else float(split["lr"]))


def saved_rng_processes(saved: Mapping[str, Any]) -> int:
    """How many processes' RNG states ``saved`` holds (0: none)."""
    return len(saved.get("rng") or ())


def saved_progress(saved: Mapping[str, Any]) -> "EpochProgress":
    """Where epoch ``saved['epoch']`` stands. A file written before ``epoch_progress`` existed says
    only ``step_in_epoch`` batches of its split (its ``-b``, and one RNG state per process)."""
    from image_classification.data.contract import EpochProgress
    if "epoch_progress" in saved:
        return EpochProgress.from_record(saved["epoch_progress"])
    batches = int(saved.get("step_in_epoch", 0))
    if not batches:
        return EpochProgress()
    return EpochProgress.after_batches(batches, batch_size=int((saved.get("config") or {})["batch_size"]),
                                       world_size=max(1, saved_rng_processes(saved)))


def finetune_record(saved: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fine-tuning settings :func:`capture` wrote (empty for checkpoints before them)."""
    record = (saved or {}).get("finetune")
    if not isinstance(record, Mapping):
        return {}
    return {key: record[key] for key in ("freeze_backbone_epochs", "backbone_lr_scale") if record.get(key) is not None}


def restore(saved: dict[str, Any], *, optimizer, scaler, ema: ModelEma | None, rank: int, world_size: int,
            local_rank: int) -> RunState:
    """Load optimizer, scaler, EMA and RNG state from ``saved`` (the weights are already in: they
    are loaded before the model moves to its device) and return where the run stands."""
    from image_classification import runtime
    from image_classification.engine.loop import NO_BEST, RunState
    from image_classification.engine.optim import load_optimizer_state
    from image_classification.models import weights
    load_optimizer_state(optimizer, saved["optimizer"])
    if saved.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(saved["scaler"])
    if ema is not None and saved.get("state_dict_ema") is not None:
        # Without a saved EMA (reference defect 3) the EMA simply starts from the loaded weights.
        weights.load_state_dict_into(ema.module, saved["state_dict_ema"], source="state_dict_ema of the checkpoint")
        ema.updates = int(saved.get("ema_updates", 0))
    rng = saved.get("rng")
    if rng and len(rng) == world_size:
        runtime.set_rng_state(rng[rank], local_rank)
    has_best = saved.get("has_best", "best_prec1" in saved)  # format 1: best_prec1 was always a score
    return RunState(epoch=int(saved["epoch"]), progress=saved_progress(saved),
                    best_top1=float(saved["best_prec1"]) if has_best else NO_BEST,
                    epochs_since_best=int(saved.get("epochs_since_best", 0)),
                    validation_pending=bool(saved.get("validation_pending", False)),
                    target_epoch=None if saved.get("target_epoch") is None else int(saved["target_epoch"]))
