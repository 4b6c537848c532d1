"""The reduced JPEG decode of the training crop: size rule, crop geometry, per-sample seeding."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from image_classification.data.loaders.decode import CropDecoder, reduction, split_crop
from image_classification.data.loaders.pytorch import SourceDataset, sample_seed
from image_classification.data.loaders.transforms import open_rgb, train_transform
from image_classification.data.sources import FolderSource
from image_classification.data.sources.folder import SplitScan

WIDTH, HEIGHT = 400, 300


def _source(samples: list[tuple[str, int]]) -> FolderSource:
    names = [str(k) for k in range(max(label for _, label in samples) + 1)]
    return FolderSource(SplitScan(root="", class_names=names, samples=samples))


def structured_image(seed: int = 0) -> np.ndarray:
    """Smooth ramps plus a few hard-edged blocks: a misplaced crop window changes many pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    pixels = np.stack([255 * x / WIDTH, 255 * y / HEIGHT, 128 + 100 * np.sin(x / 23 + y / 31)], axis=-1)
    for _ in range(12):
        top, left = rng.integers(0, HEIGHT - 40), rng.integers(0, WIDTH - 40)
        pixels[top:top + 40, left:left + 40] = rng.uniform(0, 255, 3)
    return pixels.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory):
    path = tmp_path_factory.mktemp("decode") / "image.jpg"
    Image.fromarray(structured_image()).save(path, quality=95)
    return str(path)


def test_reduction_is_the_largest_scale_keeping_the_output_size():
    assert reduction(512, 600, 64, 64) == 8
    assert reduction(511, 600, 64, 64) == 4
    assert reduction(256, 255, 64, 64) == 2
    assert reduction(128, 128, 64, 64) == 2
    assert reduction(127, 500, 64, 64) == 1
    assert reduction(20, 20, 64, 64) == 1  # smaller than the output: enlarged from a full decode
    assert reduction(300, 100, 32, 48) == 2  # each side against its own output side


def test_reduced_decode_keeps_crop_geometry_size_and_random_stream(jpeg):
    size = 48
    crop = v2.RandomResizedCrop(size, antialias=True)
    reduced, full = CropDecoder(crop), CropDecoder(crop, reduce=False)
    factors = set()
    for seed in range(40):
        torch.manual_seed(seed)
        expected = crop.make_params([open_rgb(jpeg)])  # the crop drawn on the fully decoded image
        after_expected = torch.rand(3)
        torch.manual_seed(seed)
        image, (left, top, right, bottom), factor = reduced.decode(jpeg)
        after_reduced = torch.rand(3)
        factors.add(factor)
        # identical geometry in original-image pixels, and the same draws consumed
        assert [round(v * factor, 6) for v in (left, top, right - left, bottom - top)] == \
            [expected[k] for k in ("left", "top", "width", "height")]
        assert torch.equal(after_reduced, after_expected)
        # the decoded image is the JPEG at 1/factor and the window still has the output resolution
        assert image.size == (math.ceil(WIDTH / factor), math.ceil(HEIGHT / factor))
        assert right - left >= size and bottom - top >= size
        assert factor == reduction(expected["height"], expected["width"], size, size)
        # the output matches the full decode up to resampling (a misplaced window would not)
        torch.manual_seed(seed)
        small = np.asarray(reduced(jpeg), dtype=np.int16)
        torch.manual_seed(seed)
        big = np.asarray(full(jpeg), dtype=np.int16)
        assert small.shape == big.shape == (size, size, 3)
        assert np.abs(small - big).mean() < 4, (seed, factor)
    assert {1, 2, 4} <= factors  # the test exercised each reduction this image allows at 48 px


def test_full_decode_path_is_bit_identical_to_the_torchvision_chain(jpeg, tmp_path):
    png = tmp_path / "image.png"  # not a JPEG: never reduced
    Image.fromarray(structured_image(1)).save(png)
    chain = train_transform(40, "bicubic")
    decode, rest = split_crop(chain)
    for path in (jpeg, str(png)):
        for seed in range(6):
            torch.manual_seed(seed)
            old = chain(open_rgb(path))
            torch.manual_seed(seed)
            new = rest(CropDecoder(chain.transforms[0], reduce=False)(path))
            assert torch.equal(new, old)
            if path == str(png):
                torch.manual_seed(seed)
                assert torch.equal(rest(decode(path)), old)


def test_dataset_samples_keep_their_per_sample_seeds(jpeg, tmp_path, monkeypatch):
    """Sample (epoch, index) is what the full-decode chain gives under the same sample seed.

    Seeding touches only the CPU generator: torch.manual_seed also queues accelerator seeding with
    a formatted stack trace, which costs more than decoding a small crop.
    """
    png = tmp_path / "image.png"
    Image.fromarray(structured_image(2)).save(png)
    samples = [(jpeg, 0), (str(png), 1)]
    chain = train_transform(32)
    decode, rest = split_crop(chain)
    dataset = SourceDataset(_source(samples), rest, seed=5, decode=decode)
    generator_before = torch.get_rng_state()
    for epoch in range(3):
        for index, (path, label) in enumerate(samples):
            torch.manual_seed(sample_seed(5, epoch, index))
            expected = chain(open_rgb(path)).to(torch.int16)
            with monkeypatch.context() as patch:
                patch.setattr(torch, "manual_seed", lambda seed: pytest.fail("dataset called torch.manual_seed"))
                sample = dataset[epoch, index]
            assert sample.label == label and sample.image.shape == (3, 32, 32)
            difference = (sample.image.to(torch.int16) - expected).abs().float().mean()
            assert difference == 0 if path.endswith(".png") else difference < 4
    torch.set_rng_state(generator_before)


def test_unreadable_file_is_skipped_by_the_crop_decoder(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    decode, rest = split_crop(train_transform(16))
    sample = SourceDataset(_source([(str(bad), 3)]), rest, seed=0, decode=decode)[0]
    assert sample.image is None and sample.label == 3 and sample.path == str(bad)
