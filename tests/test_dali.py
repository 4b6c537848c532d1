"""The DALI backends (``dali-cpu`` runs here, on the CPU; ``dali-gpu`` only checks its errors).

Every dataset is a few dozen tiny generated images. Two kinds:

* ``folder``: textured, class-coloured JPEGs of varied sizes -- compared with the pytorch backend.
* ``levels``: uniform gray PNGs, each file its own gray level. A uniform image stays uniform through
  any crop, resize and flip, so every output sample says which file it came from (and its exact
  normalised value is known): sharding and resume can be checked sample by sample.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from image_classification.data import registry
from image_classification.data.contract import IMAGENET_MEAN, IMAGENET_STD, EpochProgress, LoaderConfig
from image_classification.data.loaders import sampling
from image_classification.errors import UserError
from image_classification.reporting.dllogger import read_raport

# DALI is pinned in requirements.txt: a DALI that fails to import fails this module, never skips it.
import nvidia.dali  # noqa: F401,E402

REPO = Path(__file__).resolve().parents[1]
SIZE = 16
CLASSES = ("ant", "bee", "cat")
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


# ---------------------------------------------------------------- helpers

def config(data_dir, **overrides) -> LoaderConfig:
    base = LoaderConfig(data_dir=str(data_dir), image_size=SIZE, val_resize_size=20, batch_size=4, workers=2,
                        prefetch=2, interpolation="bilinear", augmentation="none",
                        memory_format=torch.contiguous_format, device=torch.device("cpu"), seed=7)
    return dataclasses.replace(base, **overrides)


def loader(backend: str, cfg: LoaderConfig, train: bool):
    chosen = registry.get(backend)
    return chosen.train_loader(cfg) if train else chosen.val_loader(cfg)


def batches(loader_, epoch=0, start_batch=0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader_.set_epoch(epoch, EpochProgress.after_batches(start_batch, batch_size=loader_.sampler.batch_size,
                                                         world_size=loader_.sampler.world_size))
    return [(images.clone(), labels.clone()) for images, labels in loader_]


def textured_image(path: str, size: tuple[int, int], colour, seed: int) -> None:
    """A class colour with a coarse stripe texture and mild noise: the same statistics wherever it
    is cropped, and textures coarse enough to survive the downscaling of any crop."""
    width, height = size
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    stripes = 40 * np.sin(2 * np.pi * (x + 0.5 * y) / 14 + seed)[..., None] * np.array([1.0, -0.6, 0.4])
    pixels = np.asarray(colour, float)[None, None, :] + stripes + rng.normal(0, 6, (height, width, 3))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=92)


def gray_png(path: str, size: tuple[int, int], level: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), level, np.uint8)).save(path)


def levels_of(images: torch.Tensor) -> list[int]:
    """The gray level (0..255) of each uniform sample, checking that it is uniform."""
    pixels = (images * STD + MEAN) * 255
    flat = pixels.flatten(1)
    assert torch.all(flat.max(1).values - flat.min(1).values < 1e-3), "sample is not uniform"
    return flat.mean(1).round().int().tolist()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """3 classes; train 8 / val 3 textured JPEGs per class, sizes 30..64 px."""
    root = tmp_path_factory.mktemp("dali-folder")
    colours = {"ant": (200, 90, 60), "bee": (70, 170, 90), "cat": (90, 100, 190)}
    seed = 0
    for split, count in (("train", 8), ("val", 3)):
        for name in CLASSES:
            for i in range(count):
                seed += 1
                size = (30 + (seed * 7) % 35, 30 + (seed * 11) % 35)
                textured_image(str(root / split / name / f"{i}.jpg"), size, colours[name], seed)
    return str(root)


@pytest.fixture(scope="module")
def levels(tmp_path_factory) -> tuple[str, dict[str, list[int]]]:
    """Uniform gray PNGs with distinct levels: 2 classes, train 11 files, val 7 files.

    Returns the root and, per split, the level of each sample in scan order (sample index → level).
    """
    root = tmp_path_factory.mktemp("dali-levels")
    order: dict[str, list[int]] = {"train": [], "val": []}
    level = 20
    for split, per_class in (("train", (6, 5)), ("val", (4, 3))):
        for name, count in zip(("a", "b"), per_class):
            for i in range(count):
                level += 9
                gray_png(str(root / split / name / f"{i:02d}.png"), (24 + 5 * i, 40 - 3 * i), level)
                order[split].append(level)
    return str(root), order


def normalised(level: int) -> torch.Tensor:
    return (torch.tensor(float(level)) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


# ---------------------------------------------------------------- same contract as the pytorch backend

def test_train_epoch_matches_the_pytorch_backend(folder):
    cfg = config(folder)
    dali_loader, torch_loader = loader("dali-cpu", cfg, True), loader("pytorch", cfg, True)
    assert (dali_loader.num_classes, dali_loader.class_names) == (3, list(CLASSES))
    assert len(dali_loader) == len(torch_loader) == sampling.num_batches(24, world_size=1, batch_size=4, train=True)
    ours, theirs = batches(dali_loader), batches(torch_loader)
    assert len(ours) == len(theirs) == len(dali_loader)
    for (images, labels), (ref_images, ref_labels) in zip(ours, theirs):
        assert images.shape == ref_images.shape == (4, 3, SIZE, SIZE)
        assert images.dtype == torch.float32 and labels.dtype == torch.int64 and labels.shape == (4,)
        assert torch.equal(labels, ref_labels)  # same sampler: same samples in the same batches
    stacked = torch.cat([images for images, _ in ours])
    reference = torch.cat([images for images, _ in theirs])
    # Random crops differ between backends, so compare statistics, not pixels.
    assert torch.allclose(stacked.mean((0, 2, 3)), reference.mean((0, 2, 3)), atol=0.05)
    assert torch.allclose(stacked.std((0, 2, 3)), reference.std((0, 2, 3)), rtol=0.05)


@pytest.mark.parametrize("resize, crop", [(20, SIZE), (19, 15), (12, SIZE)])  # even/odd margins, padding
def test_val_pass_matches_the_pytorch_backend_pixel_for_pixel(folder, resize, crop):
    cfg = config(folder, batch_size=4, val_resize_size=resize, image_size=crop)
    dali_loader = loader("dali-cpu", cfg, False)
    assert len(dali_loader) == 3
    ours, theirs = batches(dali_loader), batches(loader("pytorch", cfg, False))
    assert [b[0].shape for b in ours] == [b[0].shape for b in theirs] == [(4, 3, crop, crop)] * 2 + [(1, 3, crop, crop)]
    for (images, labels), (ref_images, ref_labels) in zip(ours, theirs):
        assert torch.equal(labels, ref_labels)
        # The same geometry as torchvision to the pixel; only the resampling kernels differ a little
        # (0.07 is 4/255 after normalisation).
        difference = (images - ref_images).abs()
        assert difference.mean() < 0.01 and difference.max() < 0.07


def test_a_recorded_mean_and_std_normalise_as_the_pytorch_backend_padding_included(folder):
    """LoaderConfig's mean/std (an --onnx file's record) reach DALI's normalisation and its padding fill."""
    mean, std = (0.3, 0.6, 0.2), (0.5, 0.1, 0.3)
    cfg = config(folder, batch_size=4, val_resize_size=12, image_size=SIZE, mean=mean, std=std)
    ours, theirs = batches(loader("dali-cpu", cfg, False)), batches(loader("pytorch", cfg, False))
    scale = torch.tensor(std).view(1, 3, 1, 1)
    for (images, _), (ref_images, _) in zip(ours, theirs):
        pixels = (images - ref_images).abs().mul(scale)  # in [0, 1] pixel units: resampling differs a little
        assert pixels.mean() < 0.5 / 255 and pixels.max() < 6 / 255
    black = ours[0][0][0, :, 0, 0]  # a padded corner: pixel value 0, normalised
    assert torch.allclose(black, -torch.tensor(mean) / torch.tensor(std), atol=1e-5)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_uniform_gray_is_normalised_exactly(levels, memory_format):
    root, order = levels
    cfg = config(root, memory_format=memory_format)
    for train in (True, False):
        for images, _ in batches(loader("dali-cpu", cfg, train)):
            for sample, level in zip(images, levels_of(images)):
                expected = normalised(level).view(3, 1, 1).expand(3, SIZE, SIZE)
                assert torch.allclose(sample, expected, atol=1e-5)


