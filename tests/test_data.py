"""Data backends: layout checks, transforms, the pytorch and synthetic loaders, the digits export.

Every dataset here is a handful of tiny images generated in ``tmp_path``.
"""
from __future__ import annotations

import dataclasses
import gc
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from image_classification.data import registry
from image_classification.data.contract import IMAGENET_MEAN, IMAGENET_STD, EpochProgress, LoaderConfig
from image_classification.data.loaders import sampling
from image_classification.data.loaders.device import DeviceLoader, Normalize
from image_classification.data.loaders.transforms import open_rgb, train_transform, val_transform
from image_classification.data.prepare.digits import write_digits
from image_classification.data.sources.folder import check_dataset, scan_split
from image_classification.errors import UserError
from tests.helpers.tiny_data import write_imagefolder

SIZE = 16
CLASSES = ("cat", "dog", "fox")


# ---------------------------------------------------------------- helpers

def config(data_dir, **overrides) -> LoaderConfig:
    base = LoaderConfig(data_dir=str(data_dir) if data_dir else None, image_size=SIZE, val_resize_size=20,
                        batch_size=4, workers=0, prefetch=2, interpolation="bilinear", augmentation="none",
                        memory_format=torch.contiguous_format, device=torch.device("cpu"), seed=7)
    return dataclasses.replace(base, **overrides)


def save_image(path, size=(24, 20), value=None, mode="RGB", seed=0, fmt=None) -> str:
    """A random (or uniform ``value``) image at ``path``; returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    channels = {"RGB": 3, "L": 1}[mode]
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], channels)
    pixels = np.full(shape, value, np.uint8) if value is not None else rng.integers(0, 256, shape, np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(path, format=fmt)
    return str(path)


def make_folder(root, classes=CLASSES, train_per_class=5, val_per_class=2, ext="jpg") -> str:
    """An ImageFolder of random images of varied sizes under ``root``."""
    return str(write_imagefolder(Path(root), classes, train_per_class, val_per_class, ext=ext,
                                 size=[(20, 20), (24, 20), (32, 48), (40, 24), (48, 36)]))


def batches(loader, epoch=0, start_batch=0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch, EpochProgress.after_batches(start_batch, batch_size=loader.sampler.batch_size,
                                                        world_size=loader.sampler.world_size))
    return [(images.clone(), labels.clone()) for images, labels in loader]


def denormalise(images: torch.Tensor) -> torch.Tensor:
    """Float images back to 0..255 values (rounded)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((images * std + mean) * 255).round()


pytorch_backend = registry.get("pytorch")
synthetic_backend = registry.get("synthetic")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"))


# ---------------------------------------------------------------- pytorch backend: output contract

def test_train_batches_follow_sampling_and_contract(folder):
    loader = pytorch_backend.train_loader(config(folder))
    expected = sampling.num_batches(15, world_size=1, batch_size=4, train=True)
    result = batches(loader)
    assert len(loader) == expected == len(result) == 3
    assert loader.num_classes == 3 and loader.class_names == list(CLASSES)
    for images, labels in result:
        assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < 3
    assert loader.take_skipped() == []


def test_val_normalises_on_the_device_side(tmp_path):
    for name in CLASSES[:2]:
        for split in ("train", "val"):
            save_image(tmp_path / split / name / "gray.png", size=(30, 22), value=128)
    images, _ = next(iter(pytorch_backend.val_loader(config(tmp_path))))
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(images, expected.view(1, 3, 1, 1).expand_as(images), atol=1e-5)


def test_channels_last_output(folder):
    cfg = config(folder, memory_format=torch.channels_last)
    for make in (pytorch_backend.train_loader, pytorch_backend.val_loader):
        images, _ = next(iter(make(cfg)))
        assert images.is_contiguous(memory_format=torch.channels_last)


def test_val_scores_every_file_once_in_order_across_ranks(tmp_path):
    # each val image is uniform with a distinct value, so the output tells which file it came from
    value = 10
    for name in CLASSES:
        save_image(tmp_path / "train" / name / "x.png", value=0)
        for i in range(3):
            save_image(tmp_path / "val" / name / f"{i}.png", value=value)
            value += 20
    samples = scan_split(str(tmp_path), "val").samples
    file_values = [10 + 20 * i for i in range(len(samples))]
    seen = []
    for rank in (0, 1):
        loader = pytorch_backend.val_loader(config(tmp_path, rank=rank, world_size=2))
        got = [(int(v), int(label)) for images, labels in batches(loader)
               for v, label in zip(denormalise(images)[:, 0, 0, 0], labels)]
        expected = [(file_values[i], samples[i][1]) for i in range(rank, len(samples), 2)]
        assert got == expected  # not shuffled: sampling order
        seen += [v for v, _ in got]
    assert sorted(seen) == file_values  # every file exactly once


