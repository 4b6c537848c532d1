"""Sharded datasets (issue 17): TF-slim TFRecord files and WebDataset tar shards, on every backend.

The TFRecord fixture (``tests/data/tfslim_digits``, a copy of ``../shared/data/tfslim_digits``)
was written by TensorFlow's own ``tf.io.TFRecordWriter``; WebDataset shards are written here by
``webdataset.TarWriter`` -- library writers, so the reader is never checked against itself.
"""
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
from torch import nn
from PIL import Image
from tfrecord.reader import tfrecord_loader

from image_classification import cli
from image_classification.checkpoints.files import read_pth
from image_classification.data import registry, sources
from image_classification.data.contract import EpochProgress, LoaderConfig
from image_classification.data.loaders import sampling
from image_classification.errors import UserError
from tests.helpers.faults import sigterm_at_step
from tests.helpers.net import free_port
from tests.helpers.registered import model_for_module

REPO = Path(__file__).resolve().parents[1]
TFSLIM = REPO / "tests" / "data" / "tfslim_digits"
DRIVER = REPO / "tests" / "helpers" / "run_main.py"
TF_TRAIN = sorted(str(p) for p in TFSLIM.glob("train-*"))

try:
    import nvidia.dali  # noqa: F401
    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False
requires_dali = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed")


# ---------------------------------------------------------------- helpers

def config(data_dir, tmp_path, **overrides) -> LoaderConfig:
    base = dict(data_dir=str(data_dir) if data_dir else None, image_size=16, val_resize_size=16, batch_size=4,
                workers=0, prefetch=2, interpolation="bilinear", augmentation="none",
                memory_format=torch.contiguous_format, device=torch.device("cpu"), seed=3,
                index_dir=str(tmp_path / "idx"), cache_dir=str(tmp_path / "cache"))
    base.update(overrides)
    return LoaderConfig(**base)


def tf_records(path: str) -> list[dict]:
    """The records of a TFRecord file, read by the ``tfrecord`` package's own reader."""
    return list(tfrecord_loader(path, None, {"image/encoded": "byte", "image/class/label": "int",
                                             "image/class/synset": "byte"}))


