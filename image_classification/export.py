"""Using a trained model outside the training loop: load it, export it, check the export.

Shared by ``classify.py``, ``model2onnx.py`` and ``hubconf.py``:

* :func:`load_model` builds ``--arch`` and fills it from a plain weights file (ours, NGC,
  torchvision) or from a training checkpoint (optionally its EMA weights), reading the file once
  with ``weights_only=True``. A training checkpoint also supplies the class names, the number of
  classes and the evaluation preprocessing it was trained with.
* :func:`export_onnx` / :func:`export_torchscript` write a file whose batch axis is dynamic.
* :func:`check_parity` runs the exported file and the eager model on the same random inputs
  (batch 1 and 4 by default) and reports the largest difference of the logits.
"""
from __future__ import annotations

import sys

import argparse
import contextlib
import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from image_classification import config, models, preprocessing, quantization
from image_classification.errors import UserError
from image_classification.models import weights
from image_classification.models.registry import ModelSpec
from image_classification.preprocessing import EvalPreprocessing

IMAGENET_CLASSES_FILE = Path(__file__).resolve().parent / "data" / "imagenet_classes.txt"
FORMATS = ("onnx", "torchscript")
EXPORTERS = ("auto", "dynamo", "legacy")
MIN_ONNX_OPSET = 13
DEFAULT_ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"


# ---------------------------------------------------------------- class names

def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order (shipped with the package)."""
    names = IMAGENET_CLASSES_FILE.read_text(encoding="utf-8").splitlines()
    if len(names) != 1000:
        raise RuntimeError(f"{IMAGENET_CLASSES_FILE} has {len(names)} lines, expected 1000")
    return names


def read_labels(path: str) -> list[str]:
    """A class-names file: one name per line, in class-index order."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"labels file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"labels file {path} cannot be read: {error}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise UserError(f"labels file {path} is empty; it needs one class name per line")
    return [line.strip() for line in lines]


def default_class_names(loaded: "LoadedModel") -> list[str]:
    """The checkpoint's class names, else ImageNet's for 1000 classes, else the indices."""
    if loaded.class_names is not None:
        return loaded.class_names
    if loaded.num_classes == 1000:
        return imagenet_classes()
    return [str(i) for i in range(loaded.num_classes)]


# ---------------------------------------------------------------- loading a model

def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """main.py's model flags (both spellings), plus ``--weights`` and ``--ema``, worded for tools
    that load a trained model."""
    parser.add_argument("--weights", dest="pretrained_from_file", default=None, metavar="PATH",
                        help="same as --pretrained-from-file")
    parser.add_argument("--ema", action="store_true",
                        help="use the EMA weights (state_dict_ema) of a training checkpoint")
    config.add_model_flags(parser)
    helps = {
        "num_classes": "output classes (default: the checkpoint's, else the classifier size in the "
                       "weights file, else 1000)",
        "pretrained_from_file": "weights file (ours, NGC or torchvision) or training checkpoint",
    }
    for action in parser._actions:
        if action.dest in helps and action.option_strings[0] != "--weights":
            action.help = helps[action.dest]


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode, on the CPU) and what is known about it."""

    model: nn.Module
    spec: ModelSpec
    num_classes: int
    # From a training checkpoint (None for plain weights or random init).
    class_names: list[str] | None = None
    checkpoint: dict[str, Any] | None = None
    # The evaluation preprocessing saved with the model (checkpoint or ONNX metadata), if any.
    preprocessing: EvalPreprocessing | None = None

    @property
    def arch(self) -> str:
        return self.spec.name


@dataclass
class WeightsFile:
    state_dict: Mapping[str, torch.Tensor]
    checkpoint: dict[str, Any] | None = field(default=None)  # the whole training checkpoint


def is_training_checkpoint(obj: object) -> bool:
    return isinstance(obj, Mapping) and "epoch" in obj and isinstance(obj.get("state_dict"), Mapping)


def read_weights(path: str, ema: bool = False) -> WeightsFile:
    """Read ``path`` once (``weights_only``): a training checkpoint or a plain weights file.

    ``ema`` selects a training checkpoint's ``state_dict_ema``; a clear error when it has none.
    """
    obj = weights.read_file(path)  # one-line UserErrors for missing, unreadable and unsafe files
    if is_training_checkpoint(obj):
        checkpoint = dict(obj)
        key = "state_dict"
        if ema:
            if not isinstance(checkpoint.get("state_dict_ema"), Mapping):
                raise UserError(f"checkpoint {path} has no EMA weights (state_dict_ema): it was trained "
                                "without --use-ema; drop --ema")
            key = "state_dict_ema"
        state_dict = weights.strip_prefixes(weights.unwrap(checkpoint, path, key), path)
        return WeightsFile(state_dict, checkpoint)
    if ema:
        raise UserError(f"--ema needs a training checkpoint with state_dict_ema; {path} is a plain "
                        "weights file")
    return WeightsFile(weights.strip_prefixes(weights.unwrap(obj, path, None), path))


def infer_num_classes(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The classifier's output size, when the file has exactly one ``...fc.weight`` matrix."""
    found = [t.shape[0] for k, t in state_dict.items() if k.endswith("fc.weight") and t.dim() == 2]
    return found[0] if len(found) == 1 else None


