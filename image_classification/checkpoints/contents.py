"""What a checkpoint file holds: the keys' one owner. :func:`capture` (and :func:`stamped`) write
every key; :class:`SavedRun` reads them back through named accessors, and is the one place where
older files are migrated; :func:`read_weights` picks the weights out of any weights-bearing file
(ours, the NVIDIA reference's, torchvision's reference scripts', a plain state dict). No other
module indexes a checkpoint by its keys.

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
resolved flags), ``eval_preprocessing``, ``modelopt_state`` (a QAT model's quantizers),
``format_version`` and ``epoch_files`` (the per-epoch files this run keeps, see
:class:`~image_classification.checkpoints.writer.Retention`).

Older files, migrated by :class:`SavedRun`: format 1 (no ``has_best``: ``best_prec1`` was always
a score; ``epoch_files`` named relative to the checkpoint's directory), files before
``epoch_progress`` (only ``step_in_epoch`` batches of the saving run's split), before
``eval_preprocessing`` (taken from ``config``), before ``finetune``, ``split`` or ``rng``; the
reference's files (weights named with DDP's ``module.`` prefix).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from image_classification.checkpoints import files
from image_classification.config import MODEL_OPTION_DESTS
from image_classification.errors import UserError
from image_classification.models.weights import StateDict, strip_prefixes
from image_classification.preprocessing import EvalPreprocessing

if TYPE_CHECKING:
    from image_classification.data.contract import EpochProgress
    from image_classification.engine.ema import ModelEma
    from image_classification.engine.loop import RunState
    from image_classification.engine.trainer import TrainComponents

FORMAT_VERSION = 2  # 2: epoch_files are absolute paths

# Where other projects' weights files keep their state dict: the NVIDIA reference's checkpoints,
# torchvision's reference scripts' ({"model": ..., "args": Namespace}).
_WRAPPER_KEYS = ("state_dict", "model")


# ---------------------------------------------------------------- writing

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
        saved["modelopt_state"] = quantization.state(parts.module)
    if parts.ema is not None:
        saved.update(state_dict_ema=parts.ema.state_dict(), ema_updates=parts.ema.updates)
    return saved


def stamped(state: Mapping[str, Any], epoch_files: list[str]) -> dict[str, Any]:
    """The dict a file holds: ``state`` (:func:`capture`) with this code's ``format_version`` and
    the per-epoch files the run keeps."""
    return {"format_version": FORMAT_VERSION, **state, "epoch_files": epoch_files}


# ---------------------------------------------------------------- reading

@dataclass(frozen=True)
class SavedSplit:
    """How the run that wrote a checkpoint split its batches (its ``split`` key)."""
    processes: int
    global_batch: int
    lr: float | None  # the schedule's base LR (after --lr-base-batch scaling)


@dataclass(frozen=True)
class ModelRecord:
    """What a checkpoint says about its model, for loading it outside training (None: not saved)."""
    arch: str | None
    num_classes: int | None
    class_names: list[str] | None
    options: dict[str, Any] = field(default_factory=dict)  # the model flags it was trained with


class SavedRun:
    """A training checkpoint as read back (``path``: where it was read), through named accessors;
    whatever older files lack or say otherwise is migrated here (see the module docstring)."""

    def __init__(self, state: Mapping[str, Any], path: str | Path):
        self._state, self.path = state, str(path)

    @classmethod
    def of(cls, obj: object, path: str | Path) -> "SavedRun | None":
        """``obj`` (a file's content) as a training checkpoint, its format checked; None when it is
        not one (``epoch`` and a ``state_dict``), e.g. a plain weights file."""
        if not (isinstance(obj, Mapping) and "epoch" in obj and isinstance(obj.get("state_dict"), Mapping)):
            return None
        _check_format(obj, path)
        return cls(dict(obj), path)

    # ------------------------------------------------------------ the model

    def weights(self, ema: bool = False) -> StateDict:
        """The model's weights (``ema``: the EMA's), named without the ``module.``/``_orig_mod.``
        prefixes of the reference's (DDP) and compiled models' files."""
        if ema and not self.has_ema:
            raise UserError(f"checkpoint {self.path} has no EMA weights (state_dict_ema): it was trained "
                            "without --use-ema; drop --ema")
        return _state_dict_in(self._state, self.path, "state_dict_ema" if ema else "state_dict")

    @property
    def has_ema(self) -> bool:
        return isinstance(self._state.get("state_dict_ema"), Mapping)

    @property
    def ema_updates(self) -> int:
        return int(self._state.get("ema_updates", 0))

    @property
    def arch(self) -> str | None:
        return self._state.get("arch") or None

    @property
    def model(self) -> ModelRecord:
        """The ``arch``, ``num_classes``, ``class_names`` and model options (from ``config``)."""
        names, config = self._state.get("class_names"), self.config
        num_classes = self._state.get("num_classes")
        return ModelRecord(self.arch, int(num_classes) if num_classes else None,
                           [str(name) for name in names] if isinstance(names, (list, tuple)) else None,
                           {key: config[key] for key in MODEL_OPTION_DESTS if config.get(key) is not None})

    @property
    def quantizers(self) -> Mapping[str, Any] | None:
        """A QAT model's quantizer layout (``quantization.restore`` takes it); None if unquantized."""
        saved = self._state.get("modelopt_state")
        return saved if isinstance(saved, Mapping) else None

    @property
    def preprocessing(self) -> EvalPreprocessing | None:
        """The evaluation preprocessing it was trained with; files before that record give it from
        their config (None when that says nothing either)."""
        record = EvalPreprocessing.from_dict(self._state.get("eval_preprocessing"))
        if record is not None:
            return record
        config = self.config
        image_size = config.get("eval_image_size") or config.get("image_size")
        if not image_size:
            return None
        return EvalPreprocessing(int(image_size), int(config.get("val_resize_size") or image_size + 32),
                                 str(config.get("interpolation") or "bilinear"))

    # ------------------------------------------------------------ the run

    @property
    def config(self) -> Mapping[str, Any]:
        """The saving run's resolved flags (and ``seed``); empty for files without them."""
        config = self._state.get("config")
        return config if isinstance(config, Mapping) else {}

    @property
    def finetune(self) -> dict[str, Any]:
        """The fine-tuning flags it was trained with (empty for files before them)."""
        record = self._state.get("finetune")
        if not isinstance(record, Mapping):
            return {}
        return {key: record[key] for key in ("freeze_backbone_epochs", "backbone_lr_scale")
                if record.get(key) is not None}

    @property
    def split(self) -> SavedSplit | None:
        """How the saving run split its batches; None when it did not say (older files)."""
        split = self._state.get("split")
        if not split:
            return None
        return SavedSplit(int(split["processes"]), int(split["global_batch"]),
                          None if split.get("lr") is None else float(split["lr"]))

    @property
    def rng_states(self) -> list[dict]:
        """One RNG state per process of the saving run (empty: none saved)."""
        return list(self._state.get("rng") or ())

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return int(self._state["epoch"])

    @property
    def step_in_epoch(self) -> int:
        """Batches of epoch :attr:`epoch` trained, in the saving run's split (the raport's ``resume_step``)."""
        return int(self._state.get("step_in_epoch", 0))

    @property
    def progress(self) -> EpochProgress:
        """Where epoch :attr:`epoch` stands. A file written before ``epoch_progress`` existed says
        only ``step_in_epoch`` batches of its split (its ``-b``, and one RNG state per process)."""
        from image_classification.data.contract import EpochProgress
        if "epoch_progress" in self._state:
            return EpochProgress.from_record(self._state["epoch_progress"])
        batches = self.step_in_epoch
        if not batches:
            return EpochProgress()
        return EpochProgress.after_batches(batches, batch_size=int(self.config["batch_size"]),
                                           world_size=max(1, len(self.rng_states)))

    @property
    def best_prec1(self) -> float | None:
        """The reference's ``best_prec1`` as saved (0 before any validation; None: not saved)."""
        return self._state.get("best_prec1")

    @property
    def best_top1(self) -> float | None:
        """The best validation top-1 so far; None before any validation."""
        has_best = self._state.get("has_best", "best_prec1" in self._state)  # format 1: always a score
        return float(self._state["best_prec1"]) if has_best else None

    @property
    def epochs_since_best(self) -> int:
        return int(self._state.get("epochs_since_best", 0))

    @property
    def validation_pending(self) -> bool:
        """Epoch ``epoch - 1`` is trained, not yet validated."""
        return bool(self._state.get("validation_pending", False))

    @property
    def target_epoch(self) -> int | None:
        """The epoch whose validation reached ``--target-top1``, or None."""
        target = self._state.get("target_epoch")
        return None if target is None else int(target)

    @property
    def epoch_files(self) -> list[str]:
        """The per-epoch files the saving run kept, as absolute paths (format 1 named them relative
        to the workspace they were written in: this checkpoint's directory)."""
        origin = Path(self.path).resolve().parent
        return [str(origin / name) for name in self._state.get("epoch_files", [])]

    def restore(self, *, optimizer, scaler, ema: ModelEma | None, rank: int, world_size: int,
                local_rank: int) -> RunState:
        """Load optimizer, scaler, EMA and RNG state (the weights are already in: they are loaded
        before the model moves to its device) and return where the run stands."""
        from image_classification import runtime
        from image_classification.engine.loop import NO_BEST, RunState
        from image_classification.engine.optim import load_optimizer_state
        from image_classification.models import weights
        load_optimizer_state(optimizer, self._state["optimizer"])
        if self._state.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(self._state["scaler"])
        if ema is not None and self.has_ema:
            # Without a saved EMA (reference defect 3) the EMA simply starts from the loaded weights.
            weights.load_state_dict_into(ema.module, self.weights(ema=True), source="state_dict_ema of the checkpoint")
            ema.updates = self.ema_updates
        rng = self.rng_states
        if rng and len(rng) == world_size:
            runtime.set_rng_state(rng[rank], local_rank)
        best = self.best_top1
        return RunState(epoch=self.epoch, progress=self.progress, best_top1=NO_BEST if best is None else best,
                        epochs_since_best=self.epochs_since_best, validation_pending=self.validation_pending,
                        target_epoch=self.target_epoch)


