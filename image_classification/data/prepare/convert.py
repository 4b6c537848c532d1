"""ImageFolder -> shards: ``python -m image_classification.data.prepare --to webdataset|tfrecord SRC DST``.

Writes each split of the ImageFolder ``SRC`` (``train/``, ``val/``) as shards in ``DST``:

* ``webdataset``: ``train-000000.tar`` ... / ``val-000000.tar`` ..., members ``KEY.<ext>`` (the
  image bytes) and ``KEY.cls`` (the 0-based class index as text); ``KEY`` is the image's path under
  its split without extension (``n01440764/n01440764_10026``), dots made ``_`` (WebDataset splits
  a member name at its first dot);
* ``tfrecord``: TF-slim's ``build_imagenet_data.py`` layout, ``train-00000-of-00008`` ... /
  ``validation-00000-of-00002``, one ``tf.train.Example`` a record with TF-slim's features
  (:mod:`image_classification.data.sources.tfrecord`, which owns them and the record frame for
  both the reader and this writer): ``image/class/label`` is the class index + 1, as TF-slim
  stores it (0 is its background class), ``image/class/synset`` and ``image/class/text`` the class
  folder name;

plus ``classes.txt`` (line k = class k) and each shard's index file (written with
:func:`image_classification.data.sources.index.write_index`, the one owner of that format).

Every image is decoded once, in ``--workers`` processes, to check it; one that does not decode is
listed and left out. JPEG, PNG and WebP bytes are stored unchanged unless ``--max-size`` resizes
them (:mod:`~image_classification.data.prepare.resize`, the same rule as the copy mode); other formats
(BMP, TIFF, GIF, ...) are stored as PNG, since the shard readers decode only those three.
Training samples are shuffled once with a fixed seed (as TF-slim does), so a shard holds a mix of
classes and a loader's shuffle within a window of shards is a good shuffle; validation keeps the
folder order.

A shard closes before the sample that would take it over ``--shard-size`` MB (a single larger
sample gets a shard of its own) or when it holds ``--shard-samples`` samples.

Resumable and deterministic: a shard is written to a hidden ``.<name>.part``, renamed to a hidden
``.<name>.done`` when complete, and recorded in ``DST/.prepare-<split>.json`` (the settings, a
digest of the input listing, and each shard's sample range and size). A restart with the same
input and settings keeps the recorded shards and rewrites the rest; the same input always gives
the same bytes (fixed shuffle seed, fixed tar metadata). The shards get their real names only
when the whole split is written (TFRecord names hold the shard count), so an interrupted
conversion never looks like a dataset. DST files this tool did not record are never overwritten:
a DST with unrecorded shards of a split is an error.

The libraries write the bytes: ``webdataset.TarWriter`` the tar members (with fixed metadata), and
``tfrecord``'s ``TFRecordWriter.serialize_tf_example`` the Example (through
:func:`~image_classification.data.sources.tfrecord.example`; its frame is
:func:`~image_classification.data.sources.tfrecord.frame`, with the reader's masked CRC-32C).
Not ``webdataset.ShardWriter``: it names shards itself, writes them under their final names, and
closes a shard only once it has passed the size limit; nor ``TFRecordWriter.write``: it opens a path
of its own and cannot say a record's size before writing it, which the size limit needs.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from tqdm import tqdm

from image_classification.data.prepare.resize import load_capped, save_image
from image_classification.data.sources import tfrecord
from image_classification.data.sources.folder import SPLITS, scan_split
from image_classification.data.sources.index import index_name, read_index, write_index
from image_classification.data.sources.shards import CLASSES_FILE, SPLIT_PREFIXES, build_index
from image_classification.errors import UserError

FORMATS = ("webdataset", "tfrecord")
DEFAULT_SHARD_MB = 256
SHUFFLE_SEED = 0
_KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # what every shard reader decodes
_PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")
_TAR_BLOCK, _TAR_RECORD = 512, 10240  # tarfile pads each member to a block and the archive to a record
_MANIFEST_VERSION = 1
_SHOWN = 5


@dataclass(frozen=True)
class Settings:
    """What decides a shard's bytes; recorded, and compared on a restart."""

    format: str
    shard_bytes: int | None
    shard_samples: int | None
    max_size: int | None
    quality: int


@dataclass(frozen=True)
class Sample:
    """One decoded and checked image, ready to store (``data`` empty when it did not decode)."""

    rel: str           # path under the split folder
    label: int         # 0-based class index
    data: bytes = b""
    extension: str = ""
    width: int = 0
    height: int = 0
    channels: int = 0
    colorspace: str = ""
    error: str = ""