def test_train_follows_epoch_indices_on_every_rank(levels):
    root, order = levels
    seen = []
    for rank in (0, 1):
        cfg = config(root, rank=rank, world_size=2, batch_size=2, seed=3)
        dali_loader = loader("dali-cpu", cfg, True)
        assert len(dali_loader) == sampling.num_batches(11, world_size=2, batch_size=2, train=True) == 2
        for epoch in (0, 1):
            expected = sampling.epoch_indices(11, rank=rank, world_size=2, epoch=epoch, seed=3, train=True)[:4]
            got = [level for images, _ in batches(dali_loader, epoch) for level in levels_of(images)]
            assert got == [order["train"][i] for i in expected]
            seen.append(got)
    assert seen[0] != seen[1]  # the shuffle changes with the epoch


def test_val_scores_every_file_exactly_once_across_two_ranks(levels):
    root, order = levels
    per_rank = []
    for rank in (0, 1):
        cfg = config(root, rank=rank, world_size=2, batch_size=2)
        dali_loader = loader("dali-cpu", cfg, False)
        assert len(dali_loader) == sampling.num_batches(7, world_size=2, batch_size=2, train=False, rank=rank)
        got = [level for images, _ in batches(dali_loader) for level in levels_of(images)]
        assert got == [order["val"][i] for i in range(rank, 7, 2)]
        per_rank.append(got)
    assert sorted(per_rank[0] + per_rank[1]) == sorted(order["val"])


