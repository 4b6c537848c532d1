"""What an exported ONNX file says about itself: the architecture, the evaluation preprocessing
and the class names, in its ``metadata_props`` under ``convnets.*`` keys (written and read here
only), so whoever runs the file (``main.py --onnx``, ``classify.py --onnx``) preprocesses as the
model was trained."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

from image_classification.deploy.labels import default_class_names
from image_classification.deploy.loading import LoadedModel
from image_classification.preprocessing import EvalPreprocessing

METADATA_PREFIX = "convnets."


def write_onnx_metadata(path: str, loaded: LoadedModel, evaluation: EvalPreprocessing) -> None:
    """Add the record to the ONNX file at ``path`` (rewritten in place)."""
    import onnx

    model = onnx.load(path)
    values = {"arch": loaded.arch, **evaluation.metadata(), "class_names": json.dumps(default_class_names(loaded))}
    for key, value in values.items():
        model.metadata_props.add(key=METADATA_PREFIX + key, value=str(value))
    onnx.save(model, path)


@dataclass(frozen=True)
class OnnxMetadata:
    preprocessing: EvalPreprocessing | None
    class_names: list[str] | None


def read_onnx_metadata(custom_metadata: Mapping[str, str]) -> OnnxMetadata:
    """The record from an ONNX Runtime session's ``custom_metadata_map`` (None where missing)."""
    values = {key[len(METADATA_PREFIX):]: value for key, value in custom_metadata.items()
              if key.startswith(METADATA_PREFIX)}
    return OnnxMetadata(EvalPreprocessing.from_dict(values), _json_list(values.get("class_names")))


def _json_list(text: str | None) -> list[str] | None:
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return [str(v) for v in value] if isinstance(value, list) else None