@dataclass
class SplitResult:
    split: str
    shards: list[str]
    samples: int
    bad: list[str] = field(default_factory=list)
    kept: int = 0      # shards found complete from an earlier run


def write_shards(src: str, dst: str, settings: Settings, workers: int,
                 on_shard: Callable[[str, int], None] | None = None) -> list[SplitResult]:
    """Convert every split of the ImageFolder ``src`` into shards in ``dst`` (see the module docstring).
    ``on_shard(split, shards)`` runs each time a shard is finished and recorded (``shards`` of the
    split so far): an interruption from there on leaves them to the next run."""
    splits = [split for split in SPLITS if os.path.isdir(os.path.join(src, split))]
    if not splits:
        raise UserError(f"SRC {src} has neither train/ nor val/: "
                        "expected an ImageFolder root (SRC/train/<class>/<image>)")
    scans = {split: scan_split(src, split) for split in splits}  # checks the class folders of both
    class_names = scans[splits[0]].class_names
    os.makedirs(dst, exist_ok=True)
    _write_classes(os.path.join(dst, CLASSES_FILE), class_names)
    return [_SplitWriter(src, dst, split, scans[split], class_names, settings, on_shard).run(workers)
            for split in splits]


def train_command(dst: str, data_format: str) -> str:
    """The ``main.py`` command line that trains from the shards in ``dst``."""
    return f"python main.py --data-format {data_format} --arch resnet50 {dst}"


