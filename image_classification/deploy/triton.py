"""A Triton Inference Server model repository entry for an exported model.

Layout (what ``tritonserver --model-repository DIR`` loads)::

    DIR/<name>/config.pbtxt     ModelConfig in protobuf text format
    DIR/<name>/labels.txt       class names, one per line (the output's label_filename)
    DIR/<name>/1/model.onnx     version 1 (model.pt for TorchScript)

The config is written as text by hand (it is a handful of fields); the tests parse it with the
``ModelConfig`` protobuf that ``tritonclient`` ships, so a typo cannot pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

from image_classification.deploy.exporting import INPUT_NAME, OUTPUT_NAME
from image_classification.errors import UserError
from image_classification.preprocessing import EvalPreprocessing


class Platform(NamedTuple):
    name: str         # Triton's backend platform
    filename: str     # the model file inside the version folder
    input_name: str
    output_name: str


# TorchScript models carry no tensor names: Triton's naming convention for them.
PLATFORMS = {"onnx": Platform("onnxruntime_onnx", "model.onnx", INPUT_NAME, OUTPUT_NAME),
             "torchscript": Platform("pytorch_libtorch", "model.pt", "INPUT__0", "OUTPUT__0")}
LABELS_FILE = "labels.txt"


@dataclass(frozen=True)
class Entry:
    name: str
    platform: Platform
    image_size: int
    num_classes: int
    max_batch_size: int
    preprocessing: str  # a human-readable description, written as a comment (see describe)


def model_name(arch: str, int8: bool, requested: str | None = None) -> str:
    """``requested`` (--triton-model-name), else the arch, plus ``-int8`` for an INT8 export."""
    return requested or arch + ("-int8" if int8 else "")


def describe(arch: str, num_classes: int, evaluation: EvalPreprocessing) -> str:
    """What the config's comment tells a client: the model, its input preprocessing, its output."""
    return (f"{arch}, {num_classes} classes, exported by convnets model2onnx.py.\n"
            f"Input: RGB image, {evaluation.describe()}, float32 NCHW.\n"
            "Output: logits (softmax gives probabilities); labels.txt names the classes.")


def prepare(repository: str, name: str) -> Path:
    """Check the repository folder and create ``<repository>/<name>/1``; returns the model folder.
    An existing ``<name>`` is never overwritten."""
    root = Path(repository)
    if root.exists() and not root.is_dir():
        raise UserError(f"--triton-repository {repository} exists and is not a directory")
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"--triton-model-name {name!r} is not a valid folder name")
    folder = root / name
    if folder.exists():
        raise UserError(f"{folder} already exists; choose another --triton-model-name or remove it")
    (folder / "1").mkdir(parents=True)
    return folder


def config_text(entry: Entry) -> str:
    comment = "\n".join(f"# {line}" for line in entry.preprocessing.splitlines())
    return f"""{comment}
name: "{entry.name}"
platform: "{entry.platform.name}"
max_batch_size: {entry.max_batch_size}
input [
  {{
    name: "{entry.platform.input_name}"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, {entry.image_size}, {entry.image_size} ]
  }}
]
output [
  {{
    name: "{entry.platform.output_name}"
    data_type: TYPE_FP32
    dims: [ {entry.num_classes} ]
    label_filename: "{LABELS_FILE}"
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 100
}}
"""


def write(folder: Path, entry: Entry, labels: Sequence[str]) -> None:
    if len(labels) != entry.num_classes:
        raise UserError(f"{len(labels)} class names for a model with {entry.num_classes} classes")
    (folder / LABELS_FILE).write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
    (folder / "config.pbtxt").write_text(config_text(entry), encoding="utf-8")