# ---------------------------------------------------------------- pytorch backend: determinism

def test_train_batches_do_not_depend_on_workers(folder):
    single = pytorch_backend.train_loader(config(folder, augmentation="trivialaugment"))
    multi = pytorch_backend.train_loader(config(folder, augmentation="trivialaugment", workers=2))
    for epoch in (0, 1):  # two epochs: persistent workers must see the new epoch
        for (a, la), (b, lb) in zip(batches(single, epoch), batches(multi, epoch), strict=True):
            assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(batches(single, 0)[0][0], batches(single, 1)[0][0])


def test_mid_epoch_resume_replays_the_rest_of_the_epoch(folder):
    loader = pytorch_backend.train_loader(config(folder, batch_size=2, augmentation="randaugment"))
    full = batches(loader, epoch=3)
    resumed = batches(pytorch_backend.train_loader(config(folder, batch_size=2, augmentation="randaugment")),
                      epoch=3, start_batch=4)
    assert len(full) == 7 and len(resumed) == 3
    for (a, la), (b, lb) in zip(full[4:], resumed, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_seed_changes_the_augmentation(folder):
    a = batches(pytorch_backend.train_loader(config(folder, seed=1)))
    b = batches(pytorch_backend.train_loader(config(folder, seed=2)))
    assert not torch.equal(a[0][0], b[0][0])


def test_decoding_leaves_the_global_rng_alone(folder, monkeypatch):
    loader = pytorch_backend.train_loader(config(folder))
    dataset = loader.source.dataset
    # With --workers 0 on a GPU, torch.manual_seed would also reseed every CUDA generator
    # (dropout, stochastic depth) for each sample: only the CPU generator may be seeded.
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    state = torch.get_rng_state()
    first = dataset[(0, 1)].image
    assert torch.equal(torch.get_rng_state(), state) and reseeded == []
    assert torch.equal(dataset[(0, 1)].image, first) and not torch.equal(dataset[(1, 1)].image, first)

# ---------------------------------------------------------------- bad data

@pytest.fixture()
def bad_folder(tmp_path):
    make_folder(tmp_path, classes=("a", "b"), train_per_class=3, val_per_class=3)
    val_a = tmp_path / "val" / "a"
    good = (val_a / "0.jpg").read_bytes()
    (val_a / "corrupt.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 500, np.uint8).tobytes())
    (val_a / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (val_a / "empty.jpg").write_bytes(b"")
    (val_a / "notes.jpg").write_text("this is not an image\n")
    (val_a / "readme.txt").write_text("ignored: not an image extension\n")
    return tmp_path


def test_unreadable_files_are_skipped_and_reported(bad_folder):
    scan = scan_split(str(bad_folder), "val")
    assert [os.path.basename(p) for p in scan.zero_byte] == ["empty.jpg"]
    assert not any(p.endswith((".txt", "empty.jpg")) for p, _ in scan.samples)
    assert len(scan.samples) == 9
    loader = pytorch_backend.val_loader(config(bad_folder, batch_size=4))
    result = batches(loader)
    assert sum(len(labels) for _, labels in result) == 6
    assert all(images.shape[1:] == (3, SIZE, SIZE) for images, _ in result)
    skipped = sorted(os.path.basename(p) for p in loader.take_skipped())
    assert skipped == ["corrupt.jpg", "notes.jpg", "truncated.jpg"]
    assert loader.take_skipped() == []


def test_evaluate_names_the_validation_files_it_skipped(bad_folder, tmp_path, capsys):
    """--evaluate scores the readable images and says which were left out (before: only the
    training loop reported them, so an evaluation's top-1 silently covered fewer images)."""
    from image_classification import cli
    from image_classification.models.registry import ModelSpec
    from tests.helpers.registered import registered_model

    def tiny(num_classes: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                   torch.nn.Linear(4, num_classes))
    with registered_model(ModelSpec("evaluate-cnn", "test", tiny, default_image_size=16)):
        assert cli.main(["--arch", "evaluate-cnn", "--data-backend", "pytorch", "--evaluate", "--image-size", "16",
                         "-b", "4", "--workers", "0", "--device", "cpu", "--workspace", str(tmp_path / "ws"),
                         str(bad_folder)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "unreadable file(s)" in line)
    assert "epoch 0: skipped 3 unreadable file(s):" in line
    assert all(name in line for name in ("corrupt.jpg", "notes.jpg", "truncated.jpg"))


def test_batch_of_only_unreadable_files_is_dropped(bad_folder):
    loader = pytorch_backend.val_loader(config(bad_folder, batch_size=1, workers=2))
    assert len(loader) == 9
    assert len(batches(loader)) == 6
    assert len(loader.take_skipped()) == 3


def test_device_loader_drops_empty_batches():
    empty = (torch.empty(0, 3, 2, 2, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), ["x.jpg"])
    full = (torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64), [])
    loader = DeviceLoader([empty, full], device=torch.device("cpu"), memory_format=torch.contiguous_format,
                          num_classes=1, class_names=["0"],
                          sampler=sampling.ShardSampler(2, batch_size=1, rank=0, world_size=1, seed=0, train=False))
    assert [labels.tolist() for _, labels in loader] == [[0]]
    assert loader.take_skipped() == ["x.jpg"]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_normalize_gives_imagenet_floats_in_the_batch_layout(memory_format):
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    normalized = Normalize(torch.device("cpu"), memory_format)(images)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert normalized.dtype == torch.float32 and normalized.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(normalized, (images.float() / 255 - mean) / std)


def _odd_images(directory) -> dict[str, str]:
    """Gray, CMYK, RGBA and 16-bit files in ``directory``, by kind."""
    os.makedirs(directory, exist_ok=True)
    paths = {k: os.path.join(directory, f"{k}.{ext}") for k, ext in
             (("gray", "jpg"), ("cmyk", "jpg"), ("rgba", "png"), ("gray16", "png"), ("palette", "png"))}
    Image.new("L", (30, 20), 128).save(paths["gray"])
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(paths["cmyk"])  # red
    rgba = Image.new("RGBA", (30, 20), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 15, 20))  # left half fully transparent
    rgba.save(paths["rgba"])
    Image.fromarray(np.full((20, 30), 32896, np.uint16)).save(paths["gray16"])  # 32896 / 257 = 128
    palette = Image.new("P", (30, 20), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.save(paths["palette"], transparency=0)
    return paths


def test_odd_image_modes_open_as_8bit_rgb(tmp_path):
    paths = _odd_images(tmp_path)
    images = {kind: open_rgb(path) for kind, path in paths.items()}
    assert all(image.mode == "RGB" and image.size == (30, 20) for image in images.values())
    assert abs(np.asarray(images["gray"]).astype(int) - 128).max() <= 2
    assert np.asarray(images["gray16"]).max() == 128  # scaled, not clipped to 255
    red = np.asarray(images["cmyk"]).astype(int)[10, 20]
    assert red[0] > 200 and red[1] < 50 and red[2] < 50
    rgba = np.asarray(images["rgba"])
    assert rgba[10, 2].tolist() == [255, 255, 255] and rgba[10, 25].tolist() == [0, 0, 255]
    assert np.asarray(images["palette"])[0, 0].tolist() == [0, 200, 0]


def test_odd_image_modes_load_through_the_backend(tmp_path):
    for split in ("train", "val"):
        _odd_images(tmp_path / split / "odd")
        save_image(tmp_path / split / "plain" / "x.jpg")
    loader = pytorch_backend.val_loader(config(tmp_path, batch_size=8))
    (images, labels), = batches(loader)
    assert images.shape == (6, 3, SIZE, SIZE) and loader.take_skipped() == []


@pytest.mark.parametrize("policy", ["autoaugment", "randaugment", "trivialaugment"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_augmentation_policies_on_real_files(tmp_path, policy, interpolation):
    paths = _odd_images(tmp_path)
    paths["rgb"] = save_image(tmp_path / "rgb.jpg", size=(40, 30))
    transform, plain = train_transform(SIZE, interpolation, policy), train_transform(SIZE, interpolation)
    for path in paths.values():
        changed = 0
        for seed in range(5):
            torch.manual_seed(seed)
            out = transform(open_rgb(path))
            assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.uint8
            torch.manual_seed(seed)
            assert torch.equal(transform(open_rgb(path)), out)  # seeded: the same draws again
            torch.manual_seed(seed)  # the same crop and flip without the policy
            changed += not torch.equal(plain(open_rgb(path)), out)
        assert changed >= 2, (path, changed)  # the policy really changes pixels


def test_val_transform_resizes_shorter_side_then_center_crops():
    image = Image.new("RGB", (60, 30), (1, 2, 3))
    out = val_transform(16, 20, "bicubic")(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    assert out[:, 0, 0].tolist() == [1, 2, 3]


def test_triangular_interpolation_is_dali_only(folder):
    with pytest.raises(UserError, match="dali"):
        pytorch_backend.train_loader(config(folder, interpolation="triangular"))
    with pytest.raises(UserError, match="bilinear"):
        val_transform(SIZE, 20, "lanczos")


# ---------------------------------------------------------------- layout checks

def test_layout_errors_are_one_actionable_line(tmp_path):
    cases = []
    with pytest.raises(UserError, match="does not exist") as error:
        check_dataset(str(tmp_path / "nowhere"))
    cases.append(error)
    save_image(tmp_path / "val" / "a" / "0.jpg")
    with pytest.raises(UserError, match=r"no train/ folder .*ImageFolder layout") as error:
        pytorch_backend.train_loader(config(tmp_path))
    cases.append(error)
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match="no class folders") as error:
        check_dataset(str(tmp_path))
    cases.append(error)
    with pytest.raises(UserError, match="no data directory"):
        pytorch_backend.val_loader(config(None))
    assert all("\n" not in str(e.value) for e in cases)


def test_missing_val_folder(tmp_path):
    save_image(tmp_path / "train" / "a" / "0.jpg")
    assert len(pytorch_backend.train_loader(config(tmp_path, batch_size=1))) == 1  # --training-only is fine
    with pytest.raises(UserError, match="no val/ folder"):
        pytorch_backend.val_loader(config(tmp_path))


def test_val_only_dataset_numbers_its_own_classes(tmp_path):
    save_image(tmp_path / "val" / "b" / "0.jpg")
    save_image(tmp_path / "val" / "a" / "0.jpg")
    assert scan_split(str(tmp_path), "val").class_names == ["a", "b"]


def test_empty_class_folder_is_named(tmp_path):
    make_folder(tmp_path, classes=("a", "b"), train_per_class=1, val_per_class=1)
    (tmp_path / "train" / "c").mkdir()
    (tmp_path / "val" / "c").mkdir()
    (tmp_path / "val" / "c" / "empty.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"train/c has no images"):
        pytorch_backend.train_loader(config(tmp_path))
    with pytest.raises(UserError, match=r"val/c has no usable images \(only 1 zero-byte"):
        pytorch_backend.val_loader(config(tmp_path))


def test_val_classes_must_match_train(tmp_path):
    make_folder(tmp_path, classes=("a", "b", "c"), train_per_class=1, val_per_class=0)
    for name in ("a", "b", "x"):
        save_image(tmp_path / "val" / name / "0.jpg")
    for make in (pytorch_backend.train_loader, pytorch_backend.val_loader):
        with pytest.raises(UserError, match=r"missing from val/: c; 1 val class\(es\) not in train/: x"):
            make(config(tmp_path))


def test_hidden_entries_and_other_extensions_are_ignored(tmp_path):
    make_folder(tmp_path, classes=("a",), train_per_class=2, val_per_class=1)
    save_image(tmp_path / "train" / ".ipynb_checkpoints" / "0.jpg")
    (tmp_path / "train" / "a" / "._0.jpg").write_bytes(b"\0" * 10)
    (tmp_path / "train" / "a" / "labels.csv").write_text("x\n")
    save_image(tmp_path / "train" / "a" / "nested" / "deep.PNG")
    scan = scan_split(str(tmp_path), "train")
    assert scan.class_names == ["a"]
    assert [os.path.relpath(p, scan.root) for p, _ in scan.samples] == ["a/0.jpg", "a/1.jpg", "a/nested/deep.PNG"]


def test_too_few_images_for_one_batch(folder):
    with pytest.raises(UserError, match="lower --batch-size"):
        pytorch_backend.train_loader(config(folder, batch_size=16))


# ---------------------------------------------------------------- synthetic backend

def test_synthetic_is_finite_deterministic_and_on_contract():
    cfg = config(None, num_classes=5, synthetic_epoch_size=40, memory_format=torch.channels_last, seed=3)
    loader = synthetic_backend.train_loader(cfg)
    first = batches(loader)
    assert len(loader) == len(first) == 10
    images, labels = first[0]
    assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 5
    assert loader.class_names == ["0", "1", "2", "3", "4"] and loader.take_skipped() == []
    again = batches(synthetic_backend.train_loader(cfg))
    assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(first, again))
    assert len(batches(loader, epoch=1, start_batch=7)) == 3
    other = batches(synthetic_backend.train_loader(dataclasses.replace(cfg, seed=4)))
    assert not torch.equal(first[0][0], other[0][0])


def test_synthetic_epoch_lengths():
    assert len(synthetic_backend.train_loader(config(None, num_classes=3))) == 64
    val = synthetic_backend.val_loader(config(None, num_classes=3, synthetic_epoch_size=21, world_size=2, rank=1))
    assert [len(labels) for _, labels in val] == [4, 4, 2]  # rank 1 of 2 holds 10 of 21 samples
    with pytest.raises(UserError, match="smaller than one global batch"):
        synthetic_backend.train_loader(config(None, synthetic_epoch_size=5, world_size=2))


# ---------------------------------------------------------------- digits export

def test_digits_export_counts_split_and_idempotence(tmp_path):
    out = tmp_path / "digits"
    result = write_digits(str(out), size=8, val_fraction=0.25, seed=1)
    assert result["written"] and result["classes"] == 10
    assert result["train"] + result["val"] == 1797 and result["val"] == 450  # ceil(0.25 * 1797)
    train, val = scan_split(str(out), "train"), scan_split(str(out), "val")
    assert len(train.samples) == result["train"] and len(val.samples) == result["val"]
    assert train.class_names == [str(d) for d in range(10)]
    for label in range(10):  # stratified: each class is split in the same proportion
        n_val = sum(1 for _, c in val.samples if c == label)
        n_all = n_val + sum(1 for _, c in train.samples if c == label)
        assert abs(n_val - 0.25 * n_all) <= 1
    assert open_rgb(val.samples[0][0]).size == (8, 8)
    stamp = os.stat(val.samples[0][0]).st_mtime_ns
    assert write_digits(str(out), size=8, val_fraction=0.25, seed=1)["written"] is False
    assert os.stat(val.samples[0][0]).st_mtime_ns == stamp
    assert write_digits(str(out), size=8, val_fraction=0.2, seed=1)["val"] == 360  # other settings: rewritten
    assert len(scan_split(str(out), "val").samples) == 360


def test_digits_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a digits export"):
        write_digits(str(tmp_path))
    assert os.listdir(tmp_path) == ["mine.txt"]


def test_a_registered_backend_can_be_chosen_on_the_command_line():
    from image_classification import config
    from image_classification.data import registry
    from image_classification.data.loaders import synthetic
    from tests.helpers.registered import registered_backend

    def backend_choices() -> list[str]:
        return [action.choices for action in config.parser_actions(config.build_parser())
                if action.dest == "data_backend"][0]

    built_in = registry.names()
    with registered_backend("test-synthetic", lambda: synthetic.BACKEND):
        # Before: config.py listed the built-in four, so argparse refused any other name.
        args = config.parse_args(["--data-backend", "test-synthetic", "--arch", "resnet18"])
        assert args.data_backend == "test-synthetic" and registry.get("test-synthetic") is synthetic.BACKEND
        assert backend_choices() == [*built_in, "test-synthetic"]
    assert backend_choices() == built_in == registry.names()  # unregistered: gone from the choices too
    with pytest.raises(SystemExit):
        config.parse_args(["--data-backend", "test-synthetic"])


# ---------------------------------------------------------------- forked workers inherit no garbage

class _Finalised:
    """A garbage cycle whose finaliser records the process that ran it (a stand-in for a left-over
    DALI Pipeline, whose __del__ joins threads that only the parent has: in a worker it hangs)."""

    def __init__(self, record: Path):
        self.record, self.cycle = record, self

    def __del__(self):
        with open(self.record, "a") as file:
            file.write(f"{os.getpid()}\n")


class _CollectingDataset(torch.utils.data.Dataset):
    """Each worker runs its GC while it serves a sample, as any allocation-heavy worker may."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        gc.collect()
        return torch.tensor(index)


def test_loader_workers_fork_without_inheriting_garbage(tmp_path):
    from image_classification.data.loaders.pytorch import HeldStartLoader
    record = tmp_path / "finalised-by"
    gc.disable()  # keep the cycle alive as garbage until the loader starts its workers
    try:
        _Finalised(record)
        loader = HeldStartLoader(_CollectingDataset(), batch_size=2, num_workers=2, persistent_workers=True)
        assert [batch.tolist() for batch in loader] == [[0, 1], [2, 3]]
        assert [batch.tolist() for batch in loader] == [[0, 1], [2, 3]]  # the persistent workers again
        del loader
    finally:
        gc.enable()
    # Before: the first worker's GC ran the finaliser in the child, and the parent's never did.
    assert record.read_text().split() == [str(os.getpid())]
