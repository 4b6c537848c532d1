#!/usr/bin/env python
"""Classify images with a trained model and print the top-k classes.

    python classify.py --arch resnet50 --weights W.pth --image cat.jpg [dog.png ...]
    python classify.py --pretrained-from-file workspace/model_best.pth.tar --image photos/ --json

``--weights`` and ``--pretrained-from-file`` take a weights file (ours, NGC or torchvision) or a
training checkpoint (``--ema`` picks its EMA weights). Preprocessing is the evaluation one:
resize the shorter side to size+32, center crop, ImageNet mean/std; the size is the model's
default (224, B4 380), or the one a training checkpoint was trained with, or ``--image-size``.
Class names come from ``--labels FILE``, else the checkpoint, else the ImageNet list for
1000-class models, else class indices. Output per image: its path, then ``<class>: <pct>%``
lines, best first (or one JSON document with ``--json``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Iterator, Sequence

import torch
from PIL import UnidentifiedImageError

from image_classification import compiling, config, export, inference, models, preprocessing, quantization, runtime
from image_classification.data.checks import is_image_file
from image_classification.data.transforms import open_rgb
from image_classification.errors import UserError, exit_status

PRECISIONS = ("AMP", "FP32", "TF32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="classify.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", nargs="+", action="extend", required=True, metavar="PATH",
                        help="image file(s) and/or folder(s) of images (searched recursively)")
    parser.add_argument("--arch", "-a", default=None, metavar="ARCH",
                        help="model architecture (default: the checkpoint's, else resnet50)")
    parser.add_argument("--precision", default="AMP", type=str.upper, metavar="P",
                        help="AMP (fp16 on CUDA; on the CPU BatchNorm folded, and bf16 with channels_last where the "
                             "CPU has native bf16, fp32 elsewhere: the measured fastest CPU path) | FP32 | TF32 "
                             "(default: AMP)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="torch.compile the model (BACKEND default: inductor); pays off over many batches, "
                             "the --json output reports the compile time (default: off, eager)")
    parser.add_argument("--topk", default=None, metavar="K",
                        help=f"classes to show per image (default: {config.DEFAULT_TOPK}, or all when the model "
                             "has fewer)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--labels", default=None, metavar="FILE",
                        help="class names, one per line in class-index order")
    parser.add_argument("--image-size", default=None, type=int, metavar="PX",
                        help="center-crop size (default: the checkpoint's or the architecture's, "
                             "e.g. 224; B4 380)")
    parser.add_argument("--resize-size", default=None, type=int, metavar="PX",
                        help="resize the shorter side to PX before cropping (default: image size + 32)")
    parser.add_argument("--interpolation", default=None, choices=("bilinear", "bicubic"),
                        help="resize filter (default: the checkpoint's, else bilinear)")
    parser.add_argument("-b", "--batch-size", default=16, type=int, metavar="N",
                        help="images per forward pass (default: 16)")
    config.add_onnx_flag(parser)
    export.add_model_flags(parser)  # --weights/--pretrained-from-file, --ema, --pretrained, --num-classes, ...
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return exit_status(lambda: run(build_parser().parse_args(argv)))
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def run(args: argparse.Namespace) -> int:
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
    topk = config.topk_for(topk, loaded.num_classes, "the model")
    names = class_names(loaded, args.labels)

    # On the CPU the default (AMP) runs the measured fastest path: BatchNorm folded, precision and
    # memory format from what the CPU computes natively (image_classification.precision).
    fast_cpu = (device.type == "cpu" and args.precision == "AMP" and args.onnx is None
                and not quantization.is_quantized(loaded.model))
    rt = runtime.build_runtime(device=device, amp=args.precision == "AMP", amp_dtype=None,
                               memory_format="auto" if fast_cpu else "nchw", tf32=args.precision != "FP32",
                               path="infer")
    model = (inference.cpu_fast_path(loaded.model, rt.amp_dtype, rt.memory_format) if fast_cpu
             else loaded.model.to(device))
    compiler = _compiler(args)
    clock = compiling.CompileClock(compiler)
    model = compiling.view(compiler)(model)
    evaluation = resolve_preprocessing(loaded, args)
    image_size, resize_size = evaluation.image_size, evaluation.resize_size
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
        document = _json_document(results, loaded, image_size, resize_size, rt)
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


def _load(args: argparse.Namespace, device: torch.device) -> export.LoadedModel:
    """The PyTorch model from the model flags, or the exported file of --onnx run by ONNX Runtime."""
    if args.onnx is None:
        weights_path = export.weights_path(
            args, "the model is randomly initialised and its predictions are meaningless")
        return export.load_model(args.arch, weights_path, ema=args.ema, num_classes=args.num_classes,
                                 options=config.model_options(args))
    if args.pretrained_from_file or args.pretrained:
        raise UserError("--onnx runs the exported file as it is; drop --weights/--pretrained-from-file/--pretrained")
    model = export.OnnxModel(args.onnx, device)
    if model.num_classes is None:
        raise UserError(f"{args.onnx} does not output [batch, classes] logits")
    return export.LoadedModel(model=model, spec=models.get(args.arch or "resnet50"), num_classes=model.num_classes,
                              class_names=model.class_names, preprocessing=model.preprocessing)


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


def class_names(loaded: export.LoadedModel, labels: str | None) -> list[str]:
    """--labels, else the checkpoint's names, else ImageNet's for 1000 classes, else indices."""
    if labels is not None:
        names = export.read_labels(labels)
        if len(names) != loaded.num_classes:
            raise UserError(f"labels file {labels} has {len(names)} names but the model has "
                            f"{loaded.num_classes} classes")
        return names
    return export.default_class_names(loaded)


def resolve_preprocessing(loaded: export.LoadedModel, args: argparse.Namespace) -> preprocessing.EvalPreprocessing:
    """Flags, else the model's saved record, else the architecture's (an ONNX file's input size)."""
    default_size = getattr(loaded.model, "image_size", None) or loaded.spec.default_image_size
    return preprocessing.resolve(loaded.preprocessing, default_size, image_size=args.image_size,
                                 resize_size=args.resize_size, interpolation=args.interpolation,
                                 interpolations=preprocessing.PIL_INTERPOLATIONS)


def print_result(result: dict) -> None:
    print(result["image"])
    for prediction in result["predictions"]:
        print(f"{prediction['class']}: {100 * prediction['probability']:.1f}%")


def _json_document(results: list[dict], loaded: export.LoadedModel, image_size: int, resize_size: int,
                   rt: runtime.Runtime) -> dict:
    return {"arch": loaded.arch, "num_classes": loaded.num_classes, "image_size": image_size,
            "resize_size": resize_size, "precision": rt.precision_name, "device": str(rt.device),
            **({"precision_note": " ".join(rt.notes)} if rt.notes else {}), "results": results}


if __name__ == "__main__":
    sys.exit(main())
