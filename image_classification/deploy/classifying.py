"""``classify.py``'s pipeline: find the images, load the model (PyTorch weights or an ONNX file),
preprocess as the model was evaluated, run it in batches and print the top-k classes."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Iterator, Sequence

import torch
from PIL import UnidentifiedImageError

from image_classification import compiling, models, preprocessing, quantization, runtime, settings
from image_classification.data.sources.folder import is_image_file
from image_classification.data.loaders.transforms import open_rgb
from image_classification.deploy import fast_cpu, loading
from image_classification.deploy.labels import class_names
from image_classification.deploy.loading import LoadedModel
from image_classification.deploy.runners import OnnxModel
from image_classification.errors import UserError

PRECISIONS = ("AMP", "FP32", "TF32")


def run(args: argparse.Namespace) -> int:
    """Classify the images of ``classify.py``'s flags; print text, or one JSON document."""
    topk = None if args.topk is None else _parse_topk(args.topk)
    if args.precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {args.precision}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    for flag in ("image_size", "resize_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    images = list(collect_images(args.image))  # fail on a missing path before loading the model

    device = runtime.select_device("cpu" if args.cpu else "auto", 0)
    loaded = _load(args, device)
    topk = settings.topk_for(topk, loaded.num_classes, "the model")
    names = class_names(loaded, args.labels)

    # On the CPU the default (AMP) runs the measured fastest path: BatchNorm folded, precision and
    # memory format from what the CPU computes natively (image_classification.precision).
    fast_cpu_path = (device.type == "cpu" and args.precision == "AMP" and args.onnx is None
                     and not quantization.is_quantized(loaded.model))
    rt = runtime.build_runtime(device=device, amp=args.precision == "AMP", amp_dtype=None,
                               memory_format="auto" if fast_cpu_path else "nchw", tf32=args.precision != "FP32",
                               path="infer")
    model = (fast_cpu.cpu_fast_path(loaded.model, rt.amp_dtype, rt.memory_format) if fast_cpu_path
             else loaded.model.to(device))
    compiler = _compiler(args)
    clock = compiling.CompileClock(compiler)
    model = compiling.view(compiler)(model)
    evaluation = resolve_preprocessing(loaded, args)
    transform, normalize = evaluation.transform(), evaluation.normalize(device, rt.memory_format)

    results = []
    for start in range(0, len(images), args.batch_size):
        paths = images[start:start + args.batch_size]
        batch = normalize(torch.stack([transform(_open(path)) for path in paths]).to(device))
        start = time.perf_counter()
        with torch.no_grad(), rt.autocast():
            logits = model(batch)
        clock.compiled(time.perf_counter() - start)
        probabilities = torch.softmax(logits.float(), dim=1).cpu()
        top = probabilities.topk(topk, dim=1)
        for path, values, indices in zip(paths, top.values.tolist(), top.indices.tolist()):
            result = {"image": path, "predictions": [
                {"class": names[i], "index": i, "probability": p} for p, i in zip(values, indices)]}
            if args.json:
                results.append(result)
            else:
                print_result(result)
    if args.json:
        document = _json_document(results, loaded, evaluation, rt)
        if compiler is not None:
            document["compile_time"] = clock.seconds
        json.dump(document, sys.stdout, indent=2)
        print()
    return 0


def _compiler(args: argparse.Namespace) -> compiling.Compiler | None:
    if args.compile is None:
        return None
    if args.onnx is not None:
        raise UserError("--compile compiles a PyTorch model; --onnx runs the file with ONNX Runtime")
    return compiling.Compiler(args.compile, shapes=2)  # full batches and the last one


def _load(args: argparse.Namespace, device: torch.device) -> LoadedModel:
    """The PyTorch model from the model flags, or the exported file of --onnx run by ONNX Runtime."""
    if args.onnx is None:
        return loading.load_from_flags(args, "the model is randomly initialised and its predictions are meaningless")
    if args.pretrained_from_file or args.pretrained:
        raise UserError("--onnx runs the exported file as it is; drop --weights/--pretrained-from-file/--pretrained")
    model = OnnxModel(args.onnx, device)
    if model.num_classes is None:
        raise UserError(f"{args.onnx} does not output [batch, classes] logits")
    return LoadedModel(model=model, spec=models.get(args.arch or "resnet50"), num_classes=model.num_classes,
                       class_names=model.class_names, preprocessing=model.preprocessing, input_size=model.image_size)


def _parse_topk(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"--topk must be a positive integer, got {text!r}") from None
    if value < 1:
        raise UserError(f"--topk must be a positive integer, got {value}")
    return value


def collect_images(paths: Sequence[str]) -> Iterator[str]:
    """Files as given; folders expanded to their image files (recursively, sorted)."""
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(root, name) for root, _, files in os.walk(path)
                           for name in files if is_image_file(name))
            if not found:
                raise UserError(f"folder {path} contains no image files")
            yield from found
        elif os.path.isfile(path):
            yield path
        else:
            raise UserError(f"image {path} does not exist")


def _open(path: str):
    try:
        return open_rgb(path)
    except UnidentifiedImageError:
        raise UserError(f"{path} is not a readable image (unknown or corrupt image format)") from None
    except Exception as error:  # noqa: BLE001 - PIL raises many types for a bad file
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{path} is not a readable image ({detail})") from None


def resolve_preprocessing(loaded: LoadedModel, args: argparse.Namespace) -> preprocessing.EvalPreprocessing:
    """classify.py's flags over the model's saved record over its default (what PIL can do)."""
    return loading.resolve_preprocessing(loaded, image_size=args.image_size, resize_size=args.resize_size,
                                         interpolation=args.interpolation,
                                         interpolations=preprocessing.PIL_INTERPOLATIONS)


def print_result(result: dict) -> None:
    print(result["image"])
    for prediction in result["predictions"]:
        print(f"{prediction['class']}: {100 * prediction['probability']:.1f}%")


def _json_document(results: list[dict], loaded: LoadedModel, evaluation: preprocessing.EvalPreprocessing,
                   rt: runtime.Runtime) -> dict:
    return {"arch": loaded.arch, "num_classes": loaded.num_classes, "image_size": evaluation.image_size,
            "resize_size": evaluation.resize_size, "interpolation": evaluation.interpolation,
            "precision": rt.precision_name, "device": str(rt.device),
            **({"precision_note": " ".join(rt.notes)} if rt.notes else {}), "results": results}
