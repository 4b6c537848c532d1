"""WebDataset tar shards: indexing a tar by its members.

A sample is the members sharing a key (WebDataset's rule: the path up to the first dot of the file
name): ``KEY.jpg|jpeg|png|webp`` (the image) and ``KEY.cls`` (the 0-based label as text).
``tarfile`` lists the members and their data offsets; the index records each image's data bytes,
so a read is one ``pread`` of them.
"""
from __future__ import annotations

import os
import tarfile

from image_classification.data.sources.index import ShardIndex, file_size

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def index_tar(path: str) -> ShardIndex:
    """Scan the local tar ``path``: one entry per key with an image and a readable label."""
    size = file_size(path)
    index = ShardIndex(format="webdataset", shard_size=size)
    images: dict[str, tarfile.TarInfo] = {}
    labels: dict[str, tarfile.TarInfo] = {}
    order: list[str] = []
    end = 0  # where the last member's data ends
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                end = member.offset_data + member.size
                if not member.isfile():
                    continue
                key, _, extension = _split_key(member.name)
                if key not in images and key not in labels:
                    order.append(key)
                if extension.lower() in IMAGE_EXTENSIONS and key not in images:
                    images[key] = member
                elif extension == "cls":
                    labels[key] = member
    except tarfile.ReadError as error:
        if end <= size:  # (a member cut short is reported below, as its sample)
            index.skipped.append(f"unreadable tar data after byte {end} ({error}); the rest ignored")
    else:
        # tarfile ends its iteration without a word at a header it cannot read past the first
        # member (a copy cut inside a header, garbage): what follows the last member must be the
        # archive's zero end blocks, or data was lost.
        tail = -(-end // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if _holds_data(path, tail, size):
            index.skipped.append(f"unreadable tar data after byte {tail} ({size - tail} bytes ignored: a header cut "
                                 "short or damaged)")
    with open(path, "rb") as file:
        for key in order:
            image, label = images.get(key), labels.get(key)
            if image is None:
                index.skipped.append(f"{key}: no image ({'/'.join(IMAGE_EXTENSIONS)})")
                continue
            if label is None:
                index.skipped.append(f"{key}: no .cls label")
                continue
            if max(image.offset_data + image.size, label.offset_data + label.size) > size:
                index.skipped.append(f"{key}: truncated (the shard ends at byte {size})")
                continue
            text = os.pread(file.fileno(), label.size, label.offset_data)
            try:
                value = int(text.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                index.skipped.append(f"{key}.cls is not an integer: {text[:20]!r}")
                continue
            index.add(image.offset_data, image.size, value, key)
    return index


def _holds_data(path: str, start: int, stop: int, chunk: int = 1 << 20) -> bool:
    """Whether bytes ``start..stop`` of ``path`` are anything but zeros."""
    with open(path, "rb") as file:
        file.seek(start)
        while start < stop:
            block = file.read(min(chunk, stop - start))
            if not block:
                return False
            if block.count(0) != len(block):
                return True
            start += len(block)
    return False


def _split_key(name: str) -> tuple[str, str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), dot, extension
