"""Write a copy of an image tree with every image's shorter side capped, or shards of it.

    python -m image_classification.data.prepare --max-size 256 SRC DST
    python -m image_classification.data.prepare --to webdataset|tfrecord [--shard-size MB | --shard-samples N]
                                                [--max-size PX] SRC DST
    python -m image_classification.data.prepare --to packed [--max-size PX] [--encoding auto|raw|jpeg]
                                                [--quality Q] SRC DST

With ``--to``, the ImageFolder SRC becomes WebDataset tar or TF-slim TFRecord shards in DST, with
index files and ``classes.txt``; see :mod:`image_classification.data.prepare.convert`. ``--to packed`` writes
any dataset the loaders read (folder or shards) as one memory-mapped file per split of images
decoded once (:mod:`image_classification.data.prepare.pack`). The rest of this docstring is about the copy.

Every image file under SRC (the files the loaders read: image extensions, hidden entries ignored)
is written to the same relative path under DST. An image whose shorter side is larger than
``--max-size`` is resized (aspect ratio kept) so its shorter side is ``--max-size``, decoded at a
reduced JPEG scale first where that still leaves at least the target size, and saved in its own
format (JPEG at ``--quality``, EXIF and colour profile kept). A smaller image is copied byte for
byte once it is known to decode.

Why the shorter side: both training and validation geometry are defined by it. Validation resizes
the shorter side to ``val_resize_size`` and center-crops, so with ``--max-size`` at least that size
the validation pixels are the same up to resampling; the random training crop is a share of the
image's area, so capping the shorter side shrinks every image by the same rule whatever its aspect
ratio (capping the longer side would shrink panoramas below the crop size).

Resumable: a file already in DST is skipped, and each file is written to a hidden ``.NAME.part``
first and renamed when complete, so an interrupted run leaves no partial image under its real
name (the loaders ignore hidden files; the next run overwrites the ``.part``). Unreadable files are
reported and skipped; the exit status is still 0 when the rest were written.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Sequence

from tqdm import tqdm

from image_classification import machine
from image_classification.data.prepare import convert, pack
from image_classification.data.prepare.resize import load_capped, save_image
from image_classification.data.sources.folder import is_image_file
from image_classification.errors import UserError, exit_status

_SHOWN = 5


@dataclass(frozen=True)
class Outcome:
    path: str          # relative to SRC
    action: str        # "resized", "copied", "present" or "unreadable"
    detail: str = ""   # why a file is unreadable


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m image_classification.data.prepare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("src", metavar="SRC", help="image tree to read (e.g. an ImageFolder root with train/ and val/)")
    parser.add_argument("dst", metavar="DST", help="where to write the copy (created; files already there are kept)")
    parser.add_argument("--max-size", type=int, default=None, metavar="PX",
                        help="largest shorter side, in pixels, of an image in DST (required without --to; "
                             f"--to packed: default {pack.DEFAULT_MAX_SIZE}, the reference's validation resize)")
    parser.add_argument("--quality", type=int, default=90, metavar="Q",
                        help="JPEG/WebP quality of resized images (--to packed: of its JPEGs), 1-100 (default: 90)")
    parser.add_argument("-j", "--workers", type=int, default=machine.usable_cores(), metavar="N",
                        help="parallel processes (default: the CPUs this process may use)")
    shards = parser.add_argument_group("shards (--to)")
    shards.add_argument("--to", choices=(*convert.FORMATS, pack.FORMAT), default=None,
                        help="write shards instead of a copy: webdataset (train-000000.tar ..., val-...) or "
                             "tfrecord (TF-slim: train-00000-of-NNNNN ..., validation-...); or packed "
                             "(train.packed, val.packed: images decoded once, memory-mapped when read)")
    shards.add_argument("--shard-size", type=float, default=None, metavar="MB",
                        help=f"largest shard, in MB (10^6 bytes) (default: {convert.DEFAULT_SHARD_MB} unless "
                             "--shard-samples is given)")
    shards.add_argument("--shard-samples", type=int, default=None, metavar="N", help="most samples in a shard")
    shards.add_argument("--encoding", choices=pack.ENCODINGS, default=None,
                        help="--to packed: how images are stored: raw pixels (a read is a memory copy) or JPEG at "
                             "--quality; auto: raw when the raw copy fits in half of this machine's memory "
                             "(default: auto)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return exit_status(lambda: run(build_parser().parse_args(argv)))


def run(args: argparse.Namespace) -> int:
    src, dst = _check(args)
    if args.to == pack.FORMAT:
        return _run_packed(src, dst, args)
    if args.to:
        return _run_shards(src, dst, args)
    files = list_images(src)
    if not files:
        raise UserError(f"no image files under {src}")
    job = _Job(src, dst, args.max_size, args.quality)
    counts = {"resized": 0, "copied": 0, "present": 0, "unreadable": 0}
    unreadable: list[str] = []
    with multiprocessing.Pool(args.workers) as pool, tqdm(total=len(files), unit="img", desc="prepare") as bar:
        for outcome in pool.imap_unordered(job, files, chunksize=8):
            counts[outcome.action] += 1
            if outcome.action == "unreadable":
                unreadable.append(outcome.path)
                bar.write(f"skipping unreadable {os.path.join(src, outcome.path)}: {outcome.detail}", file=sys.stderr)
            bar.update()
    print(f"{dst}: {counts['resized']} resized, {counts['copied']} copied (shorter side <= {args.max_size}), "
          f"{counts['present']} already there, {counts['unreadable']} unreadable skipped")
    if unreadable:
        shown = ", ".join(sorted(unreadable)[:_SHOWN]) + (", ..." if len(unreadable) > _SHOWN else "")
        print(f"warning: {len(unreadable)} unreadable file(s) not written: {shown}", file=sys.stderr)
    return 0


def _run_shards(src: str, dst: str, args: argparse.Namespace) -> int:
    shard_bytes = None if args.shard_size is None else int(args.shard_size * 1e6)
    if shard_bytes is None and args.shard_samples is None:
        shard_bytes = convert.DEFAULT_SHARD_MB * 10**6
    settings = convert.Settings(args.to, shard_bytes, args.shard_samples, args.max_size, args.quality)
    for result in convert.write_shards(src, dst, settings, args.workers):
        kept = f" ({result.kept} kept from an earlier run)" if result.kept else ""
        print(f"{result.split}: {result.samples} images in {len(result.shards)} shard(s){kept}: "
              f"{os.path.basename(result.shards[0])} ... {os.path.basename(result.shards[-1])}")
        if result.bad:
            shown = ", ".join(sorted(result.bad)[:_SHOWN]) + (", ..." if len(result.bad) > _SHOWN else "")
            print(f"warning: {len(result.bad)} unreadable {result.split} image(s) left out: {shown}", file=sys.stderr)
    print(f"train from them:\n  {convert.train_command(args.dst, args.to)}")
    return 0


def _run_packed(src: str, dst: str, args: argparse.Namespace) -> int:
    splits = pack.open_splits(src)
    chosen = pack.plan(splits, args.max_size or pack.DEFAULT_MAX_SIZE, args.encoding or "auto", args.quality)
    for result in pack.write_packed(splits, dst, chosen.settings, args.workers):
        kept = " (kept from an earlier run)" if result.kept else ""
        print(f"{result.split}: {result.samples} images, {result.bytes:,} bytes in {result.data_path}{kept}")
        if result.bad:
            shown = ", ".join(sorted(result.bad)[:_SHOWN]) + (", ..." if len(result.bad) > _SHOWN else "")
            print(f"warning: {len(result.bad)} unreadable {result.split} image(s) left out: {shown}", file=sys.stderr)
    print("\n".join(pack.report(chosen)))
    print(f"train from it:\n  {pack.train_command(args.dst)}")
    return 0


def _check(args: argparse.Namespace) -> tuple[str, str]:
    if args.to is None:
        if args.max_size is None:
            raise UserError("--max-size is required (or --to webdataset|tfrecord|packed)")
    if args.to not in convert.FORMATS and (args.shard_size is not None or args.shard_samples is not None):
        raise UserError("--shard-size and --shard-samples need --to webdataset|tfrecord")
    if args.to != pack.FORMAT and args.encoding is not None:
        raise UserError("--encoding needs --to packed")
    if args.shard_size is not None and not args.shard_size > 0:
        raise UserError(f"--shard-size must be > 0 MB, got {args.shard_size:g}")
    if args.shard_samples is not None and args.shard_samples < 1:
        raise UserError(f"--shard-samples must be >= 1, got {args.shard_samples}")
    if args.max_size is not None and args.max_size < 1:
        raise UserError(f"--max-size must be >= 1, got {args.max_size}")
    if not 1 <= args.quality <= 100:
        raise UserError(f"--quality must be in 1..100, got {args.quality}")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if not os.path.isdir(args.src):
        what = "is not a directory" if os.path.exists(args.src) else "does not exist"
        raise UserError(f"SRC {args.src} {what}")
    if os.path.exists(args.dst) and not os.path.isdir(args.dst):
        raise UserError(f"DST {args.dst} exists and is not a directory")
    src, dst = os.path.realpath(args.src), os.path.realpath(args.dst)
    if src == dst or dst.startswith(src + os.sep) or src.startswith(dst + os.sep):
        raise UserError(f"SRC {args.src} and DST {args.dst} must not contain each other")
    return src, dst


def list_images(root: str) -> list[str]:
    """Image files under ``root`` (relative paths, sorted), as the loaders find them."""
    found = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found.extend(os.path.relpath(os.path.join(folder, name), root) for name in sorted(names) if is_image_file(name))
    return found


class _Job:
    """One file: SRC/rel → DST/rel (a picklable callable for the pool)."""

    def __init__(self, src: str, dst: str, max_size: int, quality: int):
        self.src, self.dst, self.max_size, self.quality = src, dst, max_size, quality

    def __call__(self, rel: str) -> Outcome:
        source, target = os.path.join(self.src, rel), os.path.join(self.dst, rel)
        if os.path.exists(target):
            return Outcome(rel, "present")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        part = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.part")
        try:
            try:
                image, image_format, resized = load_capped(source, self.max_size)
            except Exception as error:  # noqa: BLE001 -- PIL plugins raise many types on malformed data
                return Outcome(rel, "unreadable", str(error) or type(error).__name__)
            if resized:
                save_image(image, image_format, part, self.quality)
            else:
                shutil.copyfile(source, part)
            os.replace(part, target)
        except BaseException:
            if os.path.exists(part):
                os.remove(part)
            raise
        return Outcome(rel, "resized" if resized else "copied")
