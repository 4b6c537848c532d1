"""A run's settings are resolved once (image_classification/settings.py) and then read-only; the
resolved preprocessing record (mean/std included) is what the loaders use."""
import argparse

import pytest
import torch

import model2onnx
from image_classification import cli, config, settings
from image_classification.checkpoints import writer
from image_classification.models import registry
from image_classification.preprocessing import EvalPreprocessing
from image_classification.reporting.dllogger import read_raport
from tests.helpers.tiny_data import write_imagefolder


def _parsed(*argv: str) -> argparse.Namespace:
    return config.parse_args([*argv, "/data"])


def test_resolved_flags_are_read_only_and_replace_makes_a_new_copy():
    flags = settings.resolve(_parsed("--arch", "resnet18"), default_image_size=224).flags
    with pytest.raises(AttributeError, match="image_size is read-only"):
        flags.image_size = 128
    smaller = flags.replace(image_size=128)
    assert (flags.image_size, smaller.image_size) == (224, 128)
    assert vars(smaller) == {**vars(flags), "image_size": 128}


@pytest.mark.parametrize("argv, expected", [
    ([], dict(image_size=224, val_resize_size=256, eval_image_size=224, base_image_size=224, interpolation="bilinear")),
    (["--image-size", "160", "--n-stages", "2"], dict(image_size=160, val_resize_size=192, base_image_size=80)),
    (["--image-size", "128", "--val-resize-size", "146", "--eval-image-size", "192"],
     # the resize for --eval-image-size keeps the trained ratio: round(192 * 146 / 128) = 219
     dict(image_size=128, eval_image_size=192, val_resize_size=219)),
    (["--interpolation", "bicubic", "--gather-checkpoints", "3"], dict(interpolation="bicubic", gather_checkpoints=3)),
])
def test_resolve_fills_what_the_flags_leave_open(argv, expected):
    flags = settings.resolve(_parsed(*argv), default_image_size=224).flags
    assert {key: getattr(flags, key) for key in expected} == expected


def test_a_resumed_run_keeps_its_retention_and_an_onnx_record_sets_the_defaults():
    saved = EvalPreprocessing(200, 232, "bicubic", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    resolved = settings.resolve(_parsed(), default_image_size=224, saved=saved, saved_image_size=200,
                                resume="/ws/checkpoint.pth.tar", resume_config={"gather_checkpoints": 2})
    flags = resolved.flags
    assert (flags.image_size, flags.val_resize_size, flags.interpolation) == (200, 232, "bicubic")
    assert (flags.gather_checkpoints, flags.resume) == (2, "/ws/checkpoint.pth.tar")
    assert resolved.evaluation == saved  # mean and std too


def test_evaluate_onnx_normalises_with_the_mean_and_std_recorded_in_the_file(tmp_path):
    """Before: the loaders always normalised with ImageNet's mean/std, whatever the file recorded."""
    torch.manual_seed(0)
    model = registry.get("resnet18").build(num_classes=3).eval()
    record = EvalPreprocessing(32, 40, "bilinear", (0.3, 0.6, 0.2), (0.5, 0.1, 0.3))
    state = {"epoch": 1, "arch": "resnet18", "num_classes": 3, "class_names": ["bird", "cat", "dog"],
             "state_dict": model.state_dict(), "eval_preprocessing": record.as_dict(),
             "config": {"image_size": 32, "val_resize_size": 40}}
    writer.save(state, tmp_path, epoch_index=None, is_best=False, filename="run.pth.tar")
    onnx_file = tmp_path / "model.onnx"
    assert model2onnx.main(["--weights", str(tmp_path / "run.pth.tar"), "--device", "cpu", "--output",
                            str(onnx_file), "--no-check"]) == 0
    data = write_imagefolder(tmp_path / "data", classes=("bird", "cat", "dog"), train_per_class=1, val_per_class=2,
                             size=48)
    assert cli.main(["--evaluate", "--onnx", str(onnx_file), "--data-backend", "pytorch", "-b", "6", "--workers",
                     "0", "--device", "cpu", "--workspace", str(tmp_path / "eval"), str(data)]) == 0
    evaluated = [r["data"] for r in read_raport(tmp_path / "eval" / "experiment_raport.json")
                 if r.get("type") == "LOG" and r["step"] == []][-1]["val.loss"]

    from image_classification.data.loaders.transforms import open_rgb
    paths = sorted((data / "val").glob("*/*"))
    images = torch.stack([record.transform()(open_rgb(str(path))) for path in paths])
    labels = torch.tensor([("bird", "cat", "dog").index(path.parent.name) for path in paths])
    with torch.no_grad():
        logits = model(record.normalize(torch.device("cpu"))(images))
    by_hand = torch.nn.functional.cross_entropy(logits, labels).item()
    imagenet = EvalPreprocessing(32, 40)
    with torch.no_grad():
        with_imagenet = torch.nn.functional.cross_entropy(model(imagenet.normalize(torch.device("cpu"))(images)),
                                                          labels).item()
    assert abs(by_hand - with_imagenet) > 0.01  # the record's statistics matter for this model and data
    assert evaluated == pytest.approx(by_hand, abs=1e-3)
