"""The packed form (issue 26): ``prepare --to packed`` writes it, every backend reads it.

Images are decoded once, capped and stored raw (PPM) or as JPEG in one memory-mapped file per split;
reading goes through the same ``SampleSource`` contract as folders and shards, so sharding, resume
and the bad-input rules are checked here the way ``test_shards.py`` checks them for shards.
"""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from image_classification import cli, machine
from image_classification.checkpoints.files import read_pth
from image_classification.data import registry, sources
from image_classification.data.contract import LoaderConfig
from image_classification.data.loaders import sampling
from image_classification.data.prepare import pack
from image_classification.data.prepare import cli as prepare
from image_classification.data.prepare.digits import write_digits
from image_classification.data.prepare.resize import target_size
from image_classification.errors import UserError
from image_classification.reporting.dllogger import read_raport
from tests.helpers.faults import sigterm_at_step
from tests.helpers.registered import model_for_module

try:
    import nvidia.dali  # noqa: F401
    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False
requires_dali = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed")


# ---------------------------------------------------------------- helpers

def smooth(width: int, height: int, seed: int) -> np.ndarray:
    """An RGB image of smooth ramps (JPEG's good case, so its tolerance can be tight)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [rng.uniform(0, 120) + rng.uniform(0, 120) * x / width + rng.uniform(0, 15) * y / height
                for _ in range(3)]
    return np.stack(channels, axis=-1).clip(0, 255).astype(np.uint8)


@pytest.fixture
def folder(tmp_path) -> Path:
    """2 classes: JPEGs larger and smaller than the cap, a grey PNG, an RGBA PNG, and an undecodable file."""
    src = tmp_path / "src"
    shapes = [(40, 30), (30, 50), (16, 12), (64, 64)]
    for split, count in (("train", 6), ("val", 2)):
        for label, name in enumerate(("cat", "dog")):
            (src / split / name).mkdir(parents=True)
            for n in range(count):
                width, height = shapes[(n + label) % len(shapes)]
                Image.fromarray(smooth(width, height, 10 * n + label)).save(src / split / name / f"{n}.jpg",
                                                                            quality=95)
    Image.fromarray(smooth(36, 28, 99)[..., 0]).save(src / "train" / "cat" / "grey.png")
    rgba = np.dstack([smooth(28, 36, 98), np.full((36, 28), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(src / "train" / "dog" / "alpha.png")
    (src / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    return src


def convert(*argv) -> int:
    return prepare.main(["-j", "1", "--to", "packed", *map(str, argv)])


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def expected_samples(src: Path, split: str, max_size: int) -> list[tuple[str, np.ndarray, int]]:
    """(path, capped RGB pixels, label) of every decodable image, in the folder's order."""
    found = []
    for label, name in enumerate(sorted(os.listdir(src / "train"))):
        for path in sorted((src / split / name).iterdir()):
            if path.name != "broken.jpg":
                found.append((str(path), np.asarray(pack.capped_rgb(path.read_bytes(), max_size)), label))
    return found


def config(data_dir, **overrides) -> LoaderConfig:
    base = dict(data_dir=str(data_dir), image_size=8, val_resize_size=8, batch_size=4, workers=0, prefetch=2,
                interpolation="bilinear", augmentation="none", memory_format=torch.contiguous_format,
                device=torch.device("cpu"), seed=3)
    base.update(overrides)
    return LoaderConfig(**base)


def batches(loader, epoch=0, start_batch=0):
    loader.set_epoch(epoch, sampling.EpochProgress.after_batches(start_batch, batch_size=loader.sampler.batch_size,
                                                                 world_size=loader.sampler.world_size))
    return list(loader)


# ---------------------------------------------------------------- the round trip