def test_mid_epoch_resume_yields_the_rest_of_the_epoch(levels):
    root, _ = levels
    cfg = config(root, batch_size=2)
    straight = batches(loader("dali-cpu", cfg, True), epoch=1)
    resumed_loader = loader("dali-cpu", cfg, True)
    resumed_loader.set_epoch(1, EpochProgress.after_batches(2, batch_size=2, world_size=1))
    assert len(resumed_loader) == len(straight) - 2
    resumed = batches(resumed_loader, epoch=1, start_batch=2)
    assert len(resumed) == len(straight) - 2
    for (images, labels), (ref_images, ref_labels) in zip(resumed, straight[2:]):
        assert torch.equal(labels, ref_labels) and levels_of(images) == levels_of(ref_images)


def test_an_abandoned_epoch_does_not_leak_into_the_next(levels):
    root, order = levels
    cfg = config(root, batch_size=2)
    dali_loader = loader("dali-cpu", cfg, True)
    dali_loader.set_epoch(0)
    for step, _ in enumerate(dali_loader):  # e.g. --prof or an interrupt: stop after one batch
        break
    after = batches(dali_loader, epoch=4)
    expected = sampling.epoch_indices(11, rank=0, world_size=1, epoch=4, seed=7, train=True)[:10]
    assert [level for images, _ in after for level in levels_of(images)] == [order["train"][i] for i in expected]


def test_same_seed_gives_identical_batches(folder):
    first = batches(loader("dali-cpu", config(folder, seed=11), True))
    second = batches(loader("dali-cpu", config(folder, seed=11, workers=1), True))  # threads do not matter
    other = batches(loader("dali-cpu", config(folder, seed=12), True))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    assert not all(torch.equal(a[0], c[0]) for a, c in zip(first, other))


def test_nhwc_is_channels_last_without_a_copy(folder, monkeypatch):
    from image_classification.data.loaders import dali
    original, produced = dali.as_torch, []

    def spy(*args):
        tensor = original(*args)
        produced.append(tensor.data_ptr())
        return tensor

    monkeypatch.setattr(dali, "as_torch", spy)
    for train in (True, False):
        dali_loader = loader("dali-cpu", config(folder, memory_format=torch.channels_last), train)
        dali_loader.set_epoch(0)
        for images, labels in dali_loader:
            n = images.shape[0]
            assert images.shape == (n, 3, SIZE, SIZE)
            assert images.is_contiguous(memory_format=torch.channels_last)
            assert images.stride() == (SIZE * SIZE * 3, 1, SIZE * 3, 3)
            assert images.data_ptr() in produced  # the pipeline's own buffer, not a copy of it
            assert labels.data_ptr() in produced


@pytest.mark.parametrize("policy", ["autoaugment", "randaugment", "trivialaugment"])
def test_augmentation_policies_run(folder, policy):
    cfg = config(folder, augmentation=policy, interpolation="bicubic")
    got = batches(loader("dali-cpu", cfg, True))
    assert len(got) == 6 and all(images.shape == (4, 3, SIZE, SIZE) for images, _ in got)
    assert all(torch.isfinite(images).all() for images, _ in got)
    # the policy is applied: the same seed without it gives other pixels (same labels)
    plain = batches(loader("dali-cpu", config(folder, interpolation="bicubic"), True))
    assert [labels.tolist() for _, labels in got] == [labels.tolist() for _, labels in plain]
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(got, plain))


