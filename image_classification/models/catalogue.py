"""Published ImageNet weights by name: NVIDIA's NGC files and torchvision's, one catalogue.

    python -m image_classification.models.catalogue [--arch resnet50]     # list them
    python main.py --arch resnet50 --pretrained resnet50:IMAGENET1K_V2 ... # use one

A name is ``ARCH:TAG``: ``ARCH`` is this project's ``--arch``, ``TAG`` is ``NGC`` for NVIDIA's file
or the name of a torchvision weights enum member (``IMAGENET1K_V1``, ``IMAGENET1K_V2``,
``DEFAULT``); torchvision's own spelling ``ResNet50_Weights.IMAGENET1K_V2`` is accepted too. Bare
``--pretrained`` is the architecture's NGC file where NVIDIA published one (the reference's
behaviour), else torchvision's ``DEFAULT``.

The torchvision entries are read from torchvision's weights API at run time
(``torchvision.models.get_model_weights``: URL, ``num_params``, ``_metrics``, ``_file_size``,
``recipe`` and ``transforms()``), not copied: an architecture is listed when torchvision has a
model of the same name whose state dict this project loads (ResNet-18 ... 152, ResNeXt50-32x4d,
ResNeXt101-32x8d, EfficientNet B0-B7; the key maps are in ``weights.py`` and ``efficientnet.py``
and are tested against torchvision's models). Every entry carries the evaluation preprocessing its
top-1 was measured with, and the model options its weights need (torchvision's EfficientNets use
other BatchNorm epsilons than the reference's, read off torchvision's model, since a state dict
does not hold them), so evaluating and fine-tuning need no extra flags.

Downloads go to torch.hub's cache, hash-checked (:func:`image_classification.models.published.download`);
``CONVNETS_WEIGHTS_MIRROR`` points every download at another server.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from image_classification.errors import UserError, exit_status
from image_classification.models import published, registry
from image_classification.preprocessing import EvalPreprocessing

NGC_TAG = "NGC"
#: What a ``--pretrained`` value must look like to be a name (anything else is a path, e.g. DIR).
NAME_PATTERN = re.compile(r"^[\w.-]+:\w+$|^\w+_Weights\.\w+$")
# The reference README's top-1 of its AMP runs (the published NGC checkpoints' recipes); EfficientNet
# was trained and evaluated with bicubic resizing (configs.yml: efficientnet_params).
_NGC_TOP1 = {"resnet50": 78.60, "resnext101-32x4d": 80.43, "se-resnext101-32x4d": 81.00, "efficientnet-b0": 77.63,
             "efficientnet-b4": 82.98, "efficientnet-widese-b0": 77.89, "efficientnet-widese-b4": 83.28}


@dataclass(frozen=True)
class Entry:
    name: str                              # ARCH:TAG
    arch: str                              # this project's --arch
    url: str
    source: str                            # "NVIDIA NGC" or "torchvision"
    preprocessing: EvalPreprocessing       # what the published top-1 was measured with
    top1: float | None = None              # published ImageNet-1K top-1, %
    size_mb: float | None = None           # file size, when published
    recipe: str | None = None
    torchvision: str | None = None         # e.g. "ResNet50_Weights.IMAGENET1K_V2"
    aliases: tuple[str, ...] = field(default=())

    @property
    def params(self) -> int:
        """Parameters of the 1000-class model (counted on the meta device, no memory)."""
        return _count_params(self.arch)

    def model_options(self) -> dict[str, Any]:
        """Model options the weights need besides the architecture's defaults."""
        return _torchvision_norm_options(self.torchvision, self.arch) if self.torchvision else {}


@functools.cache
def _count_params(arch: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in registry.get(arch).build(num_classes=1000).parameters())