def test_raw_round_trip_is_pixel_exact(folder, tmp_path, capsys):
    dst = tmp_path / "packed"
    assert convert("--max-size", 20, "--encoding", "raw", folder, dst) == 0
    out, err = capsys.readouterr()
    assert sorted(os.listdir(dst)) == ["train.packed", "train.packed.json", "train.packed.npy",
                                       "val.packed", "val.packed.json", "val.packed.npy"]
    assert f"leaving out unreadable {folder / 'train/dog/broken.jpg'}" in err
    assert f"warning: 1 unreadable train image(s) left out: {folder / 'train/dog/broken.jpg'}" in err
    assert f"train: 14 images, " in out and "val: 4 images, " in out
    for split in ("train", "val"):
        source = sources.open_source(str(dst), split)
        expected = expected_samples(folder, split, 20)
        assert source.kind == "packed" and source.class_names == ["cat", "dog"] and len(source) == len(expected)
        for i, (path, pixels, label) in enumerate(expected):
            stored = source.read(i)
            assert stored.startswith(b"P6")  # raw: a binary PPM
            assert np.array_equal(decoded(stored), pixels), path
            assert int(source.labels[i]) == label
            height, width = pixels.shape[:2]
            assert min(height, width) <= 20 and (width, height) == target_size(*Image.open(path).size, 20)
    # the grey PNG is stored as RGB, the RGBA one composited over white (as the loaders convert them)
    train = sources.open_source(str(dst), "train")
    grey = decoded(train.read(6))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_jpeg_round_trip_within_the_codec_tolerance(folder, tmp_path):
    dst = tmp_path / "packed"
    assert convert("--max-size", 20, "--encoding", "jpeg", "--quality", 95, folder, dst) == 0
    source = sources.open_source(str(dst), "train")
    assert source.describe() == f"packed {dst}/train.packed: 14 images (JPEG q95, shorter side <= 20 px), 2 classes"
    for i, (path, pixels, label) in enumerate(expected_samples(folder, "train", 20)):
        stored = source.read(i)
        assert stored.startswith(b"\xff\xd8") and int(source.labels[i]) == label
        error = np.abs(decoded(stored).astype(int) - pixels.astype(int))
        assert error.mean() < 2.0 and error.max() < 40, (path, error.mean(), error.max())


def test_the_converter_prints_each_options_size_and_decode_cost(folder, tmp_path, capsys):
    assert convert("--max-size", 20, folder, tmp_path / "packed") == 0
    out = capsys.readouterr().out
    rows = {m.group(1): (float(m.group(2).replace(",", "")), float(m.group(3)))
            for m in re.finditer(r"^  (raw|jpeg q90|jpeg q95|SRC as stored) +([\d,]+) +\S+ \S+ +([\d.]+)", out, re.M)}
    assert sorted(rows) == ["SRC as stored", "jpeg q90", "jpeg q95", "raw"]
    assert rows["jpeg q90"][0] < rows["jpeg q95"][0] < rows["raw"][0]
    assert all(ms > 0 for _, ms in rows.values())
    assert re.search(r"^  raw .*<- written$", out, re.M)  # auto: a few KB fit in any machine's memory
    assert "measured on 14 images, one thread (machine: " in out  # 15 sampled, one undecodable
    assert f"python main.py --data-backend pytorch --arch resnet50 {tmp_path / 'packed'}" in out
    header = json.loads((tmp_path / "packed" / "train.packed.json").read_text())
    assert (header["version"], header["encoding"], header["max_size"], header["quality"]) == (1, "raw", 20, None)


def test_shards_convert_too(tmp_path):
    import webdataset
    (tmp_path / "wds").mkdir()
    images = [smooth(24, 18, k) for k in range(6)]
    with webdataset.TarWriter(str(tmp_path / "wds" / "train-000000.tar")) as sink:
        for k, pixels in enumerate(images):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            sink.write({"__key__": f"s{k}", "png": buffer.getvalue(), "cls": k % 3})
    assert convert("--max-size", 100, "--encoding", "raw", tmp_path / "wds", tmp_path / "packed") == 0
    source = sources.open_source(str(tmp_path / "packed"), "train")
    assert [int(v) for v in source.labels] == [0, 1, 2, 0, 1, 2] and source.class_names == ["0", "1", "2"]
    assert all(np.array_equal(decoded(source.read(k)), images[k]) for k in range(6))  # PNG in, pixels out


# ---------------------------------------------------------------- reruns and interruptions

