#!/usr/bin/env python
"""Turn a training checkpoint into a plain weights file.

    python checkpoint2model.py --checkpoint-path workspace/model_best.pth.tar --weight-path model.pth [--ema]

The output is a ``name -> tensor`` state dict without ``module.`` prefixes (the EMA weights with
``--ema``), written atomically. ``main.py --pretrained-from-file``, ``main.py --evaluate`` and
``classify.py --weights`` accept it. Weights files hold no class names: ``--labels-path FILE``
writes the checkpoint's, one per line, for ``classify.py --labels FILE``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from image_classification import models
from image_classification.checkpoints import contents, files
from image_classification.checkpoints.contents import SavedRun
from image_classification.deploy import loading
from image_classification.errors import UserError, exit_status
from image_classification.models import weights


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="checkpoint2model.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint-path", required=True, metavar="CKPT",
                        help="training checkpoint (checkpoint.pth.tar, model_best.pth.tar, ...)")
    parser.add_argument("--weight-path", required=True, metavar="OUT", help="weights file to write")
    parser.add_argument("--ema", action="store_true",
                        help="export the EMA weights (state_dict_ema; the run needs --use-ema)")
    parser.add_argument("--labels-path", default=None, metavar="FILE",
                        help="also write the checkpoint's class names here, one per line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return exit_status(lambda: run(build_parser().parse_args(argv)))


def run(args: argparse.Namespace) -> int:
    source, out = Path(args.checkpoint_path), Path(args.weight_path)
    if not out.parent.resolve().is_dir():
        raise UserError(f"output directory {out.parent} does not exist")
    if not source.is_file():
        raise UserError(f"checkpoint {source} does not exist" if not source.exists()
                        else f"checkpoint {source} is not a file")
    if out.exists() and out.resolve() == source.resolve():
        raise UserError("--weight-path must differ from --checkpoint-path (it would overwrite the checkpoint)")
    loaded = contents.read_weights(str(source), ema=args.ema)
    saved = loaded.checkpoint
    if saved is None:
        print(f"=> note: {source} is not a training checkpoint; writing its weights unchanged "
              "apart from module. prefixes")
    else:
        print(f"=> loaded {source}: arch {saved.arch or 'unknown'}, epoch {saved.epoch}, "
              f"best_prec1 {_format(saved.best_prec1)}")

    state_dict = {name: tensor.detach().clone().contiguous() for name, tensor in loaded.state_dict.items()}
    _verify(state_dict, saved, source)
    files.write_atomic(files.serialize(state_dict), out)
    kind = "EMA weights (state_dict_ema)" if args.ema else "weights (state_dict)"
    print(f"=> wrote {len(state_dict)} tensors, {kind}, to {out}")

    if args.labels_path:
        names = saved.model.class_names if saved is not None else None
        if not names:
            raise UserError(f"{source} stores no class names; nothing to write to --labels-path")
        files.write_atomic(("\n".join(map(str, names)) + "\n").encode("utf-8"), Path(args.labels_path))
        print(f"=> wrote {len(names)} class names to {args.labels_path}")
    return 0


def _verify(state_dict: dict[str, torch.Tensor], saved: SavedRun | None, source: Path) -> None:
    """Load the weights strictly into the checkpoint's architecture before writing anything."""
    if saved is None:
        return
    record = saved.model
    if not record.arch or record.arch not in models.names():
        return
    spec = models.get(record.arch)
    num_classes = record.num_classes or loading.infer_num_classes(state_dict) or 1000
    weights.load_state_dict_into(spec.build(num_classes=num_classes), state_dict,
                                 source=str(source), family=spec.family, arch=record.arch)


def _format(value) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else str(value)


if __name__ == "__main__":
    sys.exit(main())