@functools.cache
def _torchvision_norm_options(weights_name: str, arch: str) -> dict[str, Any]:
    """torchvision's BatchNorm eps/momentum where the architecture has them as options."""
    spec = registry.get(arch)
    if "bn_epsilon" not in spec.options:
        return {}
    import torchvision
    with torch.device("meta"):
        model = torchvision.models.get_model(weights_name.split("_Weights")[0].lower(), weights=None)
    norm = next(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return {"bn_epsilon": norm.eps, "bn_momentum": norm.momentum}


def _ngc_entries() -> list[Entry]:
    entries = []
    for arch in published.PUBLISHED:
        size = registry.get(arch).default_image_size
        interpolation = "bicubic" if arch.startswith("efficientnet") else "bilinear"
        entries.append(Entry(f"{arch}:{NGC_TAG}", arch, published.weights_url(arch), "NVIDIA NGC",
                             EvalPreprocessing(size, size + 32, interpolation), top1=_NGC_TOP1.get(arch),
                             recipe="reference README, AMP"))
    return entries


def _torchvision_entries() -> list[Entry]:
    import torchvision
    available = set(torchvision.models.list_models(module=torchvision.models))
    entries = []
    for arch in registry.names():
        name = arch.replace("-", "_")
        if registry.get(arch).quantized or name not in available:
            continue
        enum = torchvision.models.get_model_weights(name)
        default = enum.DEFAULT
        for member in enum:
            transform = member.transforms()
            preprocessing = EvalPreprocessing(int(transform.crop_size[0]), int(transform.resize_size[0]),
                                              transform.interpolation.value, tuple(transform.mean), tuple(transform.std))
            metrics = member.meta.get("_metrics", {}).get("ImageNet-1K", {})
            aliases = (f"{enum.__name__}.{member.name}",) + ((f"{arch}:DEFAULT",) if member is default else ())
            entries.append(Entry(f"{arch}:{member.name}", arch, member.url, "torchvision", preprocessing,
                                 top1=metrics.get("acc@1"), size_mb=member.meta.get("_file_size"),
                                 recipe=member.meta.get("recipe"), torchvision=f"{enum.__name__}.{member.name}",
                                 aliases=aliases))
    return entries


@functools.cache
def _published() -> tuple[Entry, ...]:
    return tuple(_ngc_entries() + _torchvision_entries())


_REGISTERED: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    """Add weights of your own (a company model zoo, a test server) to the catalogue."""
    if entry.name in {e.name for e in entries()}:
        raise ValueError(f"weights {entry.name!r} registered twice")
    registry.get(entry.arch)
    _REGISTERED[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)


def entries() -> tuple[Entry, ...]:
    return _published() + tuple(_REGISTERED.values())


def find(name: str, arch: str | None = None) -> Entry:
    """The entry called ``name`` (or one of its aliases); with ``arch``, it must be for that --arch.
    One UserError line otherwise, naming the nearest names or the entry's own --arch."""
    by_name = {alias: entry for entry in entries() for alias in (entry.name, *entry.aliases)}
    entry = by_name.get(name)
    if entry is None:
        names = [e.name for e in entries()]
        own = [e.name for e in entries() if e.arch == arch]  # --arch's own weights first
        near = difflib.get_close_matches(name, own, n=4, cutoff=0.5) or difflib.get_close_matches(
            name, names, n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise UserError(f"unknown weights {name!r}{hint} (list them: python -m image_classification.models.catalogue)")
    if arch is not None and entry.arch != arch:
        raise UserError(f"weights {name} are for --arch {entry.arch}, not --arch {arch}")
    return entry


def default(arch: str) -> Entry:
    """Bare ``--pretrained``: the NGC file where there is one, else torchvision's DEFAULT."""
    registry.get(arch)  # an unknown --arch is its own error
    own = [e for e in entries() if e.arch == arch]
    chosen = next((e for e in own if e.name.endswith(f":{NGC_TAG}")), None) or next(
        (e for e in own if f"{arch}:DEFAULT" in e.aliases), None)
    if chosen is None:
        archs = sorted({e.arch for e in entries()})
        raise UserError(f"no published weights for --arch {arch} (available for: {', '.join(archs)}); "
                        "use --pretrained-from-file")
    return chosen


def for_flag(value: bool | str | None, arch: str | None) -> Entry | None:
    """The entry ``--pretrained`` names: None when not given, :func:`default` when bare."""
    if not value:
        return None
    if value is True:
        return default(arch or "resnet50")
    return find(str(value), arch)


def fetch(entry: Entry) -> str:
    """The entry's file in torch.hub's cache, downloaded (hash-checked) when not there yet."""
    return published.download(entry.url)


# ---------------------------------------------------------------- listing

def table(arch: str | None = None) -> list[str]:
    """One line per entry: name, parameters, published top-1, file size, preprocessing, source."""
    rows = [("name", "params", "top-1 %", "size MB", "eval preprocessing", "source")]
    for entry in entries():
        if arch is not None and entry.arch != arch:
            continue
        p = entry.preprocessing
        rows.append((entry.name, f"{entry.params:,}", f"{entry.top1:.2f}" if entry.top1 else "-",
                     f"{entry.size_mb:.1f}" if entry.size_mb else "-",
                     f"resize {p.resize_size} crop {p.image_size} {p.interpolation}", entry.source))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m image_classification.models.catalogue",
                                     description="List the published weights that --pretrained NAME accepts.")
    parser.add_argument("--arch", default=None, help="only this architecture's weights")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def show() -> int:
        if args.arch is not None:
            registry.get(args.arch)
        print("\n".join(table(args.arch)))
        return 0
    return exit_status(show)


if __name__ == "__main__":
    sys.exit(main())