def test_a_rerun_keeps_the_splits_and_other_settings_are_refused(folder, tmp_path, capsys):
    dst = tmp_path / "packed"
    assert convert("--max-size", 20, "--encoding", "raw", folder, dst) == 0
    written = (dst / "train.packed").stat().st_mtime_ns
    capsys.readouterr()
    assert convert("--max-size", 20, "--encoding", "raw", folder, dst) == 0
    assert "(kept from an earlier run)" in capsys.readouterr().out
    assert (dst / "train.packed").stat().st_mtime_ns == written
    assert convert("--max-size", 24, "--encoding", "raw", folder, dst) == 2
    err = capsys.readouterr().err
    assert err == f"error: {dst}/train.packed.json records a conversion of other input or with other settings: " \
                  "convert into a new DST\n"


def test_a_failed_conversion_leaves_nothing_that_looks_whole(tmp_path, capsys):
    src = tmp_path / "src"
    for split in ("train", "val"):
        (src / split / "a").mkdir(parents=True)
    Image.fromarray(smooth(12, 10, 0)).save(src / "train" / "a" / "0.png")
    for n in range(3):  # every val image is broken: the val split fails after its data file was begun
        (src / "val" / "a" / f"{n}.jpg").write_bytes(b"\xff\xd8 broken")
    assert convert("--encoding", "raw", src, tmp_path / "packed") == 2
    assert capsys.readouterr().err.endswith(f"error: {src}/val: no readable images (3 unreadable)\n")
    # train is complete; of val, not even the hidden .part files are left
    assert sorted(os.listdir(tmp_path / "packed")) == ["train.packed", "train.packed.json", "train.packed.npy"]