def load_model(arch: str | None, weights_path: str | None = None, *, ema: bool = False,
               num_classes: int | None = None, options: Mapping[str, Any] | None = None,
               state_dict: Mapping[str, torch.Tensor] | None = None, source: str | None = None) -> LoadedModel:
    """Build ``arch`` (or the checkpoint's arch when ``arch`` is None) and load its weights strictly.

    The number of classes is, in order: ``num_classes``, the checkpoint's, the classifier shape
    in the file, 1000. ``state_dict`` (with ``source`` naming it) replaces ``weights_path`` for
    weights already in memory (torch.hub downloads).
    """
    file = None
    if weights_path is not None:
        file = read_weights(weights_path, ema=ema)
        state_dict, source = file.state_dict, weights_path
    elif ema:
        raise UserError("--ema needs a training checkpoint (--pretrained-from-file CKPT)")
    checkpoint = file.checkpoint if file else None
    saved_arch = checkpoint.get("arch") if checkpoint else None
    if arch is None:
        arch = saved_arch or "resnet50"
    elif saved_arch and saved_arch != arch:
        raise UserError(f"{weights_path} was trained with --arch {saved_arch}, not --arch {arch}")
    spec = models.get(arch)
    if num_classes is None and checkpoint is not None and checkpoint.get("num_classes"):
        num_classes = int(checkpoint["num_classes"])
    if num_classes is None and state_dict is not None:
        num_classes = infer_num_classes(state_dict)
    num_classes = num_classes or 1000
    model = quantization.restore(spec.build(num_classes=num_classes, **dict(options or {})), checkpoint)
    if state_dict is not None:
        weights.load_state_dict_into(model, state_dict, source=source or "state dict",
                                     family=spec.family, arch=arch)
    model.eval()
    loaded = LoadedModel(model=model, spec=spec, num_classes=num_classes, checkpoint=checkpoint)
    if checkpoint is not None:
        names = checkpoint.get("class_names")
        if isinstance(names, (list, tuple)) and len(names) == num_classes:
            loaded.class_names = [str(n) for n in names]
        loaded.preprocessing = preprocessing.from_checkpoint(checkpoint)
    return loaded


def weights_path(args, without_weights: str) -> str | None:
    """The weights file the model flags ask for: ``--pretrained-from-file``/``--weights``, or the
    published download for ``--pretrained``; None (with ``without_weights`` as a warning) for none."""
    if args.pretrained and args.pretrained_from_file:
        raise UserError("--pretrained and --pretrained-from-file/--weights exclude each other")
    if args.pretrained:
        from image_classification.models.published import download_weights
        return download_weights(args.arch or "resnet50")
    if args.pretrained_from_file is None:
        print(f"warning: no --weights/--pretrained-from-file/--pretrained given: {without_weights}", file=sys.stderr)
    return args.pretrained_from_file


