"""Shared fixtures: small real datasets written once per test session."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn's handwritten digits as an ImageFolder of 32 px JPEGs (1437 train, 360 val)."""
    from image_classification.data.prepare.digits import write_digits
    root = tmp_path_factory.mktemp("digits32")
    write_digits(root, size=32)
    return root


@pytest.fixture(scope="session")
def small_digits_dir(tmp_path_factory) -> Path:
    """A 16 px, 120-image subset of the digits (fast end-to-end runs)."""
    from image_classification.data.prepare.digits import write_digits
    full = tmp_path_factory.mktemp("digits16-full")
    write_digits(full, size=16)
    root = tmp_path_factory.mktemp("digits16")
    for split, per_class in (("train", 10), ("val", 4)):
        for class_dir in sorted((full / split).iterdir()):
            target = root / split / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:per_class]:
                (target / image.name).write_bytes(image.read_bytes())
    return root


@pytest.fixture
def cpu_features(monkeypatch):
    """``fake(*names)``: torch's CPU capability table (as image_classification.precision reads it)
    lists exactly these features. This machine may or may not have native bf16, so both cases are
    tested by faking the table."""
    from image_classification import precision

    def fake(*names: str) -> None:
        table = {"architecture": "x86_64", **{name: True for name in names}}
        monkeypatch.setattr(precision, "cpu_capabilities", lambda: table)
    return fake


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; run them all with `bash benchmarks/gpu_smoke.sh`")
