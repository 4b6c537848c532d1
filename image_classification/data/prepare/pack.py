"""A dataset -> its packed form: ``python -m image_classification.data.prepare --to packed SRC DST``.

SRC is anything the loaders read (an ImageFolder, TFRecord or WebDataset shards, or another packed
dataset); each split (``train``, ``val``) is written as :mod:`~image_classification.data.sources.packed`
describes: every image decoded once, its shorter side capped at ``--max-size`` (the rule of
:mod:`~image_classification.data.prepare.resize`, as the copy and shard modes), converted to RGB (alpha
over white, 16-bit scaled: :func:`~image_classification.data.loaders.transforms.to_rgb`, as the loaders
would on every read) and stored

* ``raw``: a binary PPM, the pixels themselves -- reading one is a memory copy; or
* ``jpeg``: a JPEG at ``--quality`` -- about 1/5 of the bytes, but decoded on every read.

``--encoding auto`` (the default) picks raw when the raw copy of the whole dataset, estimated from
the measured sample, fits in half of this machine's memory, so that the page cache can hold it and
reads stay memory copies; JPEG otherwise, since reading raw pixels from disk would then cost more
than decoding (an estimate by the converting machine: train on one with less memory, choose
yourself). At the end the converter prints, for a sample of the images, the size and the decode
cost per image of each option (raw, JPEG q90 and q95, and SRC as stored) on this machine.

Why the shorter side is capped at 256 px by default: validation resizes the shorter side to
``--val-resize-size`` (default ``--image-size`` + 32: 256 at the reference's 224) and center-crops,
so at the default image size validation sees the same pixels up to resampling. For low-resolution
training choose ``--max-size`` at least the largest ``--val-resize-size`` you will use (160 at
128 px): it shrinks the bytes, and the resize work of every random crop, with the square of the
ratio. The random-resized crop is then drawn from the stored image, so a crop's source has fewer
pixels than the original's; a loader warns when the stored side is below what it needs.

Every image is decoded in ``--workers`` processes; one that does not read or decode is listed and
left out (a warning names them). Writes are atomic: each file is written under a hidden ``.part``
name and renamed when complete, the header last, so an interrupted conversion never leaves a split
that looks whole (rerun the command: finished splits are kept, an unfinished one is written again).
A DST split converted from other input or with other settings is never overwritten.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import google_crc32c
import numpy as np
from PIL import Image
from tqdm import tqdm

from image_classification import machine
from image_classification.data import sources
from image_classification.data.loaders.transforms import open_rgb, to_rgb
from image_classification.data.prepare.resize import load_capped
from image_classification.data.sources import packed
from image_classification.data.sources.folder import SPLITS
from image_classification.errors import UserError

FORMAT = packed.FORMAT
ENCODINGS = ("auto", *packed.ENCODINGS)
DEFAULT_MAX_SIZE = 256
MEASURED_QUALITIES = (90, 95)
MEASURED_SAMPLES = 64
CACHE_SHARE = 0.5  # --encoding auto: raw when the raw copy fits in this share of the machine's memory
_SHOWN = 5


@dataclass(frozen=True)
class Settings:
    """What decides the packed bytes; recorded in the header and compared on a rerun."""

    max_size: int
    encoding: str   # raw | jpeg (auto is resolved before writing)
    quality: int    # JPEG quality (recorded as None for raw)


@dataclass(frozen=True)
class OptionCost:
    """One storage option measured on a sample of the images."""

    name: str
    bytes_per_image: float
    decode_ms: float       # decoding one stored image, one thread (what a loader pays per read)


@dataclass
class SplitResult:
    split: str
    data_path: str
    samples: int
    bytes: int
    bad: list[str] = field(default_factory=list)
    kept: bool = False     # found complete from an earlier run


@dataclass(frozen=True)
class Plan:
    """What ``write_packed`` will do: the settings (encoding resolved) and what the sample measured."""

    settings: Settings
    costs: list[OptionCost]
    samples: int           # images in all splits
    measured: int          # images measured
    reason: str            # why this encoding


def encode(image: Image.Image, encoding: str, quality: int) -> bytes:
    """An RGB image as stored: a binary PPM (raw) or a JPEG at ``quality``."""
    buffer = io.BytesIO()
    if encoding == "raw":
        image.save(buffer, format="PPM")
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def capped_rgb(data: bytes, max_size: int) -> Image.Image:
    """Encoded image bytes decoded, the shorter side capped at ``max_size``, as 8-bit RGB."""
    image, _, _ = load_capped(io.BytesIO(data), max_size)
    return to_rgb(image)


def open_splits(src: str) -> dict[str, sources.SampleSource]:
    """The sources of the splits SRC holds (format detected as the loaders do)."""
    found = {}
    for split in SPLITS:
        kind, _ = sources.detect_format(src, split)
        if kind != "folder" or os.path.isdir(os.path.join(src, split)):
            found[split] = sources.open_source(src, split)
    if not found:
        raise UserError(f"SRC {src} holds no train or val split: expected an ImageFolder root "
                        "(SRC/train/<class>/<image>), shards (SRC/train-*) or a packed dataset")
    names = [source.class_names for source in found.values()]
    if any(other != names[0] for other in names[1:]):
        raise UserError(f"SRC {src}: train and val name different classes: convert each split on its own")
    return found


def plan(splits: dict[str, sources.SampleSource], max_size: int, encoding: str, quality: int) -> Plan:
    """Measure the options on a sample of the first split's images and resolve ``--encoding auto``."""
    source = next(iter(splits.values()))
    total = sum(len(s) for s in splits.values())
    costs, measured = measure(source, max_size, quality)
    raw = next(cost for cost in costs if cost.name == "raw")
    memory = machine.memory_bytes()
    estimate = raw.bytes_per_image * total
    if encoding == "auto":
        encoding = "raw" if estimate <= CACHE_SHARE * memory else "jpeg"
        reason = (f"--encoding auto: raw ~{_size(estimate)} {'fits' if encoding == 'raw' else 'does not fit'} "
                  f"in half of this machine's {_size(memory)} of memory")
    else:
        reason = f"--encoding {encoding}"
    return Plan(Settings(max_size, encoding, quality), costs, total, measured, reason)


