"""Saving during training: :class:`CheckpointWriter` (``loop.fit``'s ``save``), the files of one
save point (:func:`save`, the bytes written once and hard-linked) and their retention.

File layout in ``--workspace`` (reference names): ``--checkpoint-filename`` (``checkpoint.pth.tar``)
holding the latest state, ``checkpoint_XXXX.pth.tar`` after epoch XXXX (0-based; named after
``--checkpoint-filename``, kept per ``--gather-checkpoints``) and ``model_best.pth.tar`` when val
top-1 improves. What each file holds is :mod:`image_classification.checkpoints.contents`' business.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from image_classification import runtime
from image_classification.checkpoints import contents, files
from image_classification.checkpoints.contents import SavedRun
from image_classification.errors import UserError

if TYPE_CHECKING:
    from image_classification.engine.loop import RunState
    from image_classification.engine.trainer import TrainComponents
    from image_classification.preprocessing import EvalPreprocessing


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
    def resumed(cls, keep: int, saved: SavedRun | None) -> "Retention":
        """The retention of a run resumed from ``saved``: the per-epoch files it kept are this run's."""
        return cls(keep, saved.epoch_files if saved is not None else [])


def epoch_filename(filename: str, epoch_index: int) -> str:
    """The per-epoch name for ``--checkpoint-filename``: checkpoint.pth.tar -> checkpoint_0003.pth.tar."""
    suffix = ".pth.tar" if filename.endswith(".pth.tar") else Path(filename).suffix
    return f"{filename[: len(filename) - len(suffix)]}_{epoch_index:04d}{suffix}"


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
    data = files.serialize(contents.stamped(state, kept))
    for target in targets:
        try:
            if target is targets[0]:
                files.write_atomic(data, target)
            else:
                files.copy_atomic(targets[0], target)
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


class CheckpointWriter:
    """``loop.fit``'s ``save``: every rank gathers its RNG state (a collective, so every rank calls
    it at every save point), rank 0 writes (with the run's retention). :attr:`last` is the last
    checkpoint of this run (or the one it resumed), for the line a surviving rank prints when
    another rank's process is gone."""

    def __init__(self, flags, parts: TrainComponents, context, resume: SavedRun | None, state: RunState, *,
                 class_names: list[str], seed: int, evaluation: EvalPreprocessing):
        self.flags, self.parts, self.context = flags, parts, context
        self.class_names, self.seed, self.evaluation = class_names, seed, evaluation
        self.retention = Retention.resumed(flags.gather_checkpoints, resume)
        self.last = [(flags.resume, state.epoch, state.progress.samples)] if resume is not None else []

    def __call__(self, run_state: RunState, epoch_index: int | None, is_best: bool) -> None:
        flags = self.flags
        if not flags.save_checkpoints:  # every rank sees the same flag: no rank gathers
            return
        self.last = [(str(Path(flags.workspace) / flags.checkpoint_filename), run_state.epoch,
                      run_state.progress.samples)]
        rng = _gather_rng_states()
        if self.context.is_main:
            save(contents.capture(self.parts, run_state, args=flags, class_names=self.class_names, rng=rng,
                                  seed=self.seed, evaluation=self.evaluation),
                 flags.workspace, epoch_index=epoch_index, is_best=is_best,
                 filename=flags.checkpoint_filename, retention=self.retention)


def _gather_rng_states() -> list[dict]:
    state = runtime.rng_state()
    if not torch.distributed.is_initialized():
        return [state]
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states