class _SplitWriter:
    def __init__(self, src: str, dst: str, split: str, scan, class_names: list[str], settings: Settings,
                 on_shard: Callable[[str, int], None] | None = None):
        self.dst, self.split, self.settings, self.class_names = dst, split, settings, class_names
        self.on_shard = on_shard or (lambda split, shards: None)
        self.root = os.path.join(src, split)
        self.prefix = SPLIT_PREFIXES[settings.format][split][0]
        samples = [(os.path.relpath(path, self.root), label) for path, label in scan.samples]
        if split == "train":
            random.Random(SHUFFLE_SEED).shuffle(samples)
        self.samples = samples
        self.keys = _keys([rel for rel, _ in samples]) if settings.format == "webdataset" else {}
        self.manifest_path = os.path.join(dst, f".prepare-{split}.json")
        self.digest = _digest(self.root, samples)

    def run(self, workers: int) -> SplitResult:
        shards = self._recorded_shards()
        kept = len(shards)
        start = shards[-1]["end"] if shards else 0
        if start < len(self.samples):
            self._write_from(start, shards, workers)
        if not shards:
            raise UserError(f"{self.root}: no readable images ({len(self.samples)} unreadable)")
        names = self._publish(shards)
        bad = [rel for shard in shards for rel in shard["bad"]]
        return SplitResult(self.split, names, sum(shard["samples"] for shard in shards), bad, kept)

    def _write_from(self, start: int, shards: list[dict], workers: int) -> None:
        """Decode samples ``start``... in order and write them into shards, appended to ``shards``."""
        encode = _Encode(self.root, self.settings.max_size, self.settings.quality)
        shard: _OpenShard | None = None
        bad: list[str] = []  # unreadable since the last shard was finished
        try:
            with multiprocessing.Pool(workers) as pool, tqdm(total=len(self.samples), initial=start, unit="img",
                                                             desc=f"{self.split} -> {self.prefix}*") as bar:
                for position, sample in enumerate(pool.imap(encode, self.samples[start:], chunksize=8), start):
                    bar.update()
                    if sample.error:
                        bad.append(sample.rel)
                        bar.write(f"leaving out unreadable {os.path.join(self.root, sample.rel)}: {sample.error}",
                                  file=sys.stderr)
                        continue
                    record = self._record(sample)
                    if shard is not None and shard.full(record):
                        self._finish(shard, shards, end=position, bad=bad)
                        shard, bad = None, []
                        self.on_shard(self.split, len(shards))
                    if shard is None:
                        shard = _OpenShard(self.settings, self._hidden(len(shards), "part"), start=position)
                    shard.add(record)
            if shard is not None:
                self._finish(shard, shards, end=len(self.samples), bad=bad)
                shard = None
                self.on_shard(self.split, len(shards))
            elif shards:  # only unreadable images after the last shard's last sample
                shards[-1]["bad"].extend(bad)
                shards[-1]["end"] = len(self.samples)
                self._save_manifest(shards, complete=False)
        finally:
            if shard is not None:  # interrupted: the part file is ours and incomplete
                shard.discard()

    # -- one record
    def _record(self, sample: Sample):
        """What the shard stores for ``sample``: a tar member dict, or a serialized tf.train.Example."""
        if self.settings.format == "webdataset":
            return {"__key__": self.keys[sample.rel], sample.extension: sample.data, "cls": str(sample.label).encode()}
        image_format = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[sample.extension]
        return tfrecord.example(sample.data, image_format=image_format,
                                filename=os.path.basename(sample.rel), height=sample.height, width=sample.width,
                                colorspace=sample.colorspace, channels=sample.channels,
                                label=sample.label + 1,  # TF-slim: 0 is the background class
                                class_name=self.class_names[sample.label])

    # -- shard files and the manifest
    def _hidden(self, number: int, state: str) -> str:
        return os.path.join(self.dst, f".{self.prefix}{number:06d}.{state}")

    def _final(self, number: int, count: int) -> str:
        if self.settings.format == "webdataset":
            return os.path.join(self.dst, f"{self.prefix}{number:06d}.tar")
        return os.path.join(self.dst, f"{self.prefix}{number:05d}-of-{count:05d}")  # TF-slim's naming

    def _finish(self, shard: _OpenShard, shards: list[dict], end: int, bad: list[str]) -> None:
        """Close ``shard``, give it its hidden done name and record it (after ``shards``) in the manifest."""
        size = shard.close()
        os.replace(shard.path, self._hidden(len(shards), "done"))
        shards.append({"start": shard.start, "end": end, "samples": shard.count, "bytes": size, "bad": list(bad)})
        self._save_manifest(shards, complete=False)

    def _publish(self, shards: list[dict]) -> list[str]:
        """Give every shard its real name and an index file; record the split as complete."""
        names = []
        for number in range(len(shards)):
            final = self._final(number, len(shards))
            if os.path.exists(self._hidden(number, "done")):
                os.replace(self._hidden(number, "done"), final)
            index_path = os.path.join(self.dst, index_name(final))
            index = read_index(index_path)
            if index is None or index.shard_size != shards[number]["bytes"]:  # written by an earlier run
                write_index(index_path, build_index(final, self.settings.format))
            names.append(final)
        self._save_manifest(shards, complete=True)
        return names

    def _recorded_shards(self) -> list[dict]:
        """The shards an earlier run completed and that are still intact, in order (else none)."""
        if not os.path.exists(self.manifest_path):
            self._refuse_unrecorded()
            return []
        manifest = self._load_manifest()
        if manifest.get("settings") != _settings_dict(self.settings) or manifest.get("input") != self.digest:
            raise UserError(f"{self.dst} holds a conversion of {self.split}/ from other input or settings "
                            f"(see {self.manifest_path}): convert into a new DST")
        kept = []
        count = len(manifest["shards"])
        for number, entry in enumerate(manifest["shards"]):
            candidates = (self._hidden(number, "done"), self._final(number, count))
            if not any(_size(path) == entry["bytes"] for path in candidates):
                break
            kept.append(entry)
        return kept

    def _refuse_unrecorded(self) -> None:
        pattern = re.compile(rf"^\.?{re.escape(self.prefix)}\d")
        found = sorted(name for name in os.listdir(self.dst) if pattern.match(name))
        if found:
            raise UserError(f"{self.dst} already holds {self.split} shards this tool did not record "
                            f"({', '.join(found[:_SHOWN])}): convert into a new or empty DST")

    def _load_manifest(self) -> dict:
        try:
            with open(self.manifest_path, encoding="utf-8") as file:
                manifest = json.load(file)
            if manifest.get("version") != _MANIFEST_VERSION:
                raise ValueError(f"version {manifest.get('version')}")
            return manifest
        except (OSError, ValueError) as error:
            raise UserError(f"{self.manifest_path}: unreadable ({error}); convert into a new DST") from None

    def _save_manifest(self, shards: list[dict], complete: bool) -> None:
        manifest = {"version": _MANIFEST_VERSION, "split": self.split, "settings": _settings_dict(self.settings),
                    "input": self.digest, "complete": complete, "shards": shards}
        part = self.manifest_path + ".part"
        with open(part, "w", encoding="utf-8") as file:
            json.dump(manifest, file, indent=1)
        os.replace(part, self.manifest_path)