def test_triangular_interpolation_and_crop_scale(folder):
    cfg = config(folder, interpolation="triangular", crop_scale=(0.5, 1.0))
    assert len(batches(loader("dali-cpu", cfg, True))) == 6
    assert len(batches(loader("dali-cpu", cfg, False))) == 3


def test_the_interpolation_reaches_the_resize(folder):
    # The deterministic val pass with bicubic differs from bilinear's, by a filter's worth. (DALI's
    # antialiased linear resize is the triangular filter, so triangular gives bilinear's pixels.)
    passes = {name: batches(loader("dali-cpu", config(folder, interpolation=name), False))
              for name in ("bilinear", "bicubic", "triangular")}
    differences = [(a - b).abs() for (a, _), (b, _) in zip(passes["bicubic"], passes["bilinear"])]
    assert max(d.max().item() for d in differences) > 0.01
    assert max(d.mean().item() for d in differences) < 0.5
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(passes["triangular"], passes["bilinear"]))


# ---------------------------------------------------------------- errors: one clear line

def test_undecodable_file_is_named_in_one_line(folder, tmp_path):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(folder, root)
    bad = root / "train" / "bee" / "zz-not-an-image.jpg"
    bad.write_bytes(b"this is a text file with a .jpg name\n" * 20)
    truncated = root / "train" / "cat" / "zz-truncated.jpg"
    whole = (root / "train" / "cat" / "0.jpg").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    dali_loader = loader("dali-cpu", config(root, batch_size=26), True)  # one batch holds both
    with pytest.raises(UserError) as error:
        batches(dali_loader)
    message = str(error.value)
    assert "\n" not in message and str(bad) in message and str(truncated) in message
    assert "--data-backend pytorch" in message
    with pytest.raises(UserError):  # the loader stays usable: it rebuilds and reports again
        batches(dali_loader)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_dali_gpu_without_a_gpu_names_dali_cpu(folder):
    for train in (True, False):
        with pytest.raises(UserError, match="dali-cpu") as error:
            loader("dali-gpu", config(folder), train)
        assert "\n" not in str(error.value) and "GPU" in str(error.value)


def test_missing_dali_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    for name in ("dali-cpu", "dali-gpu"):
        with pytest.raises(UserError) as error:
            registry.get(name)
        message = str(error.value)
        assert "pip install nvidia-dali-cuda120" in message and "--data-backend pytorch" in message
        assert "\n" not in message


def test_the_toolkit_runs_without_dali():
    script = ("import sys; sys.modules['nvidia.dali'] = None\n"
              "from image_classification import cli\n"
              "from image_classification.data import registry\n"
              "from image_classification.data.loaders import dali\n"
              "assert {'dali-cpu', 'dali-gpu', 'pytorch'} <= set(registry.names())\n"
              "registry.get('pytorch'); registry.get('synthetic')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_too_few_images_for_one_batch(folder):
    with pytest.raises(UserError, match="lower --batch-size"):
        loader("dali-cpu", config(folder, batch_size=25), True)


# ---------------------------------------------------------------- end to end (main.py)

def test_end_to_end_main_with_dali_cpu_learns_digits(digits_dir, tmp_path):
    """main.py --data-backend dali-cpu on the digits: a tiny CNN gets well above chance (10%) in ~20 s.

    (The README recipe, resnet18 at 32 px with --amp, reaches ~91% top-1 after 3 epochs with
    dali-cpu, but takes minutes on a shared 2-core CPU, so it is not a test.)
    """
    args = ["--data-backend", "dali-cpu", "--arch", "tiny-cnn", "--image-size", "16", "--val-resize-size", "16",
            "--crop-scale", "0.5", "1", "-b", "32", "--epochs", "10", "--lr", "0.2", "--lr-schedule", "cosine",
            "--memory-format", "nhwc", "--workers", "2", "--seed", "1", "--device", "cpu", "--print-freq", "1000",
            "--workspace", str(tmp_path), str(digits_dir)]
    result = subprocess.run([sys.executable, str(REPO / "tests" / "helpers" / "run_main.py"), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    top1 = [r["data"]["val.top1"] for r in read_raport(tmp_path / "experiment_raport.json")
            if r.get("type") == "LOG" and "val.top1" in r["data"] and len(r["step"]) == 1]
    assert len(top1) == 10 and top1[-1] > 50.0  # ~76% with this seed