def measure(source: sources.SampleSource, max_size: int, quality: int) -> tuple[list[OptionCost], int]:
    """Bytes and decode time per image of each option, on up to MEASURED_SAMPLES images spread over ``source``."""
    picks = np.unique(np.linspace(0, len(source) - 1, min(MEASURED_SAMPLES, len(source))).astype(int))
    options = [("raw", "raw", quality)] + [(f"jpeg q{q}", "jpeg", q)
                                           for q in sorted({*MEASURED_QUALITIES, quality})]
    sizes = {name: 0 for name, _, _ in options} | {"SRC as stored": 0}
    times = dict.fromkeys(sizes, 0.0)
    measured = 0
    for index in picks:
        try:
            stored = source.read(int(index))
            seconds = _decode_seconds(stored)
            image = capped_rgb(stored, max_size)
        except Exception:  # noqa: BLE001 -- unreadable: the conversion lists it; the sample skips it
            continue
        sizes["SRC as stored"] += len(stored)
        times["SRC as stored"] += seconds
        for name, encoding, q in options:
            data = encode(image, encoding, q)
            sizes[name] += len(data)
            times[name] += _decode_seconds(data)
        measured += 1
    if not measured:
        raise UserError(f"{source.location}: none of the {len(picks)} images sampled to measure could be decoded")
    costs = [OptionCost(name, sizes[name] / measured, 1e3 * times[name] / measured) for name in sizes]
    return costs, measured


def _decode_seconds(data: bytes, repeats: int = 3) -> float:
    """The best of ``repeats`` full decodes of ``data`` to RGB, as the loaders decode (one thread)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        open_rgb(io.BytesIO(data))
        best = min(best, time.perf_counter() - start)
    return best


def report(result: Plan) -> list[str]:
    """The lines the converter prints at the end: each option's size and decode cost, and the choice."""
    written = "raw" if result.settings.encoding == "raw" else f"jpeg q{result.settings.quality}"
    lines = [f"measured on {result.measured} images, one thread ({machine.describe()}):",
             f"  {'option':<14} {'bytes/image':>12} {'all ' + str(result.samples) + ' images':>16} "
             f"{'decode ms/image':>16}"]
    for cost in result.costs:
        mark = "  <- written" if cost.name == written else ""
        lines.append(f"  {cost.name:<14} {cost.bytes_per_image:12,.0f} {_size(cost.bytes_per_image * result.samples):>16} "
                     f"{cost.decode_ms:16.3f}{mark}")
    lines.append(f"  ({result.reason}; raw reads are a memory copy while the page cache holds the file)")
    return lines


def write_packed(splits: dict[str, sources.SampleSource], dst: str, settings: Settings, workers: int
                 ) -> list[SplitResult]:
    """Write every split of ``splits`` in packed form into ``dst`` (see the module docstring)."""
    os.makedirs(dst, exist_ok=True)
    return [_SplitWriter(source, dst, split, settings).run(workers) for split, source in splits.items()]


def train_command(dst: str) -> str:
    """The ``main.py`` command line that trains from the packed dataset in ``dst``."""
    return f"python main.py --data-backend pytorch --arch resnet50 {dst}"


