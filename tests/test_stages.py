"""Stage-wise training: the schedule, the regularisation ramp, every backend switching sizes,
exact mid-stage resume, --eval-image-size and the one-line errors."""
import pytest
import torch
from torch import nn

from image_classification import cli, config
from image_classification.checkpoints.files import read_pth
from image_classification.engine import trainer
from image_classification.engine.stages import StageSchedule
from image_classification.errors import UserError
from tests.helpers.registered import model_for_module
from image_classification.reporting.dllogger import read_raport
from tests.helpers.faults import sigterm_at_step


def _stage_cnn(num_classes: int = 10) -> nn.Module:
    """Tiny, size-agnostic and BatchNorm-free (fast, and exact across resumes)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


_stage_cnn_registered = model_for_module("stage-cnn", _stage_cnn)


# 100 training images, batch 8: 12 batches per epoch; stage 0 = epochs 0-1 at 16 px, stage 1 = 2-3 at 24 px.
STAGED = ["--arch", "stage-cnn", "--n-stages", "2", "--base-image-size", "16", "--image-size", "24", "--epochs", "4",
          "-b", "8", "--lr", "0.05", "--mixup", "0.4", "--label-smoothing", "0.1", "--workers", "1", "--seed", "3",
          "--device", "cpu", "--print-freq", "4"]


def epoch_records(raport) -> dict[int, dict]:
    return {r["step"][0]: r["data"] for r in read_raport(raport) if r.get("type") == "LOG"
            and isinstance(r["step"], list) and len(r["step"]) == 1}


def parameters(raport) -> dict:
    return next(r["data"] for r in read_raport(raport) if r.get("step") == "PARAMETER")


def run(args, workspace, data=None, hooks=None) -> int:
    return cli.main([*args, "--workspace", str(workspace), *([str(data)] if data else [])], hooks=hooks)


def recording_batches() -> tuple[list, trainer.Hooks]:
    """Hooks that record (height, width) of every training batch and the MixUp alpha it is mixed
    with (0 = none)."""
    seen = []

    def record(images, target, mixer):
        seen.append((tuple(images.shape[-2:]), float(getattr(mixer, "alpha", 0.0))))
    return seen, trainer.Hooks(before_batch=record)


# ---------------------------------------------------------------- the schedule

def test_two_stages_over_four_epochs_train_at_32_then_64_px():
    schedule = StageSchedule(n_stages=2, epochs=4, base_size=32, final_size=64)
    assert [schedule.at(e).image_size for e in range(4)] == [32, 32, 64, 64]


def test_stage_sizes_are_linear_and_intermediate_ones_multiples_of_16():
    schedule = StageSchedule(n_stages=4, epochs=10, base_size=64, final_size=224)
    assert [(s.first_epoch, s.image_size) for s in schedule.stages] == [(0, 64), (2, 112), (5, 176), (7, 224)]
    assert [schedule.at(e).index for e in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    odd = StageSchedule(n_stages=3, epochs=3, base_size=17, final_size=20)  # 18.5 rounds to 16 < base: clamped
    assert [s.image_size for s in odd.stages] == [17, 17, 20]
    assert [s.image_size for s in StageSchedule(n_stages=1, epochs=5, base_size=8, final_size=40).stages] == [40]


def test_regularisation_grows_to_the_given_values_in_the_last_stage():
    schedule = StageSchedule(n_stages=3, epochs=6, base_size=32, final_size=64, mixup=0.2, cutmix=1.0,
                             randaugment_magnitude=15)
    assert [s.mixup for s in schedule.stages] == pytest.approx([0.0, 0.1, 0.2])
    assert [s.cutmix for s in schedule.stages] == pytest.approx([0.0, 0.5, 1.0])
    assert [s.randaugment_magnitude for s in schedule.stages] == [5, 10, 15]
    weak = StageSchedule(n_stages=2, epochs=2, base_size=32, final_size=64, randaugment_magnitude=3)
    assert [s.randaugment_magnitude for s in weak.stages] == [3, 3]  # the floor never exceeds the target
    single = StageSchedule(n_stages=1, epochs=2, base_size=64, final_size=64, mixup=0.2, randaugment_magnitude=9)
    assert (single.stages[0].mixup, single.stages[0].randaugment_magnitude) == (0.2, 9)  # N=1: as without stages


# ---------------------------------------------------------------- one-line errors

@pytest.mark.parametrize("argv, message", [
    (["--n-stages", "2", "--base-image-size", "48", "--image-size", "32", "--epochs", "4"],
     "error: --base-image-size 48 is larger than the final --image-size 32"),
    (["--n-stages", "5", "--epochs", "4", "--image-size", "32"],
     "error: --n-stages 5 is more than --epochs 4: every stage needs an epoch"),
    (["--base-image-size", "16", "--epochs", "4"], "error: --base-image-size needs --n-stages 2 or more"),
    (["--augmentation", "randaugment", "--randaugment-magnitude", "31"],
     "error: --randaugment-magnitude must be in 0..30, got 31"),
    (["--n-stages", "2", "--base-image-size", "16", "--image-size", "32", "--amp", "--amp-dtype", "bfloat16", "--epochs", "2"],
     "error: image size 16 with --amp on the CPU hits a PyTorch bug"),
])
def test_impossible_schedules_are_one_line_errors(argv, message, tmp_path, capsys):
    assert run(["--arch", "stage-cnn", "--data-backend", "synthetic", "--device", "cpu", "-b", "2", *argv],
               tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    with pytest.raises(SystemExit):  # argparse's own one-line errors
        config.parse_args(["--n-stages", "0"])


# ---------------------------------------------------------------- every backend changes size

@pytest.mark.parametrize("backend", ["synthetic", "pytorch", "dali-cpu"])
def test_every_backend_trains_each_stage_at_its_size(backend, small_digits_dir, tmp_path):
    args = [*STAGED, "--data-backend", backend, "--epochs", "2", "--n-stages", "2", "--eval-image-size", "20",
            "--memory-format", "nhwc", "--prof", "2"]
    if backend == "synthetic":
        args += ["--synthetic-epoch-size", "32", "--num-classes", "10"]
    batch_sizes, hooks = recording_batches()
    assert run(args, tmp_path, None if backend == "synthetic" else small_digits_dir, hooks=hooks) == 0
    assert [size for size, _ in batch_sizes] == [(16, 16)] * 2 + [(24, 24)] * 2
    assert [alpha for _, alpha in batch_sizes] == [0.0] * 2 + [0.4] * 2  # MixUp only in the last stage
    records = epoch_records(tmp_path / "experiment_raport.json")
    assert [records[e]["train.image_size"] for e in (0, 1)] == [16, 24]
    params = parameters(tmp_path / "experiment_raport.json")
    assert (params["eval_image_size"], params["val_resize_size"]) == (20, 47)  # 20 * (24 + 32) / 24


def test_eval_image_size_sets_the_validation_crop_and_classify_uses_it(small_digits_dir, tmp_path, monkeypatch):
    from image_classification.deploy import loading
    from image_classification.engine.validation import Validator
    crops = []
    original = Validator.score

    def record(validator, model, **kwargs):
        crops.extend(tuple(images.shape[-2:]) for images, _ in validator.loader)
        return original(validator, model, **kwargs)

    monkeypatch.setattr(Validator, "score", record)
    args = ["--arch", "stage-cnn", "--data-backend", "pytorch", "--image-size", "16", "--val-resize-size", "20",
            "--eval-image-size", "24", "-b", "8", "--epochs", "1", "--workers", "0", "--seed", "1", "--device", "cpu"]
    assert run(args, tmp_path, small_digits_dir) == 0
    assert crops and set(crops) == {(24, 24)}
    loaded = loading.load_model("stage-cnn", str(tmp_path / "checkpoint.pth.tar"))
    assert (loaded.preprocessing.image_size, loaded.preprocessing.resize_size) == (24, 30)  # the 16 -> 20 ratio kept


# ---------------------------------------------------------------- exact mid-stage resume

def test_interrupted_mid_stage_resume_reproduces_the_uninterrupted_run(small_digits_dir, tmp_path):
    args = [*STAGED, "--data-backend", "pytorch"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(args, straight, small_digits_dir) == 0
    # 5 batches into epoch 2, the first epoch of stage 1
    assert run(args, split, small_digits_dir, hooks=sigterm_at_step(12 * 2 + 5)) == 0
    saved = read_pth(split / "checkpoint.pth.tar")
    assert (saved["epoch"], saved["step_in_epoch"]) == (2, 5)
    assert run([*args, "--resume", str(split / "checkpoint.pth.tar")], split, small_digits_dir) == 0
    expected, resumed = epoch_records(straight / "experiment_raport.json"), epoch_records(split / "experiment_raport.json")
    # (epoch 2's train.loss averages only the batches this invocation trained)
    assert resumed[3]["train.loss"] == expected[3]["train.loss"]
    for epoch in (2, 3):
        for metric in ("train.image_size", "val.loss", "val.top1"):
            assert resumed[epoch][metric] == expected[epoch][metric], (epoch, metric)
    final_a = read_pth(straight / "checkpoint.pth.tar")["state_dict"]
    final_b = read_pth(split / "checkpoint.pth.tar")["state_dict"]
    assert all(torch.equal(t, final_b[k]) for k, t in final_a.items())


def test_schedule_errors_are_user_errors():
    with pytest.raises(UserError, match="larger than the final"):
        StageSchedule(n_stages=2, epochs=2, base_size=65, final_size=64)


@pytest.mark.parametrize("backend", ["pytorch", "dali-cpu"])
def test_randaugment_flags_and_ramp_reach_the_backend(backend, small_digits_dir, tmp_path, monkeypatch):
    calls = []
    if backend == "dali-cpu":
        from nvidia.dali.auto_aug import rand_augment
        original = rand_augment.rand_augment

        def record(images, n, m, **kwargs):
            calls.append((n, m))
            return original(images, n, m, **kwargs)
        monkeypatch.setattr(rand_augment, "rand_augment", record)
    else:
        from image_classification.data.loaders import transforms
        original = transforms.v2.RandAugment

        def record(num_ops, magnitude, **kwargs):
            calls.append((num_ops, magnitude))
            return original(num_ops=num_ops, magnitude=magnitude, **kwargs)
        monkeypatch.setattr(transforms.v2, "RandAugment", record)
    args = [*STAGED, "--data-backend", backend, "--epochs", "2", "--augmentation", "randaugment",
            "--randaugment-num-ops", "3", "--randaugment-magnitude", "12", "--prof", "1", "--training-only"]
    assert run(args, tmp_path, small_digits_dir) == 0
    assert calls == [(3, 5), (3, 12)]  # stage 0 at the floor, the last stage at the given magnitude