# ---------------------------------------------------------------- export

def default_output(weights_path: str | None, arch: str, fmt: str) -> str:
    """The weights name with ``.pt``/``.pth``/``.pth.tar``/``.tar`` replaced (the reference's rule),
    else the arch name, in the current directory."""
    suffix = ".onnx" if fmt == "onnx" else ".torchscript.pt"
    if weights_path is None:
        return arch + suffix
    base = weights_path
    for ending in (".tar", ".pth", ".pt"):
        if base.endswith(ending):
            base = base[: -len(ending)]
    return base + suffix


def resolve_exporter(name: str) -> str:
    """``auto``: torch's dynamo exporter when onnxscript is installed, else the legacy one."""
    if name not in EXPORTERS:
        raise UserError(f"unknown --exporter {name!r}; choose one of: {', '.join(EXPORTERS)}")
    has_onnxscript = importlib.util.find_spec("onnxscript") is not None
    if name == "auto":
        return "dynamo" if has_onnxscript else "legacy"
    if name == "dynamo" and not has_onnxscript:
        raise UserError("--exporter dynamo needs the onnxscript package (pip install onnxscript); "
                        "or use --exporter legacy")
    return name


@contextlib.contextmanager
def _quiet_deprecations():
    # The legacy ONNX exporter and torch.jit are deprecated upstream; we choose them knowingly
    # (no onnxscript / TorchScript requested), so their warnings are noise here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # Model Optimizer's quantizers
        warnings.filterwarnings("ignore", message=r".*(legacy TorchScript-based ONNX|will be removed"
                                                  r"|torch\.jit\.\w+` is deprecated).*")
        yield


def export_onnx(model: nn.Module, example: torch.Tensor, path: str, *, opset: int = DEFAULT_ONNX_OPSET,
                exporter: str = "auto") -> str:
    """Write ``model`` as ONNX with a dynamic batch axis; returns the exporter used."""
    if opset < MIN_ONNX_OPSET:
        raise UserError(f"--opset must be at least {MIN_ONNX_OPSET}, got {opset}")
    exporter = resolve_exporter(exporter)
    _prepare_output(path)
    common = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset)
    with torch.no_grad(), _quiet_deprecations():
        if exporter == "dynamo":
            # A batch of 1 would be specialised to a constant by torch.export.
            if example.shape[0] < 2:
                example = example.expand(2, *example.shape[1:]).contiguous()
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(model, (example,), path, dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes=({0: batch},), **common)
        else:
            torch.onnx.export(model, (example,), path, dynamo=False, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              **common)
    return exporter


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str) -> str:
    """Write ``torch.jit.script(model)`` (shape-agnostic); fall back to tracing if scripting fails.
    Returns the method used."""
    _prepare_output(path)
    with _quiet_deprecations():
        try:
            module = torch.jit.script(model)
            method = "script"
        except Exception:  # noqa: BLE001 - any scripting failure: tracing is the documented fallback
            with torch.no_grad():
                module = torch.jit.trace(model, example, check_trace=False)
            method = "trace"
        torch.jit.save(module, path)
    return method


def _prepare_output(path: str) -> None:
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise UserError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output directory {parent} is not writable")


# ---------------------------------------------------------------- parity

Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Parity:
    batch: int
    max_abs_diff: float
    max_abs_output: float
    top1_agreement: float = 1.0  # fraction of images whose top-1 class is the same

    def scaled(self) -> float:
        """Difference relative to the output magnitude (absolute when outputs are within +-1)."""
        return self.max_abs_diff / max(1.0, self.max_abs_output)