def jpeg(value: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(value)
    pixels = np.clip(rng.normal(value, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_wds(root: Path, prefix: str, samples: list[tuple[bytes, int]], per_shard: int,
              extension: str = "jpg", first: int = 0) -> list[str]:
    """``samples`` (image bytes, label) as WebDataset shards written by ``webdataset.TarWriter``."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(samples), per_shard)):
        path = root / f"{prefix}-{shard:06d}.tar"
        with webdataset.TarWriter(str(path)) as sink:
            for i, (data, label) in enumerate(samples[start:start + per_shard], first + start):
                sink.write({"__key__": f"sample{i:06d}", extension: data, "cls": label})
        paths.append(str(path))
    return paths


def wds_from_tfslim(root: Path, per_shard: int = 16) -> Path:
    """The TF-slim fixture's images and labels (0-based) as WebDataset shards."""
    for prefix, pattern in (("train", "train-*"), ("val", "validation-*")):
        samples = [(bytes(r["image/encoded"]), int(r["image/class/label"][0]) - 1)
                   for path in sorted(TFSLIM.glob(pattern)) for r in tf_records(str(path))]
        write_wds(root, prefix, samples, per_shard)
    return root


def batches(loader, epoch=0, start_batch=0):
    loader.set_epoch(epoch, EpochProgress.after_batches(start_batch, batch_size=loader.sampler.batch_size,
                                                        world_size=loader.sampler.world_size))
    return list(loader)


# ---------------------------------------------------------------- TFRecord: TF-slim layout

def test_tfslim_records_written_by_tensorflow_are_read_as_the_tfslim_layout(tmp_path):
    idx = tmp_path / "idx"
    before = sorted(os.listdir(TFSLIM))
    source = sources.open_source(str(TFSLIM), "train", index_dir=str(idx))
    expected = [r for path in TF_TRAIN for r in tf_records(path)]
    assert source.kind == "tfrecord" and len(source) == len(expected) == 80
    assert source.shards == TF_TRAIN
    # image/class/label is 1-based (0 = background): with the default base 1, label = digit
    assert source.labels.tolist() == [int(r["image/class/label"][0]) - 1 for r in expected]
    assert sorted(set(source.labels.tolist())) == list(range(10)) and source.num_classes == 10
    assert source.class_names == [f"d{k}" for k in range(10)]  # image/class/synset
    for i in (0, 39, 40, 79):  # first and last record of both shards
        assert source.read(i) == bytes(expected[i]["image/encoded"])
        assert source.read(i)[:3] == b"\xff\xd8\xff"  # a JPEG
    assert source.name(41) == f"{TF_TRAIN[1]} record 1"
    # index files went to --data-idx-dir, none next to the (read-only) fixture
    assert sorted(os.listdir(idx)) == sorted(Path(p).name + ".samples.tsv" for p in TF_TRAIN)
    assert sorted(os.listdir(TFSLIM)) == before
    index_file = idx / (Path(TF_TRAIN[0]).name + ".samples.tsv")
    header = index_file.read_text().splitlines()[0]
    assert header == f"# convnets-index 1 tfrecord {os.path.getsize(TF_TRAIN[0])}"
    umask = os.umask(0o022)
    os.umask(umask)
    assert index_file.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600: others may serve it


def test_an_existing_index_is_used_and_a_stale_one_rebuilt(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(TFSLIM, data)
    idx = tmp_path / "idx"
    sources.open_source(str(data), "val", index_dir=str(idx))
    index_file = idx / "validation-00000-of-00001.samples.tsv"
    lines = index_file.read_text().splitlines()
    # a hand-edited index (label column) is trusted while the shard size matches ...
    lines[1] = "\t".join(lines[1].split("\t")[:2] + ["10"] + lines[1].split("\t")[3:])
    index_file.write_text("\n".join(lines) + "\n")
    assert sources.open_source(str(data), "val", index_dir=str(idx)).labels[0] == 9
    # ... and rebuilt when the shard changed size (records appended)
    shard = data / "validation-00000-of-00001"
    shard.write_bytes(shard.read_bytes() + (data / "train-00000-of-00002").read_bytes())
    edited = index_file.read_text()
    source = sources.open_source(str(data), "val", index_dir=str(idx), cache_dir=str(tmp_path / "cache"))
    assert len(source) == 70 and source.labels[0] == 4  # record 0's own label again
    # the stale file is left as it was (not this run's); the new index went to the cache
    assert index_file.read_text() == edited
    assert [p.name.split("-", 1)[1] for p in (tmp_path / "cache" / "index").iterdir()] == [index_file.name]


def test_an_evicted_shard_copy_is_fetched_again(tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(TFSLIM, data)
    source = sources.open_source(str(data), "val", index_dir=str(tmp_path / "idx"))
    first = source.read(0)
    refetched = tmp_path / "refetched"
    shutil.copy(data / "validation-00000-of-00001", refetched)
    (data / "validation-00000-of-00001").unlink()  # as a shard cache evicting its copy
    monkeypatch.setattr(sources.remote, "local_copy", lambda location, cache_dir=None: str(refetched))
    assert source.read(0) == first


def test_label_base_and_num_classes(tmp_path):
    idx = str(tmp_path / "idx")
    stored = [int(r["image/class/label"][0]) for path in TF_TRAIN for r in tf_records(path)]
    # TF-slim's 1001 classes: keep the background class 0 and label as stored
    source = sources.open_source(str(TFSLIM), "train", index_dir=idx, tfrecord_label_base=0, num_classes=11)
    assert source.labels.tolist() == stored and source.num_classes == 11
    assert source.class_names[0] == "0" and source.class_names[1] == "d0"
    # a label outside the classes is one line naming the shard and the record
    with pytest.raises(UserError) as error:
        sources.open_source(str(TFSLIM), "train", index_dir=idx, tfrecord_label_base=0, num_classes=10)
    first = next(i for i, label in enumerate(stored) if label == 10)
    message = str(error.value)
    assert "\n" not in message and f"{TF_TRAIN[0]} record {first}: label 10" in message
    assert "--tfrecord-label-base" in message and "outside 0..9" in message
    with pytest.raises(UserError, match=r"label 1 minus --tfrecord-label-base 2 = -1 is outside"):
        sources.open_source(str(TFSLIM), "train", index_dir=idx, tfrecord_label_base=2)


# ---------------------------------------------------------------- WebDataset

def test_webdataset_shards_written_by_the_library_are_read_back(tmp_path):
    samples = [(jpeg(10 * i), i % 3) for i in range(10)]
    shards = write_wds(tmp_path / "wds", "train", samples, per_shard=4)
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(png, format="PNG")
    shards += write_wds(tmp_path / "wds", "train-png", [(png.getvalue(), 2)], per_shard=1, extension="png",
                        first=100)
    (tmp_path / "wds" / "classes.txt").write_text("cat\ndog\nemu\n")
    source = sources.open_source(str(tmp_path / "wds"), "train", cache_dir=str(tmp_path / "cache"))
    assert source.kind == "webdataset" and source.shards == sorted(shards) and len(source) == 11
    assert source.class_names == ["cat", "dog", "emu"]
    by_key = {source.keys[i]: i for i in range(len(source))}
    for i, (data, label) in enumerate(samples):
        assert source.read(by_key[f"sample{i:06d}"]) == data
        assert source.labels[by_key[f"sample{i:06d}"]] == label
    assert source.read(by_key["sample000100"]) == png.getvalue() and source.labels[by_key["sample000100"]] == 2
    assert source.name(by_key["sample000005"]) == f"{shards[1]}: sample000005"
    built = os.listdir(tmp_path / "cache" / "index")  # no --data-idx-dir: built in the cache
    assert len(built) == 4 and all(name.endswith(".samples.tsv") for name in built)


def test_format_detection_override_and_the_first_log_line(tmp_path):
    write_wds(tmp_path / "wds", "train", [(jpeg(1), 0)], per_shard=1)
    (tmp_path / "folder" / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "folder" / "train" / "a" / "x.jpg")
    assert sources.detect_format(str(TFSLIM), "train") == ("tfrecord", TF_TRAIN)
    assert sources.detect_format(str(TFSLIM), "val")[0] == "tfrecord"
    assert sources.detect_format(str(tmp_path / "wds"), "train") == (
        "webdataset", [str(tmp_path / "wds" / "train-000000.tar")])
    assert sources.detect_format(str(tmp_path / "folder"), "train") == ("folder", [])
    # the override: a folder is never taken for shards, and missing shards are named
    with pytest.raises(UserError, match=r"--data-format webdataset: no train-\*\.tar files in "):
        sources.detect_format(str(TFSLIM), "train", data_format="webdataset")
    with pytest.raises(UserError, match="no train/ folder in"):
        sources.open_source(str(TFSLIM), "train", data_format="folder")
    # an explicit pattern replaces DIR
    pattern = str(TFSLIM / "train-0000{0,1}-of-00002").replace("{0,1}", "[01]")
    assert sources.detect_format(None, "train", shards=pattern) == ("tfrecord", TF_TRAIN)
    source = sources.open_source(str(TFSLIM), "train", index_dir=str(tmp_path / "idx"))
    assert source.describe() == f"tfrecord {TFSLIM}: 2 shard(s), 80 samples, 10 classes"


def test_a_url_without_shards_asks_for_a_pattern(monkeypatch):
    monkeypatch.setattr(sources.remote, "expand", lambda pattern: [])  # an HTTP server lists nothing
    with pytest.raises(UserError, match=r"found no val shards at https://h/d .* --val-shards PATTERN"):
        sources.detect_format("https://h/d", "val")


# ---------------------------------------------------------------- sampling across ranks and workers

@pytest.mark.parametrize("window", [0, 1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_each_sample_is_read_by_at_most_one_rank_none_twice(world_size, window):
    # 3 shards of uneven size; with 3 ranks there are as many ranks as shards, and with one
    # shard's worth of data fewer (split within shards)
    shard_ids = np.repeat([0, 1, 2], [5, 3, 3])
    for epoch in (0, 1):
        per_rank = [sampling.epoch_indices(11, rank=r, world_size=world_size, epoch=epoch, seed=4, train=True,
                                           shard_ids=shard_ids, window=window) for r in range(world_size)]
        seen = [i for indices in per_rank for i in indices]
        assert len(seen) == len(set(seen))  # disjoint: no duplicate (the old wrap-around padding had some)
        assert len(seen) == 11 - 11 % world_size  # complete up to the documented tail
        assert {len(indices) for indices in per_rank} == {11 // world_size}
    if window == 1:  # one shard at a time: a rank's samples come shard after shard
        order = sampling.epoch_indices(11, rank=0, world_size=1, epoch=0, seed=4, train=True,
                                       shard_ids=shard_ids, window=1)
        runs = [shard_ids[i] for k, i in enumerate(order) if k == 0 or shard_ids[i] != shard_ids[order[k - 1]]]
        assert len(runs) == 3


def test_the_old_wrap_around_padding_duplicated_a_sample():
    # DistributedSampler style: 11 samples on 2 ranks were padded to 12 by repeating one
    per_rank = [sampling.epoch_indices(11, rank=r, world_size=2, epoch=0, seed=0, train=True) for r in (0, 1)]
    assert not set(per_rank[0]) & set(per_rank[1])


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_global_shuffle_gives_the_same_global_batches_at_any_world_size(world_size):
    # step k of -b 2 on N ranks trains on the samples of step k of -b 2N on one rank
    single = sampling.epoch_indices(16, rank=0, world_size=1, epoch=1, seed=7, train=True)
    per_rank = [sampling.epoch_indices(16, rank=r, world_size=world_size, epoch=1, seed=7, train=True)
                for r in range(world_size)]
    batch = 2
    for step in range(len(per_rank[0]) // batch):
        together = {i for indices in per_rank for i in indices[step * batch:(step + 1) * batch]}
        assert together == set(single[step * batch * world_size:(step + 1) * batch * world_size])


def test_shards_fewer_than_ranks_and_workers_cover_every_sample_once(tmp_path):
    # one shard, 3 ranks, 2 workers each: the label is the sample's number, so batches tell which
    # samples each rank and worker read
    samples = [(jpeg(i), i) for i in range(26)]
    write_wds(tmp_path / "wds", "train", samples, per_shard=26)
    seen = []
    for rank in range(3):
        cfg = config(tmp_path / "wds", tmp_path, rank=rank, world_size=3, batch_size=2, workers=2, num_classes=26)
        loader = registry.get("pytorch").train_loader(cfg)
        assert len(loader) == (26 // 3) // 2 == 4
        labels = [int(v) for _, batch in batches(loader, epoch=1) for v in batch]
        expected = sampling.epoch_indices(26, rank=rank, world_size=3, epoch=1, seed=3, train=True)[:8]
        source_labels = loader.source.dataset.source.labels
        assert labels == [int(source_labels[i]) for i in expected]
        seen += labels
    assert len(seen) == len(set(seen)) == 24


# ---------------------------------------------------------------- damaged shards

def _damaged_tfrecord(tmp_path, records=(3,)) -> Path:
    """The fixture with ``records`` of the first shard altered (one byte of image data) after indexing."""
    data = tmp_path / "damaged"
    shutil.copytree(TFSLIM, data)
    source = sources.open_source(str(data), "train", index_dir=str(tmp_path / "idx"))
    raw = bytearray((data / "train-00000-of-00002").read_bytes())
    for record in records:  # inside the record's data, same size: the index stays valid
        raw[int(source.offsets[record]) + 100] ^= 0xFF
    (data / "train-00000-of-00002").write_bytes(bytes(raw))
    return data


def test_a_crc_mismatch_is_skipped_by_pytorch_and_stops_dali(tmp_path):
    data = _damaged_tfrecord(tmp_path)
    source = sources.open_source(str(data), "train", index_dir=str(tmp_path / "idx"))
    with pytest.raises(sources.ShardError, match="record 3: data CRC mismatch"):
        source.read(3)
    cfg = config(data, tmp_path, batch_size=8)
    loader = registry.get("pytorch").train_loader(cfg)
    got = [labels for _, labels in batches(loader)]
    assert sum(len(labels) for labels in got) == 80  # the slot was refilled: batches stay full
    assert loader.take_skipped() == [f"{data}/train-00000-of-00002 record 3"]
    if HAVE_DALI:
        with pytest.raises(UserError) as error:
            batches(registry.get("dali-cpu").train_loader(cfg))
        assert "train-00000-of-00002 record 3: data CRC mismatch" in str(error.value)
        assert "\n" not in str(error.value)


def test_truncated_shards_and_members_without_label(tmp_path):
    samples = [(jpeg(i), i % 2) for i in range(12)]
    shards = write_wds(tmp_path / "wds", "train", samples, per_shard=6)
    # shard 0: a member without .cls; shard 1: cut in the middle of its last image
    with tarfile.open(shards[0], "a") as tar:
        info = tarfile.TarInfo("orphan.jpg")
        info.size = len(samples[0][0])
        tar.addfile(info, io.BytesIO(samples[0][0]))
    raw = Path(shards[1]).read_bytes()
    last = raw.rindex(b"sample000011.jpg")
    Path(shards[1]).write_bytes(raw[:last + 512 + 100])
    source = sources.open_source(str(tmp_path / "wds"), "train", cache_dir=str(tmp_path / "cache"))
    assert len(source) == 11
    assert source.skipped == [f"{shards[0]}: orphan: no .cls label",
                              f"{shards[1]}: sample000011: truncated (the shard ends at byte {last + 612})"]
    assert source.describe().endswith(", 2 left out")
    cfg = config(tmp_path / "wds", tmp_path, batch_size=5)
    loader = registry.get("pytorch").train_loader(cfg)
    assert sum(len(labels) for _, labels in batches(loader)) == 10
    if HAVE_DALI:
        with pytest.raises(UserError) as error:
            registry.get("dali-cpu").train_loader(cfg)
        assert str(error.value).startswith(f"{shards[0]}: orphan: no .cls label (2 sample(s) left out")


@pytest.mark.parametrize("cut", [100, 511])
def test_a_shard_cut_inside_a_member_header_reports_its_lost_tail(tmp_path, cut):
    """tarfile stops without a word at a header cut short; before, 2 of 12 samples vanished silently."""
    samples = [(jpeg(i), i % 2) for i in range(12)]
    shards = write_wds(tmp_path / "wds", "train", samples, per_shard=6)
    with tarfile.open(shards[1]) as tar:  # where sample 10's first member (its header blocks) starts
        header = next(member.offset for member in tar if member.name.startswith("sample000010."))
    raw = Path(shards[1]).read_bytes()
    Path(shards[1]).write_bytes(raw[:header + cut])
    source = sources.open_source(str(tmp_path / "wds"), "train", cache_dir=str(tmp_path / "cache"))
    assert len(source) == 10
    assert source.skipped == [f"{shards[1]}: unreadable tar data after byte {header} ({cut} bytes ignored: a header "
                              "cut short or damaged)"]
    assert source.describe().endswith(", 1 left out")


def test_a_whole_shard_reports_nothing_left_out(tmp_path):
    shards = write_wds(tmp_path / "wds", "train", [(jpeg(i), i % 2) for i in range(6)], per_shard=6)
    source = sources.open_source(str(tmp_path / "wds"), "train", cache_dir=str(tmp_path / "cache"))
    assert len(source) == 6 and source.skipped == [] and Path(shards[0]).stat().st_size % 10240 == 0


def test_a_shard_pattern_naming_missing_shards_stops_with_one_line(tmp_path):
    write_wds(tmp_path / "wds", "train", [(jpeg(i), i % 2) for i in range(8)], per_shard=2)  # 4 shards
    pattern = str(tmp_path / "wds" / "train-{000000..000009}.tar")
    with pytest.raises(UserError) as error:
        sources.detect_format(None, "train", shards=pattern)
    assert str(error.value) == (f"{pattern}: 6 of the 10 shard(s) it names do not exist ({tmp_path}/wds/"
                                f"train-000004.tar, {tmp_path}/wds/train-000005.tar, {tmp_path}/wds/train-000006.tar, ...)")
    assert len(sources.detect_format(None, "train", shards=str(tmp_path / "wds" / "train-{000000..000003}.tar"))[1]) == 4


def test_a_truncated_tfrecord_keeps_its_whole_records(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    raw = (TFSLIM / "validation-00000-of-00001").read_bytes()
    (data / "validation-00000-of-00001").write_bytes(raw[:-700])
    source = sources.open_source(str(data), "val", index_dir=str(tmp_path / "idx"))
    assert len(source) == 29 and len(source.skipped) == 1
    assert source.skipped[0].startswith(f"{data}/validation-00000-of-00001: truncated record 29 at byte ")


def test_an_undecodable_image_in_a_shard(tmp_path):
    samples = [(jpeg(i), i % 2) for i in range(8)]
    samples[5] = (b"\xff\xd8\xff\xe0 not a jpeg at all", 1)
    shards = write_wds(tmp_path / "wds", "train", samples, per_shard=8)
    cfg = config(tmp_path / "wds", tmp_path, batch_size=4)
    loader = registry.get("pytorch").train_loader(cfg)
    assert sum(len(labels) for _, labels in batches(loader)) == 8
    assert loader.take_skipped() == [f"{shards[0]}: sample000005"]
    if HAVE_DALI:
        with pytest.raises(UserError) as error:
            batches(registry.get("dali-cpu").train_loader(cfg))
        assert f"DALI cannot decode 1 image(s): {shards[0]}: sample000005" in str(error.value)


# ---------------------------------------------------------------- main.py end to end

def _tiny(num_classes: int = 10) -> nn.Module:
    """A BatchNorm-free CNN small enough for end-to-end runs in seconds."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))


_shards_tiny_registered = model_for_module("shards-tiny", _tiny)


TINY = ["--arch", "shards-tiny", "--image-size", "16", "--val-resize-size", "16", "-b", "8", "--lr", "0.05",
        "--seed", "7", "--device", "cpu", "--workers", "2", "--print-freq", "100"]


def _classes(workspace: Path) -> int:
    return read_pth(workspace / "checkpoint.pth.tar")["state_dict"]["4.weight"].shape[0]


def _run(args, workspace, data, tmp_path, hooks=None) -> int:
    return cli.main([*TINY, *args, "--shard-cache", str(tmp_path / "cache"), "--data-idx-dir",
                     str(tmp_path / "idx"), "--workspace", str(workspace), str(data)], hooks=hooks)


@pytest.mark.parametrize("backend", ["pytorch", pytest.param("dali-cpu", marks=requires_dali)])
@pytest.mark.parametrize("kind", ["tfrecord", "webdataset"])
def test_main_trains_and_validates_from_shards(kind, backend, tmp_path, capsys):
    data = TFSLIM if kind == "tfrecord" else wds_from_tfslim(tmp_path / "wds")
    assert _run(["--data-backend", backend, "--epochs", "2"], tmp_path / "ws", data, tmp_path) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"=> {kind} {data}: 2 shard(s), 80 samples, 10 classes\n"
                          if kind == "tfrecord" else f"=> {kind} {data}: 5 shard(s), 80 samples, 10 classes\n")
    assert f"=> {kind} {data}: " in out.splitlines()[1] and "30 samples" in out.splitlines()[1]
    saved = read_pth(tmp_path / "ws" / "checkpoint.pth.tar")
    assert saved["epoch"] == 2 and saved["class_names"] == (
        [f"d{k}" for k in range(10)] if kind == "tfrecord" else [str(k) for k in range(10)])
    assert _classes(tmp_path / "ws") == 10


def test_main_needs_no_dir_when_every_split_names_its_shards(tmp_path, capsys):
    shards = ["--train-shards", str(TFSLIM / "train-*"), "--val-shards", str(TFSLIM / "validation-*")]
    assert cli.main([*TINY, "--data-backend", "pytorch", "--epochs", "1", *shards, "--data-idx-dir",
                     str(tmp_path / "idx"), "--workspace", str(tmp_path / "ws")]) == 0
    assert capsys.readouterr().out.startswith(f"=> tfrecord {TFSLIM}/train-*: 2 shard(s), 80 samples")
    assert cli.main([*TINY, "--data-backend", "pytorch", "--epochs", "1", *shards[:2],
                     "--workspace", str(tmp_path / "ws2")]) == 2
    assert "needs the dataset directory DIR (or --val-shards;" in capsys.readouterr().err


def test_a_1001_class_model_from_tfslim_labels(tmp_path):
    args = ["--data-backend", "pytorch", "--epochs", "1", "--training-only", "--num-classes", "11",
            "--tfrecord-label-base", "0"]
    assert _run(args, tmp_path / "ws", TFSLIM, tmp_path) == 0
    assert _classes(tmp_path / "ws") == 11
    # base 0 without --num-classes: the classes are 0..10 as found (0 never occurs)
    assert _run(["--data-backend", "pytorch", "--epochs", "1", "--training-only", "--tfrecord-label-base", "0"],
                tmp_path / "ws2", TFSLIM, tmp_path) == 0
    assert _classes(tmp_path / "ws2") == 11
    # base 0 with 10 classes: a stored 10 is outside them -- one line, exit status 2
    assert _run(["--data-backend", "pytorch", "--epochs", "1", "--tfrecord-label-base", "0", "--num-classes", "10"],
                tmp_path / "ws3", TFSLIM, tmp_path) == 2


def test_sigterm_mid_epoch_on_shards_then_resume_gives_the_same_weights(tmp_path):
    data = wds_from_tfslim(tmp_path / "wds", per_shard=10)
    args = ["--data-backend", "pytorch", "--epochs", "2", "--augmentation", "trivialaugment",
            "--shard-shuffle-window", "2"]  # (the global shuffle is the folder's, tested there)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _run(args, straight, data, tmp_path) == 0
    # 80 samples / 8 = 10 steps per epoch: 3 steps into epoch 1
    assert _run(args, split, data, tmp_path, hooks=sigterm_at_step(13)) == 0
    saved = read_pth(split / "checkpoint.pth.tar")
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 3)
    assert _run([*args, "--resume", str(split / "checkpoint.pth.tar")], split, data, tmp_path) == 0
    expected = read_pth(straight / "checkpoint.pth.tar")["state_dict"]
    resumed = read_pth(split / "checkpoint.pth.tar")["state_dict"]
    assert all(torch.equal(tensor, resumed[name]) for name, tensor in expected.items())


def test_two_gloo_ranks_on_a_damaged_shard_stay_in_step(tmp_path):
    data = _damaged_tfrecord(tmp_path, records=range(0, 40, 3))
    workspace = tmp_path / "ws"
    workspace.mkdir()
    command = [sys.executable, str(REPO / "multiproc.py"), "--nproc_per_node", "2", "--master_port",
               str(free_port()), "--grace_period", "1", str(DRIVER), "--arch", "tiny-cnn", "--data-backend",
               "pytorch", "--image-size", "16", "--val-resize-size", "16", "-b", "4", "-j", "1", "--epochs", "2",
               "--lr", "0.1", "--seed", "1", "--device", "cpu", "--data-idx-dir", str(tmp_path / "idx"),
               "--shard-cache", str(tmp_path / "cache"), "--workspace", str(workspace), str(data)]
    run = subprocess.run(command, cwd=workspace, capture_output=True, text=True, timeout=150,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "unreadable file(s): " in run.stdout and "train-00000-of-00002 record " in run.stdout
    saved = read_pth(workspace / "checkpoint.pth.tar")
    assert (saved["epoch"], saved["step_in_epoch"]) == (2, 0)