def test_bad_flags_are_one_line(folder, tmp_path, capsys):
    assert prepare.main(["--encoding", "raw", "--max-size", "9", str(folder), str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err == "error: --encoding needs --to packed\n"
    assert convert("--shard-samples", 3, folder, tmp_path / "b") == 2
    assert capsys.readouterr().err == "error: --shard-size and --shard-samples need --to webdataset|tfrecord\n"


# ---------------------------------------------------------------- damaged files

@pytest.fixture
def packed_dir(folder, tmp_path) -> Path:
    dst = tmp_path / "packed"
    assert convert("--max-size", 20, "--encoding", "raw", folder, dst) == 0
    return dst


def one_line_error(dst: Path, split: str = "train") -> str:
    with pytest.raises(UserError) as error:
        sources.open_source(str(dst), split)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_truncated_data_file_is_one_line_naming_it(packed_dir):
    data = packed_dir / "train.packed"
    size = data.stat().st_size
    data.write_bytes(data.read_bytes()[:-10])
    assert one_line_error(packed_dir) == (f"{data} is truncated: {size - 10} bytes, its header "
                                          f"{packed_dir}/train.packed.json says {size}: copy it again or convert again")


def test_a_corrupt_index_or_header_is_one_line_naming_it(packed_dir):
    index = packed_dir / "val.packed.npy"
    raw = bytearray(index.read_bytes())
    raw[-3] ^= 0xFF
    index.write_bytes(bytes(raw))
    assert one_line_error(packed_dir, "val").startswith(f"{index}: CRC mismatch with its header")
    header = packed_dir / "train.packed.json"
    header.write_text(header.read_text()[:40])
    assert one_line_error(packed_dir).startswith(f"{header} is not a packed-dataset header (")
    header.write_text(json.dumps({"format": "convnets-packed", "version": 99}))
    assert one_line_error(packed_dir).startswith(f"{header}: packed format version 99, this convnets reads version 1")
    header.write_text(json.dumps({"format": "convnets-packed", "version": 1, "encoding": "raw"}))
    assert one_line_error(packed_dir).startswith(f"{header} is not a complete packed-dataset header (no quality, ")


def test_a_damaged_sample_is_skipped_by_pytorch_and_stops_dali(packed_dir):
    source = sources.open_source(str(packed_dir), "train")
    raw = bytearray((packed_dir / "train.packed").read_bytes())
    raw[int(source.index["offset"][5]) + 20] ^= 0xFF  # inside sample 5's pixels: lengths stay right
    (packed_dir / "train.packed").write_bytes(bytes(raw))
    with pytest.raises(sources.ShardError, match="sample 5: CRC mismatch"):
        sources.open_source(str(packed_dir), "train").read(5)
    cfg = config(packed_dir, batch_size=7)
    loader = registry.get("pytorch").train_loader(cfg)
    assert sum(len(labels) for _, labels in batches(loader)) == 14  # the slot was refilled
    assert loader.take_skipped() == [f"{packed_dir}/train.packed sample 5"]
    if HAVE_DALI:
        with pytest.raises(UserError) as error:
            batches(registry.get("dali-cpu").train_loader(cfg))
        assert f"{packed_dir}/train.packed sample 5: CRC mismatch" in str(error.value)
        assert "\n" not in str(error.value)


def test_detection_and_format_errors(packed_dir, folder):
    assert sources.detect_format(str(packed_dir), "train") == ("packed", [])
    assert sources.detect_format(str(folder), "train") == ("folder", [])  # a folder stays a folder
    with pytest.raises(UserError, match=f"--data-format packed: no train.packed.json in {folder}"):
        sources.open_source(str(folder), "train", data_format="packed")
    with pytest.raises(UserError, match="--data-format packed cannot read --train-shards"):
        sources.open_source(None, "train", data_format="packed", shards=str(packed_dir / "train.packed"))


# ---------------------------------------------------------------- sharding and resume

@pytest.fixture
def numbered(tmp_path) -> Path:
    """26 training images, each its own class, so a batch's labels say which samples it holds."""
    src = tmp_path / "src"
    for k in range(26):
        (src / "train" / f"c{k:02d}").mkdir(parents=True)
        Image.fromarray(smooth(12, 10, k)).save(src / "train" / f"c{k:02d}" / "0.png")
    assert convert("--encoding", "raw", src, tmp_path / "packed") == 0
    return tmp_path / "packed"


def test_every_rank_and_worker_reads_each_sample_once_per_epoch(numbered):
    seen = []
    for rank in range(3):
        cfg = config(numbered, rank=rank, world_size=3, batch_size=2, workers=2)
        loader = registry.get("pytorch").train_loader(cfg)
        assert len(loader) == (26 // 3) // 2 == 4
        labels = [int(v) for _, batch in batches(loader, epoch=1) for v in batch]
        expected = sampling.epoch_indices(26, rank=rank, world_size=3, epoch=1, seed=3, train=True)[:8]
        assert labels == expected  # sample k has label k: the folder's global shuffle, strided per rank
        seen += labels
    assert len(seen) == len(set(seen)) == 24


def test_mid_epoch_batches_are_the_rest_of_the_epoch(numbered):
    loader = registry.get("pytorch").train_loader(config(numbered, batch_size=2, augmentation="trivialaugment",
                                                         workers=2))
    full, resumed = batches(loader, epoch=2), batches(loader, epoch=2, start_batch=9)
    assert len(full) == 13 and len(resumed) == 4
    for (a, la), (b, lb) in zip(full[9:], resumed, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def _tiny(num_classes: int = 10) -> nn.Module:
    """A BatchNorm-free CNN small enough for end-to-end runs in seconds."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


_packed_tiny_registered = model_for_module("packed-tiny", _tiny)


TINY = ["--arch", "packed-tiny", "--image-size", "16", "--val-resize-size", "16", "-b", "32", "--lr", "0.2",
        "--seed", "7", "--device", "cpu", "--workers", "2", "--print-freq", "100"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """The digits at 24 px as a folder and packed raw with the cap at their size (nothing resized)."""
    root = tmp_path_factory.mktemp("digits")
    write_digits(str(root / "folder"), size=24)
    assert convert("--max-size", 24, root / "folder", root / "packed") == 0
    return root


def _top1(workspace: Path) -> float:
    return max(r["data"]["val.top1"] for r in read_raport(workspace / "experiment_raport.json")
               if r.get("step") == [] and "val.top1" in r.get("data", {}))


@pytest.mark.parametrize("backend", ["pytorch", pytest.param("dali-cpu", marks=requires_dali)])
def test_main_trains_from_the_packed_digits(digits, backend, tmp_path, capsys):
    data = digits / "packed"
    args = [*TINY, "--data-backend", backend, "--epochs", "2", "--crop-scale", "0.35", "1",
            "--n-stages", "2", "--base-image-size", "12"]  # stage-wise: epoch 0 at 12 px, epoch 1 at 16
    assert cli.main([*args, "--workspace", str(tmp_path / "packed"), str(data)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"=> packed {data}/train.packed: 1437 images (raw, shorter side <= 24 px), 10 classes\n"
                          f"=> packed {data}/val.packed: 360 images (raw, shorter side <= 24 px), 10 classes\n")
    sizes = [r["data"]["train.image_size"] for r in read_raport(tmp_path / "packed" / "experiment_raport.json")
             if isinstance(r.get("step"), list) and len(r["step"]) == 1 and "train.image_size" in r.get("data", {})]
    assert sizes == [12, 16]
    saved = read_pth(tmp_path / "packed" / "checkpoint.pth.tar")
    assert saved["epoch"] == 2 and saved["class_names"] == [str(k) for k in range(10)]
    assert _top1(tmp_path / "packed") > 20  # 10 classes: chance is 10 %
    if backend == "pytorch":
        # Nothing was resized: the same pixels, crops and steps as from the folder, so the same weights.
        # (At 16 px no crop of a 24 px JPEG is decoded at a reduced scale, which a PPM cannot be.)
        same = [*TINY, "--data-backend", backend, "--epochs", "1", "--crop-scale", "0.35", "1", "--training-only"]
        for form in ("packed", "folder"):
            assert cli.main([*same, "--workspace", str(tmp_path / f"same-{form}"), str(digits / form)]) == 0
        weights = [read_pth(tmp_path / f"same-{form}" / "checkpoint.pth.tar")["state_dict"]
                   for form in ("packed", "folder")]
        assert all(torch.equal(tensor, weights[1][name]) for name, tensor in weights[0].items())


def test_sigterm_mid_epoch_then_resume_gives_the_same_weights(tmp_path):
    src = tmp_path / "src"
    for k in range(48):  # 4 classes x 12 images of 20x18 px
        (src / "train" / f"c{k % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth(20, 18, k)).save(src / "train" / f"c{k % 4}" / f"{k}.png")
    assert convert("--encoding", "raw", src, tmp_path / "packed") == 0
    args = [*TINY, "-b", "8", "--data-backend", "pytorch", "--epochs", "2", "--augmentation", "trivialaugment",
            "--training-only", str(tmp_path / "packed")]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli.main([*args, "--workspace", str(straight)]) == 0
    # 48 samples / 8 = 6 steps per epoch: 2 steps into epoch 1
    assert cli.main([*args, "--workspace", str(split)], hooks=sigterm_at_step(8)) == 0
    saved = read_pth(split / "checkpoint.pth.tar")
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 2)
    assert cli.main([*args, "--workspace", str(split), "--resume", str(split / "checkpoint.pth.tar")]) == 0
    expected = read_pth(straight / "checkpoint.pth.tar")["state_dict"]
    resumed = read_pth(split / "checkpoint.pth.tar")["state_dict"]
    assert all(torch.equal(tensor, resumed[name]) for name, tensor in expected.items())


def test_a_run_that_needs_larger_images_than_stored_is_warned(packed_dir, caplog):
    registry.get("pytorch").val_loader(config(packed_dir, image_size=16, val_resize_size=24))
    assert (f"{packed_dir} stores images with the shorter side <= 20 px, less than --val-resize-size 24: "
            "they are enlarged") in caplog.text
    caplog.clear()
    registry.get("pytorch").train_loader(config(packed_dir, image_size=20, val_resize_size=24))
    assert "stores images" not in caplog.text  # training crops of 20 px: the stored side suffices


def test_encoding_auto_takes_jpeg_when_the_raw_copy_would_not_fit_in_memory(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(machine, "memory_bytes", lambda: 20_000)  # the raw copy of 18 images (~26 KB) is over half of it
    assert convert("--max-size", 20, folder, tmp_path / "packed") == 0
    out = capsys.readouterr().out
    assert re.search(r"^  jpeg q90 .*<- written$", out, re.M) and "raw ~" in out and "does not fit in half of" in out
    assert json.loads((tmp_path / "packed" / "train.packed.json").read_text())["encoding"] == "jpeg"
    assert sources.open_source(str(tmp_path / "packed"), "train").read(0).startswith(b"\xff\xd8")