class _SplitWriter:
    def __init__(self, source: sources.SampleSource, dst: str, split: str, settings: Settings):
        self.source, self.split, self.settings = source, split, settings
        self.files = packed.paths(dst, split)
        self.recorded = {"max_size": settings.max_size, "encoding": settings.encoding,
                         "quality": settings.quality if settings.encoding == "jpeg" else None}
        self.digest = _input_digest(source)

    def run(self, workers: int) -> SplitResult:
        if packed.holds(os.path.dirname(self.files["header"]), self.split):
            return self._kept()
        parts = {name: _part(path) for name, path in self.files.items()}
        try:
            samples, size, bad = self._write_data(parts["data"], parts["index"], workers)
            self._write_header(parts, samples, size, bad)
            for name in ("data", "index", "header"):  # the header last: it marks the split complete
                os.replace(parts[name], self.files[name])
        finally:
            for part in parts.values():
                with contextlib.suppress(OSError):
                    os.unlink(part)
        return SplitResult(self.split, self.files["data"], samples, size, bad)

    def _kept(self) -> SplitResult:
        header = packed.read_header(self.files["header"])
        if {key: header.get(key) for key in self.recorded} != self.recorded or header.get("input") != self.digest:
            raise UserError(f"{self.files['header']} records a conversion of other input or with other settings: "
                            "convert into a new DST")
        kept = packed.PackedSource(os.path.dirname(self.files["header"]), self.split)  # checks lengths and CRC
        return SplitResult(self.split, self.files["data"], len(kept), header["data_bytes"], header["left_out"], True)

    def _write_data(self, data_path: str, index_path: str, workers: int) -> tuple[int, int, list[str]]:
        entries, bad, offset = [], [], 0
        job = _Encode(self.settings)
        with open(data_path, "wb") as out, multiprocessing.Pool(workers) as pool, \
                tqdm(total=len(self.source), unit="img", desc=f"{self.split} -> {os.path.basename(self.files['data'])}") as bar:
            for index, (data, height, width, error) in enumerate(pool.imap(job, _reads(self.source), chunksize=8)):
                bar.update()
                if error:
                    bad.append(self.source.name(index))
                    bar.write(f"leaving out unreadable {self.source.name(index)}: {error}", file=sys.stderr)
                    continue
                out.write(data)
                entries.append((offset, len(data), int(self.source.labels[index]), height, width,
                                google_crc32c.value(data)))
                offset += len(data)
        if not entries:
            raise UserError(f"{self.source.location}: no readable images ({len(bad)} unreadable)")
        with open(index_path, "wb") as file:
            np.save(file, np.array(entries, dtype=packed.INDEX_DTYPE), allow_pickle=False)
        return len(entries), offset, bad

    def _write_header(self, parts: dict[str, str], samples: int, size: int, bad: list[str]) -> None:
        header = {"format": packed.FORMAT_NAME, "version": packed.VERSION, "split": self.split, **self.recorded,
                  "samples": samples, "classes": list(self.source.class_names), "data_bytes": size,
                  "index_bytes": os.path.getsize(parts["index"]), "index_crc32c": packed.file_crc(parts["index"]),
                  "input": self.digest, "source": self.source.describe(),
                  "left_out": bad}
        with open(parts["header"], "w", encoding="utf-8") as file:
            json.dump(header, file, indent=1)


class _Encode:
    """``(read bytes or read error)`` -> ``(stored bytes, height, width, error)`` (a picklable pool callable)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def __call__(self, item: tuple[bytes, str]) -> tuple[bytes, int, int, str]:
        data, error = item
        if error:
            return b"", 0, 0, error
        try:
            image = capped_rgb(data, self.settings.max_size)
        except Exception as failure:  # noqa: BLE001 -- PIL plugins raise many types on malformed data
            return b"", 0, 0, " ".join(str(failure).split()) or type(failure).__name__
        return encode(image, self.settings.encoding, self.settings.quality), image.height, image.width, ""


def _reads(source: sources.SampleSource) -> Iterator[tuple[bytes, str]]:
    """Each sample's stored bytes (read in this process, in order), or why it could not be read."""
    for index in range(len(source)):
        try:
            yield source.read(index), ""
        except (OSError, sources.ShardError) as error:
            yield b"", str(error)


def _input_digest(source: sources.SampleSource) -> str:
    """A digest of what was converted: every sample's name and label, and the size and time of each input file."""
    digest = hashlib.sha256(source.describe().encode())
    for index in range(len(source)):
        digest.update(f"{source.name(index)}\t{int(source.labels[index])}\n".encode())
    files = getattr(source, "paths", None) or getattr(source, "shards", None) or [getattr(source, "data_path", "")]
    for path in files:
        with contextlib.suppress(OSError):
            stat = os.stat(path)
            digest.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _part(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.part")


def _size(count: float) -> str:
    """``count`` bytes in B, KB, MB or GB (powers of 1000)."""
    unit = 0
    while count >= 1000 and unit < 3:
        count, unit = count / 1000, unit + 1
    return f"{count:,.0f} B" if unit == 0 else f"{count:,.1f} {('KB', 'MB', 'GB')[unit - 1]}"