class _OpenShard:
    """A shard being written under its ``.part`` name, and the size it will have when closed."""

    def __init__(self, settings: Settings, path: str, start: int):
        self.settings, self.path, self.start = settings, path, start
        self.count, self.size = 0, 0
        self.file = open(path, "wb")
        if settings.format == "webdataset":
            from webdataset import TarWriter
            # Fixed metadata (mtime 0, owner, mode): the same samples always give the same bytes.
            self.writer = TarWriter(self.file, mtime=0, user="convnets", group="convnets", mode=0o444)

    def full(self, record) -> bool:
        """Whether adding ``record`` must start a new shard instead."""
        limit_samples, limit_bytes = self.settings.shard_samples, self.settings.shard_bytes
        if limit_samples is not None and self.count >= limit_samples:
            return True
        return limit_bytes is not None and self._closed_size(self.size + self._cost(record)) > limit_bytes

    def add(self, record) -> None:
        if self.settings.format == "webdataset":
            self.writer.write(record)
        else:
            self.file.write(tfrecord.frame(record))
        self.size += self._cost(record)
        self.count += 1

    def discard(self) -> None:
        self._close_file()
        os.remove(self.path)

    def close(self) -> int:
        self._close_file()
        size = os.path.getsize(self.path)
        if size != self._closed_size(self.size):
            raise AssertionError(f"{self.path}: {size} bytes, expected {self._closed_size(self.size)}")
        return size

    def _close_file(self) -> None:
        if self.settings.format == "webdataset":
            self.writer.close()  # ends the archive, then closes the file
        else:
            self.file.close()

    def _cost(self, record) -> int:
        if self.settings.format == "tfrecord":
            return len(record) + 16  # length, length CRC, data, data CRC
        total = 0
        for name, value in record.items():
            if not name.startswith("_"):
                member = f"{record['__key__']}.{name}".encode()
                # a name over 100 bytes (or non-ASCII) adds a PAX header block and its data blocks
                extended = 0 if len(member) <= 100 and member.isascii() else _TAR_BLOCK + _blocks(len(member) + 64)
                total += extended + _TAR_BLOCK + _blocks(len(value))
        return total

    def _closed_size(self, size: int) -> int:
        if self.settings.format == "tfrecord":
            return size
        return -(-(size + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD  # end blocks, then record padding


class _Encode:
    """``(rel, label)`` -> :class:`Sample`: decode (and resize) one image (a picklable pool callable)."""

    def __init__(self, root: str, max_size: int | None, quality: int):
        self.root, self.max_size, self.quality = root, max_size, quality

    def __call__(self, item: tuple[str, int]) -> Sample:
        rel, label = item
        path = os.path.join(self.root, rel)
        try:
            image, image_format, resized = load_capped(path, self.max_size)
        except Exception as error:  # noqa: BLE001 -- PIL plugins raise many types on malformed data
            return Sample(rel, label, error=" ".join(str(error).split()) or type(error).__name__)
        extension = _KEPT_FORMATS.get(image_format)
        if extension and not resized:
            with open(path, "rb") as file:
                data = file.read()
        else:
            if not extension:  # stored as PNG: lossless, and every shard reader decodes it
                extension, image_format = "png", "PNG"
                if image.mode not in _PNG_MODES:
                    image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
            buffer = io.BytesIO()
            save_image(image, image_format, buffer, self.quality)
            data = buffer.getvalue()
        bands = image.getbands()
        colorspace = "CMYK" if image.mode == "CMYK" else "RGB" if len(bands) >= 3 else "Grayscale"
        return Sample(rel, label, data, extension, image.width, image.height, len(bands), colorspace)


def _keys(rels: list[str]) -> dict[str, str]:
    """WebDataset keys: the path under the split without extension, dots made ``_`` (a key ends at the
    first dot of a member name); where two files differ only by extension, their extensions are kept too."""
    stems = {rel: os.path.splitext(rel)[0].replace(os.sep, "/").replace(".", "_") for rel in rels}
    taken = Counter(stems.values())
    return {rel: stem if taken[stem] == 1 else rel.replace(os.sep, "/").replace(".", "_")
            for rel, stem in stems.items()}


def _blocks(size: int) -> int:
    return -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _settings_dict(settings: Settings) -> dict:
    return {"format": settings.format, "shard_bytes": settings.shard_bytes, "shard_samples": settings.shard_samples,
            "max_size": settings.max_size, "quality": settings.quality}


def _digest(root: str, samples: list[tuple[str, int]]) -> str:
    """A digest of the input listing: path, label, size and modification time of every sample, in order."""
    digest = hashlib.sha256()
    for rel, label in samples:
        stat = os.stat(os.path.join(root, rel))
        digest.update(f"{rel}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _write_classes(path: str, class_names: list[str]) -> None:
    text = "".join(f"{name}\n" for name in class_names)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            if file.read() == text:
                return
        raise UserError(f"{path} already lists other classes than SRC's: convert into a new DST")
    part = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.part")
    with open(part, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(part, path)