def onnx_session(path: str, device: torch.device):
    import onnxruntime as ort

    providers: list = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        # The CUDA provider computes fp32 convolutions/GEMMs in TF32 unless told not to (use_tf32
        # defaults to true), which fails a strict fp32 parity check on Ampere and newer.
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0, "use_tf32": 0}))
    return ort.InferenceSession(path, providers=providers)


def onnx_runner(path: str, device: torch.device, session=None) -> Runner:
    session = session or onnx_session(path, device)
    input_name = session.get_inputs()[0].name

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {input_name: images.cpu().numpy()})[0])
    return run


METADATA_PREFIX = "convnets."


def write_onnx_metadata(path: str, loaded: LoadedModel, evaluation: EvalPreprocessing) -> None:
    """Record the evaluation preprocessing and class names in the ONNX file's metadata_props, so
    whoever runs the file (``--onnx``) preprocesses as the model was trained."""
    import json

    import onnx

    model = onnx.load(path)
    values = {"arch": loaded.arch, **evaluation.metadata(), "class_names": json.dumps(default_class_names(loaded))}
    for key, value in values.items():
        model.metadata_props.add(key=METADATA_PREFIX + key, value=str(value))
    onnx.save(model, path)


def _json_list(text: str | None) -> list[str] | None:
    import json
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return [str(v) for v in value] if isinstance(value, list) else None


class OnnxModel(nn.Module):
    """An exported ONNX file run by ONNX Runtime behind the ``nn.Module`` call interface, so the
    evaluation loop and classify.py can score the deployed artifact itself (inference only)."""

    def __init__(self, path: str, device: torch.device):
        super().__init__()
        if not os.path.isfile(path):
            raise UserError(f"ONNX file {path} does not exist")
        try:
            session = onnx_session(path, device)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"{path} is not a loadable ONNX model ({detail})") from None
        shape, input_shape = session.get_outputs()[0].shape, session.get_inputs()[0].shape
        self.num_classes = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None
        self.image_size = input_shape[-1] if len(input_shape) == 4 and isinstance(input_shape[-1], int) else None
        meta = {k[len(METADATA_PREFIX):]: v for k, v in session.get_modelmeta().custom_metadata_map.items()
                if k.startswith(METADATA_PREFIX)}
        self.preprocessing = preprocessing.EvalPreprocessing.from_dict(meta)
        names = _json_list(meta.get("class_names"))
        self.class_names = names if names and len(names) == self.num_classes else None
        self.path = path
        self._run = onnx_runner(path, device, session)

    def check_classes(self, num_classes: int) -> None:
        if self.num_classes is not None and self.num_classes != num_classes:
            raise UserError(f"{self.path} outputs {self.num_classes} classes but the data has {num_classes}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images.float().contiguous()).to(images.device)


def torchscript_runner(path: str, device: torch.device) -> Runner:
    with _quiet_deprecations():
        module = torch.jit.load(path, map_location=device).eval()

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), _quiet_deprecations():
            return module(images.to(device)).cpu()
    return run


def check_parity(runner: Runner, model: nn.Module, image_size: int, *, device: torch.device,
                 batches: Sequence[int] = (1, 4), seed: int = 0) -> list[Parity]:
    """Feed the same random images to ``runner`` and to the eager ``model``; one result per batch."""
    generator = torch.Generator().manual_seed(seed)
    results = []
    for batch in batches:
        images = torch.randn(batch, 3, image_size, image_size, generator=generator)
        with torch.no_grad():
            expected = model(images.to(device)).float().cpu()
        got = runner(images).float()
        if got.shape != expected.shape:
            raise UserError(f"exported model returned shape {list(got.shape)} for batch {batch}, "
                            f"PyTorch {list(expected.shape)}")
        agreement = float((got.argmax(1) == expected.argmax(1)).float().mean())
        results.append(Parity(batch, float((got - expected).abs().max()), float(expected.abs().max()), agreement))
    return results
