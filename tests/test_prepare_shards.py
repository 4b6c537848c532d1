"""python -m image_classification.data.prepare --to webdataset|tfrecord: ImageFolder -> shards."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from image_classification.data import sources
from image_classification.data.prepare import convert
from image_classification.data.prepare import cli as prepare
from image_classification.data.sources.index import INDEX_SUFFIX, read_index
from image_classification.data.sources.shards import CLASSES_FILE
from tests.helpers.tiny_data import write_imagefolder


@pytest.fixture
def folder(tmp_path):
    """2 classes x (12 train, 3 val) noise JPEGs of 40 px, plus a BMP, a large JPEG and an undecodable file."""
    src = write_imagefolder(tmp_path / "src", train_per_class=12, val_per_class=3, size=40)
    Image.fromarray(np.full((30, 20, 3), 200, np.uint8)).save(src / "train" / "dog" / "plain.bmp")
    big = np.random.default_rng(1).integers(0, 256, (120, 90, 3), dtype=np.uint8)
    Image.fromarray(big).save(src / "train" / "cat" / "big.jpg")
    (src / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    return src


def convert_to(*argv) -> int:
    return prepare.main(["-j", "1", *map(str, argv)])


def source_samples(src, split) -> dict[str, tuple[bytes, int]]:
    """``{name: (file bytes, class index)}`` of the decodable images of a split, as the shards should hold."""
    classes = sorted(os.listdir(src / "train"))
    found = {}
    for label, name in enumerate(classes):
        for path in sorted((src / split / name).iterdir()):
            if path.name != "broken.jpg":
                found[f"{name}/{path.stem}"] = (path.read_bytes(), label)
    return found


def shard_files(dst) -> list[str]:
    return sorted(name for name in os.listdir(dst) if not name.endswith(INDEX_SUFFIX)
                  and not name.startswith(".") and name != CLASSES_FILE)


def test_webdataset_round_trip(folder, tmp_path, capsys):
    dst = tmp_path / "wds"
    assert convert_to("--to", "webdataset", "--shard-samples", 10, folder, dst) == 0
    out, err = capsys.readouterr()
    assert shard_files(dst) == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    assert (dst / "classes.txt").read_text() == "cat\ndog\n"
    assert "train: 26 images in 3 shard(s): train-000000.tar ... train-000002.tar" in out
    assert f"python main.py --data-format webdataset --arch resnet50 {dst}" in out
    assert f"leaving out unreadable {folder / 'train/cat/broken.jpg'}" in err
    assert "warning: 1 unreadable train image(s) left out: cat/broken.jpg" in err
    for split in ("train", "val"):
        source = sources.open_source(str(dst), split)  # reads the index files prepare wrote
        assert source.kind == "webdataset" and source.class_names == ["cat", "dog"]
        expected = source_samples(folder, split)
        stored = {source.keys[i]: (source.read(i), int(source.labels[i])) for i in range(len(source))}
        assert sorted(stored) == sorted(expected)
        bmp = stored.pop("dog/plain", None)
        assert stored == {key: value for key, value in expected.items() if key != "dog/plain"}
        if split == "train":  # BMP is stored as PNG with the same pixels
            assert bmp[1] == 1 and bmp[0].startswith(b"\x89PNG")
            assert (np.asarray(Image.open(folder / "train/dog/plain.bmp")) ==
                    np.asarray(Image.open(__import__("io").BytesIO(bmp[0])))).all()
    counts = [len(read_index(str(dst / f"train-00000{k}.tar{INDEX_SUFFIX}")).keys) for k in range(3)]
    assert counts == [10, 10, 6]
    labels = [int(x) for x in sources.open_source(str(dst), "train").labels[:10]]
    assert 0 < sum(labels) < 10  # training samples are shuffled across classes


def test_webdataset_library_reads_the_tars(folder, tmp_path):
    import webdataset
    dst = tmp_path / "wds"
    assert convert_to("--to", "webdataset", "--shard-samples", 100, folder, dst) == 0
    samples = list(webdataset.WebDataset(str(dst / "val-000000.tar"), shardshuffle=False))
    assert [(s["__key__"], int(s["cls"])) for s in samples] == [
        ("cat/0", 0), ("cat/1", 0), ("cat/2", 0), ("dog/0", 1), ("dog/1", 1), ("dog/2", 1)]
    assert samples[0]["jpg"] == (folder / "val/cat/0.jpg").read_bytes()


def test_tfrecord_shards_follow_tf_slim(folder, tmp_path, capsys):
    import tfrecord
    dst = tmp_path / "tfr"
    assert convert_to("--to", "tfrecord", "--shard-samples", 10, "--max-size", 60, folder, dst) == 0
    assert shard_files(dst) == ["train-00000-of-00003", "train-00001-of-00003", "train-00002-of-00003",
                                "validation-00000-of-00001"]
    assert "python main.py --data-format tfrecord --arch resnet50" in capsys.readouterr().out
    expected = source_samples(folder, "val")
    records = list(tfrecord.tfrecord_loader(str(dst / "validation-00000-of-00001"), None))
    assert len(records) == 6
    for record in records:
        synset = record["image/class/synset"].decode()
        key = f"{synset}/{os.path.splitext(record['image/filename'].decode())[0]}"
        data, label = expected[key]
        assert record["image/encoded"] == data
        assert int(record["image/class/label"][0]) == label + 1  # TF-slim: 0 is the background class
        assert record["image/class/text"].decode() == synset
        assert record["image/format"].decode() == "JPEG" and record["image/colorspace"].decode() == "RGB"
        assert (int(record["image/height"][0]), int(record["image/width"][0]), int(record["image/channels"][0])) == \
            (40, 40, 3)
    # --max-size resized the 120x90 training image on the way (shorter side 60)
    train = sources.open_source(str(dst), "train")
    sizes = {Image.open(__import__("io").BytesIO(train.read(i))).size for i in range(len(train))}
    assert (60, 80) in sizes and max(min(size) for size in sizes) == 60
    assert [int(x) for x in sorted(train.labels)] == [0] * 13 + [1] * 13


@pytest.mark.parametrize("data_format", ["webdataset", "tfrecord"])
def test_shard_size_is_respected(folder, tmp_path, data_format):
    dst = tmp_path / data_format
    limit = 24_000  # bytes; a 40 px noise JPEG is about 2.4 kB
    assert convert_to("--to", data_format, "--shard-size", limit / 1e6, folder, dst) == 0
    train = [name for name in shard_files(dst) if name.startswith("train-")]
    sizes = [os.path.getsize(dst / name) for name in train]
    assert len(train) >= 3 and max(sizes) <= limit
    if data_format == "tfrecord":  # index sizes are whole frames: the next shard's first one did not fit
        firsts = [read_index(str(dst / (name + INDEX_SUFFIX))).sizes[0] for name in train]
        assert all(size + first > limit for size, first in zip(sizes[:-1], firsts[1:]))


@pytest.mark.parametrize("data_format, kept_name", [("tfrecord", "train-00001-of-00007"),
                                                    ("webdataset", "train-000001.tar")])
def test_an_interrupted_conversion_resumes_to_the_same_bytes(folder, tmp_path, capsys, data_format, kept_name):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    argv = ("--to", data_format, "--shard-samples", 4)
    assert convert_to(*argv, folder, whole) == 0

    def interrupted_after_three(split: str, shards: int) -> None:
        if shards == 3:
            raise KeyboardInterrupt

    settings = convert.Settings(data_format, shard_bytes=None, shard_samples=4, max_size=None, quality=90)  # = argv's
    with pytest.raises(KeyboardInterrupt):
        convert.write_shards(str(folder), str(resumed), settings, workers=1, on_shard=interrupted_after_three)
    left = sorted(os.listdir(resumed))
    assert left == [".prepare-train.json", ".train-000000.done", ".train-000001.done", ".train-000002.done",
                    "classes.txt"]  # no part file, nothing under a real shard name yet
    kept = os.stat(resumed / ".train-000001.done").st_ino
    capsys.readouterr()
    assert convert_to(*argv, folder, resumed) == 0
    assert "train: 26 images in 7 shard(s) (3 kept from an earlier run)" in capsys.readouterr().out
    assert os.stat(resumed / kept_name).st_ino == kept  # renamed, not rewritten
    assert sorted(os.listdir(resumed)) == sorted(os.listdir(whole))
    for name in os.listdir(whole):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name


def test_a_finished_conversion_is_kept_and_foreign_shards_are_refused(folder, tmp_path, capsys):
    dst = tmp_path / "wds"
    assert convert_to("--to", "webdataset", "--shard-samples", 10, folder, dst) == 0
    stamps = {name: os.stat(dst / name).st_mtime_ns for name in os.listdir(dst) if not name.startswith(".")}
    capsys.readouterr()
    assert convert_to("--to", "webdataset", "--shard-samples", 10, folder, dst) == 0
    assert "train: 26 images in 3 shard(s) (3 kept from an earlier run)" in capsys.readouterr().out
    assert stamps == {name: os.stat(dst / name).st_mtime_ns for name in os.listdir(dst) if not name.startswith(".")}
    assert convert_to("--to", "webdataset", "--shard-samples", 5, folder, dst) == 2  # other settings
    assert "holds a conversion of train/ from other input or settings" in capsys.readouterr().err

    other = tmp_path / "other"
    other.mkdir()
    (other / "train-000000.tar").write_bytes(b"someone else's")
    assert convert_to("--to", "webdataset", folder, other) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {other} already holds train shards this tool did not record (train-000000.tar)")
    assert len(err.strip().splitlines()) == 1
    assert (other / "train-000000.tar").read_bytes() == b"someone else's"


@pytest.mark.parametrize("argv, message", [
    (["--shard-samples", "3", "{src}", "{dst}"], "error: --max-size is required"),
    (["--max-size", "64", "--shard-size", "1", "{src}", "{dst}"], "error: --shard-size and --shard-samples need --to"),
    (["--to", "tfrecord", "--shard-samples", "0", "{src}", "{dst}"], "error: --shard-samples must be >= 1, got 0"),
    (["--to", "tfrecord", "--shard-size", "0", "{src}", "{dst}"], "error: --shard-size must be > 0 MB, got 0"),
    (["--to", "tfrecord", "{src}/train", "{dst}"], "has neither train/ nor val/"),
])
def test_bad_shard_options_are_one_line(folder, tmp_path, capsys, argv, message):
    dst = tmp_path / "dst"
    assert prepare.main([a.format(src=folder, dst=dst) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_webdataset_keys_end_at_no_dot_and_stay_unique():
    assert convert._keys(["cat/0.jpg", "cat/0.png", "cat/x.v2.jpg", "dog/sub/0.jpg"]) == {
        "cat/0.jpg": "cat/0_jpg", "cat/0.png": "cat/0_png", "cat/x.v2.jpg": "cat/x_v2", "dog/sub/0.jpg": "dog/sub/0"}
