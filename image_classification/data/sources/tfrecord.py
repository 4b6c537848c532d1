"""TFRecord shards in TF-slim's ImageNet layout: the ``tf.train.Example`` features, the record frame
with its masked CRC-32C, indexing a file, and reading one record's image.

The one definition of this format for both sides: the readers here and the converter
(:mod:`image_classification.data.prepare.convert`, which writes with :func:`example` and :func:`frame`).

A frame is: length (uint64 LE), masked CRC-32C of the length (uint32 LE), the serialized Example,
masked CRC-32C of the Example -- TensorFlow's ``crc32c::Mask`` (``google-crc32c`` computes the
CRC). An Example holds TF-slim's features (``build_imagenet_data.py``): ``image/encoded``,
``image/format``, ``image/filename``, ``image/height``, ``image/width``, ``image/colorspace``,
``image/channels``, ``image/class/label`` (1-based: TF-slim keeps 0 for a background class; a
reader subtracts ``tfrecord_label_base``), ``image/class/synset`` and ``image/class/text``. The
``tfrecord`` package's ``example_pb2`` parses and ``TFRecordWriter.serialize_tf_example`` writes it.
"""
from __future__ import annotations

import os
import struct

import google_crc32c

from image_classification.data.sources.base import ShardError
from image_classification.data.sources.index import ShardIndex, file_size

#: the features a reader uses
IMAGE = "image/encoded"
LABEL = "image/class/label"
SYNSET = "image/class/synset"


def example(image: bytes, *, image_format: str, filename: str, height: int, width: int, colorspace: str,
            channels: int, label: int, class_name: str) -> bytes:
    """A serialized ``tf.train.Example`` with TF-slim's features; ``label`` as stored (TF-slim: class index + 1)."""
    from tfrecord.writer import TFRecordWriter

    name = class_name.encode()
    return TFRecordWriter.serialize_tf_example({
        IMAGE: (image, "byte"),
        "image/format": (image_format.encode(), "byte"),
        "image/filename": (filename.encode(), "byte"),
        "image/height": (height, "int"),
        "image/width": (width, "int"),
        "image/colorspace": (colorspace.encode(), "byte"),
        "image/channels": (channels, "int"),
        LABEL: (label, "int"),
        SYNSET: (name, "byte"),
        "image/class/text": (name, "byte"),
    })


def frame(record: bytes) -> bytes:
    """One TFRecord frame around ``record`` (a serialized Example)."""
    length = struct.pack("<Q", len(record))
    return length + struct.pack("<I", masked_crc(length)) + record + struct.pack("<I", masked_crc(record))


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C (TensorFlow's ``crc32c::Mask``)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def index_tfrecord(path: str) -> ShardIndex:
    """Scan the local TFRecord file ``path``: one entry per record (its whole frame, so a read checks both CRCs)."""
    from tfrecord import example_pb2

    size = file_size(path)
    index = ShardIndex(format="tfrecord", shard_size=size)
    with open(path, "rb") as file:
        record = 0
        while True:
            offset = file.tell()
            header = file.read(12)
            if not header:
                break
            if len(header) < 12:
                index.skipped.append(f"truncated record {record} at byte {offset} ({size - offset} bytes ignored)")
                break
            length, length_crc = struct.unpack("<QI", header)
            if masked_crc(header[:8]) != length_crc:
                index.skipped.append(f"record {record}: length CRC mismatch at byte {offset} "
                                     f"(the remaining {size - offset} bytes ignored)")
                break
            if offset + 12 + length + 4 > size:
                index.skipped.append(f"truncated record {record} at byte {offset} ({size - offset} bytes ignored)")
                break
            data = file.read(length)
            file.seek(4, os.SEEK_CUR)  # the data CRC is checked on every read
            label, synset, problem = _label(data, example_pb2)
            if problem:
                index.skipped.append(f"record {record}: {problem}")
            else:
                index.add(offset, 12 + length + 4, label, str(record), synset)
            record += 1
    return index


def _label(data: bytes, example_pb2) -> tuple[int, str, str | None]:
    parsed = example_pb2.Example()
    try:
        parsed.ParseFromString(data)
    except Exception:  # noqa: BLE001 -- protobuf's DecodeError and friends
        return 0, "", "not a tf.train.Example"
    features = parsed.features.feature
    if IMAGE not in features or not features[IMAGE].bytes_list.value:
        return 0, "", f"no {IMAGE}"
    if LABEL not in features or not features[LABEL].int64_list.value:
        return 0, "", f"no {LABEL}"
    synset = features[SYNSET].bytes_list.value if SYNSET in features else []
    return int(features[LABEL].int64_list.value[0]), synset[0].decode("utf-8", "replace") if synset else "", None


def frame_image(framed: bytes, name: str) -> bytes:
    """``image/encoded`` of one whole TFRecord frame, after checking both of its CRCs."""
    from tfrecord import example_pb2

    length, length_crc = struct.unpack("<QI", framed[:12])
    data = framed[12:12 + length]
    if masked_crc(framed[:8]) != length_crc or len(framed) != 12 + length + 4:
        raise ShardError(f"{name}: bad record frame (length CRC mismatch)")
    (data_crc,) = struct.unpack("<I", framed[12 + length:])
    if masked_crc(data) != data_crc:
        raise ShardError(f"{name}: data CRC mismatch (the shard is damaged)")
    parsed = example_pb2.Example()
    try:
        parsed.ParseFromString(data)
        return parsed.features.feature[IMAGE].bytes_list.value[0]
    except Exception as error:  # noqa: BLE001 -- protobuf's DecodeError; no image/encoded
        raise ShardError(f"{name}: not a tf.train.Example with {IMAGE} ({error})") from None