def _check_format(state: Mapping[str, Any], path: str | Path) -> None:
    """A checkpoint from a newer convnets (a format this code does not know) is one clear line."""
    version = state.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format_version {version}, newer than this convnets reads "
                        f"({FORMAT_VERSION}); update convnets to load it")


def load(path: str | Path) -> SavedRun:
    """The training checkpoint at ``path`` (``--resume``), read safely and its format checked."""
    state = files.read_pth(path, "checkpoint", hint="; use an earlier checkpoint_XXXX.pth.tar or model_best.pth.tar")
    run = SavedRun.of(state, path)
    if run is None:
        raise UserError(f"{path} is not a training checkpoint (no 'state_dict'/'epoch'); "
                        "to start from plain weights use --pretrained-from-file")
    return run


# ---------------------------------------------------------------- weights files of any origin

@dataclass
class WeightsFile:
    """A weights file read once: its weights, and the whole checkpoint when it is a training one."""
    state_dict: StateDict
    checkpoint: SavedRun | None = None

    @property
    def quantizers(self) -> Mapping[str, Any] | None:
        return self.checkpoint.quantizers if self.checkpoint is not None else None


def read_weights(path: str | Path, *, ema: bool = False, key: str | None = None) -> WeightsFile:
    """Read ``path`` once (``weights_only``): a training checkpoint or a plain weights file.

    ``ema`` selects a training checkpoint's EMA weights (a clear error when it has none); ``key``
    names the entry holding the weights in a file of another layout (default: the state dict
    itself, or the NVIDIA reference's or torchvision's wrapper entry).
    """
    obj = files.read_pth(path, "weights file")  # one-line UserErrors for missing, unreadable and unsafe files
    run = SavedRun.of(obj, path) if key is None else None
    if run is not None:
        return WeightsFile(run.weights(ema=ema), run)
    if ema:
        raise UserError(f"--ema needs a training checkpoint with state_dict_ema; {path} is a plain "
                        "weights file")
    return WeightsFile(_state_dict_in(obj, path, key))


def _state_dict_in(obj: object, path: str | Path, key: str | None) -> StateDict:
    """The state dict in a file's object: ``key`` if given, else a known wrapper entry, else the
    object itself; checked to be ``name -> tensor`` and named without ``module.``/``_orig_mod.``."""
    if not isinstance(obj, Mapping):
        raise UserError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
    if key is not None:
        if key not in obj:
            raise UserError(f"weights file {path} has no entry {key!r}; "
                            f"it has: {', '.join(map(str, list(obj)[:10]))}")
        obj = obj[key]
    else:
        for wrapper in _WRAPPER_KEYS:
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(f"weights file {path} does not contain a state dict"
                        + (f" under {key!r}" if key else ""))
    bad = next((k for k, v in obj.items() if not isinstance(k, str)
                or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UserError(f"weights file {path} is not a state dict: entry {bad!r} is not a tensor "
                        f"(entries: {', '.join(map(str, list(obj)[:10]))})")
    return strip_prefixes(obj, str(path))
