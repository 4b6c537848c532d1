"""Fine-tuning: pretrained weights of another class count, a classifier-only phase, a smaller backbone LR."""
from pathlib import Path

import pytest
import torch

from image_classification import cli, models
from image_classification.checkpoints.files import read_pth
from image_classification.engine.optim import OptimizerOptions, build_optimizer
from image_classification.engine.schedules import build_scheduler
from image_classification.errors import UserError
from image_classification.models import weights
from image_classification.reporting.dllogger import read_raport
from tests.helpers.faults import sigterm_at_step
from tests.helpers.models import randomise_batch_norm
from tests.helpers.tiny_data import write_imagefolder

# 3 classes x 8 training images, -b 4: 6 steps per epoch.
FINETUNE = ["--arch", "resnet18", "--data-backend", "pytorch", "--image-size", "24", "--val-resize-size", "24",
            "-b", "4", "--lr", "0.05", "--lr-schedule", "cosine", "--warmup", "1", "--use-ema", "0.9",
            "--label-smoothing", "0.1", "--workers", "0", "--seed", "3", "--device", "cpu", "--epochs", "4",
            "--print-freq", "2", "--gather-checkpoints", "-1"]
PHASES = ["--freeze-backbone-epochs", "2", "--backbone-lr-scale", "0.1"]


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("three"), classes=("a", "b", "c"), train_per_class=8,
                             val_per_class=2, size=40)


@pytest.fixture(scope="module")
def ten_class_weights(tmp_path_factory) -> Path:
    """resnet18 weights of a 10-class model (random, with non-trivial BatchNorm statistics)."""
    torch.manual_seed(11)
    model = randomise_batch_norm(models.get("resnet18").build(num_classes=10), weight=True)
    path = tmp_path_factory.mktemp("source") / "W.pth"
    torch.save(model.state_dict(), path)
    return path


def run(args, workspace: Path, data: Path, hooks=None) -> int:
    return cli.main([*args, "--workspace", str(workspace), str(data)], hooks=hooks)


def backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def test_weights_of_another_class_count_load_all_but_a_new_classifier_then_probe_then_fine_tune(
        three_classes, ten_class_weights, tmp_path, capsys):
    assert run([*FINETUNE, *PHASES, "--pretrained-from-file", str(ten_class_weights)], tmp_path, three_classes) == 0
    out = capsys.readouterr().out
    assert out.count(f"=> fc.weight/fc.bias from {ten_class_weights} (10 classes) left out: new classifier for 3 "
                     "classes\n") == 1
    assert "=> epochs 0-1: only the classifier (fc) trains" in out
    source = torch.load(ten_class_weights, weights_only=True)
    probe = read_pth(tmp_path / "checkpoint_0001.pth.tar")   # after the 2 classifier-only epochs
    final = read_pth(tmp_path / "checkpoint_0003.pth.tar")
    assert probe["state_dict"]["fc.weight"].shape == (3, 512)
    # The frozen backbone, BatchNorm statistics included, is the file's to the bit, and so is the EMA's
    # (it started from the loaded model); the classifier trained.
    for key in ("state_dict", "state_dict_ema"):
        for name, tensor in backbone(probe[key]).items():
            assert torch.equal(tensor, source[name]), (key, name)
    start = torch.manual_seed(3) and models.get("resnet18").build(num_classes=3)  # the family's own init of fc
    assert not torch.equal(probe["state_dict"]["fc.weight"], start.fc.weight)
    changed = [name for name, tensor in backbone(final["state_dict"]).items()
               if tensor.is_floating_point() and not torch.equal(tensor, source[name])]
    assert len(changed) == len([k for k, v in backbone(source).items() if v.is_floating_point()])
    # The backbone's groups train at 0.1 x the classifier's LR (groups: classifier, then backbone).
    lrs = [group["initial_lr"] for group in final["optimizer"]["param_groups"]]
    assert len(lrs) == 4 and lrs[0] > 0 and lrs[2] == pytest.approx(0.1 * lrs[0]) and lrs[1] == lrs[0]
    assert final["finetune"] == {"freeze_backbone_epochs": 2, "backbone_lr_scale": 0.1, "classifier": "fc"}


def test_a_resume_in_the_middle_of_each_phase_continues_exactly(three_classes, ten_class_weights, tmp_path):
    start = [*FINETUNE, *PHASES, "--pretrained-from-file", str(ten_class_weights)]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(start, straight, three_classes) == 0
    assert run([*start, "--run-epochs", "1"], split, three_classes) == 0      # epoch 0 of the 2 probe epochs
    resume = [*FINETUNE, "--resume", str(split / "checkpoint.pth.tar")]      # the phases come from the checkpoint
    assert run(resume, split, three_classes, hooks=sigterm_at_step(6 + 3)) == 0  # step 3 of epoch 2: fine-tuning
    saved = read_pth(split / "checkpoint.pth.tar")
    assert (saved["epoch"], saved["step_in_epoch"]) == (2, 3)
    assert run(resume, split, three_classes) == 0
    expected = {r["step"][0]: r["data"] for r in read_raport(straight / "experiment_raport.json")
                if r.get("type") == "LOG" and isinstance(r["step"], list) and len(r["step"]) == 1}
    resumed = {r["step"][0]: r["data"] for r in read_raport(split / "experiment_raport.json")
               if r.get("type") == "LOG" and isinstance(r["step"], list) and len(r["step"]) == 1}
    for epoch in (1, 3):
        assert resumed[epoch]["train.loss"] == expected[epoch]["train.loss"], epoch
    a, b = read_pth(straight / "checkpoint.pth.tar"), read_pth(split / "checkpoint.pth.tar")
    for key in ("state_dict", "state_dict_ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)


def test_efficientnet_stage_wise_fine_tune_replaces_classifier_fc(three_classes, tmp_path, capsys):
    source = models.get("efficientnet-b0").build(num_classes=7)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "b0.pth")
    args = ["--arch", "efficientnet-b0", "--data-backend", "pytorch", "--image-size", "32", "--n-stages", "2",
            "--base-image-size", "16", "-b", "4", "--epochs", "2", "--workers", "0", "--device", "cpu", "--seed", "1",
            "--prof", "2", "--freeze-backbone-epochs", "1", "--pretrained-from-file", str(tmp_path / "b0.pth")]
    assert run(args, tmp_path / "ws", three_classes) == 0
    assert (f"=> classifier.fc.weight/classifier.fc.bias from {tmp_path / 'b0.pth'} (7 classes) left out: "
            "new classifier for 3 classes") in capsys.readouterr().out
    final = read_pth(tmp_path / "ws" / "checkpoint.pth.tar")
    assert final["state_dict"]["classifier.fc.weight"].shape == (3, 1280)
    assert final["finetune"]["classifier"] == "classifier.fc"


def test_only_the_classifier_may_differ(tmp_path):
    resnet34 = models.get("resnet34").build(num_classes=10)
    ours = models.get("resnet18").build(num_classes=3)
    with pytest.raises(UserError, match=r"^weights in W.pth do not fit --arch resnet18: 96 unexpected keys "
                                        r"\(e.g. layers.0.2.conv1.weight\)$"):
        weights.load_state_dict_into(ours, resnet34.state_dict(), source="W.pth", new_classifier=True)
    # A file without a classifier (a backbone's weights) gets a new one, said in one line.
    headless = {k: v for k, v in models.get("resnet18").build().state_dict().items() if not k.startswith("fc.")}
    assert (weights.load_state_dict_into(ours, headless, source="B.pth", new_classifier=True)
            == "B.pth has no classifier (fc): new classifier for 3 classes")
    # Without new_classifier (classify.py, --resume) the load stays strict.
    with pytest.raises(UserError, match="shape mismatch at fc.weight.*use --num-classes 10"):
        weights.load_state_dict_into(ours, models.get("resnet18").build(num_classes=10).state_dict(), source="W")


@pytest.mark.parametrize("argv, message", [
    (["--freeze-backbone-epochs", "2"], "--freeze-backbone-epochs fine-tunes pretrained weights: give "
                                        "--pretrained-from-file PATH or --pretrained"),
    (["--backbone-lr-scale", "0.1", "--evaluate", "--pretrained-from-file", "W.pth"],
     "--backbone-lr-scale is for training; drop it with --evaluate"),
    (["--freeze-backbone-epochs", "1", "--jit", "script", "--pretrained-from-file", "W.pth"],
     "--freeze-backbone-epochs does not combine with --jit script"),
])
def test_fine_tuning_flag_errors_are_one_line(argv, message, tmp_path, capsys):
    assert cli.main(["--arch", "resnet18", "--data-backend", "synthetic", *argv, "--workspace", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "lars", "lamb", "adamw"])
def test_backbone_lr_scale_groups_for_every_optimizer(name):
    model = models.get("resnet18").build(num_classes=3)
    optimizer = build_optimizer(model, OptimizerOptions(name=name, momentum=0.9, weight_decay=1e-4,
                                                        backbone_lr_scale=0.25),
                                lr=0.4)
    build_scheduler(optimizer, steps_per_epoch=10, granularity="epoch", base=0.4, policy="step", epochs=90,
                    warmup=0, end_lr=0.0, milestones=[30], gamma=0.1, power=2.0)
    groups = optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([0.4, 0.4, 0.1, 0.1])
    assert [len(g["params"]) for g in groups[:2]] == ([1, 1] if name in ("lars", "lamb", "adamw") else [2, 0])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    if name in ("lars", "lamb"):
        assert [g["adapt"] for g in groups] == [True, False, True, False]


def test_digits_export_a_subset_of_classes_with_few_training_images(tmp_path):
    from image_classification.data.prepare.digits import main
    assert main([str(tmp_path / "d"), "--classes", "6-9", "--train-per-class", "20", "--size", "8"]) == 0
    train, val = tmp_path / "d" / "train", tmp_path / "d" / "val"
    assert sorted(p.name for p in train.iterdir()) == ["6", "7", "8", "9"] == sorted(p.name for p in val.iterdir())
    assert [len(list((train / c).iterdir())) for c in "6789"] == [20, 20, 20, 20]
    assert sum(len(list((val / c).iterdir())) for c in "6789") == 143  # every validation image of 6-9


def test_two_process_fine_tune_rewraps_ddp_when_the_backbone_thaws(three_classes, tmp_path):
    """DDP only syncs the parameters that needed gradients when it wrapped the model: the phase change
    re-wraps it, so both ranks train the thawed backbone identically (and as one process would)."""
    import os
    import subprocess
    import sys
    import tests.helpers.run_main as driver
    from tests.helpers.net import free_port
    torch.save(driver.tiny_cnn(10).state_dict(), tmp_path / "tiny10.pth")
    common = ["--arch", "tiny-cnn", "--data-backend", "pytorch", "--image-size", "16", "--val-resize-size", "16",
              "--lr", "0.1", "--epochs", "2", "--workers", "0", "--seed", "3", "--device", "cpu",
              "--pretrained-from-file", str(tmp_path / "tiny10.pth"), "--freeze-backbone-epochs", "1"]

    def torchrun(nproc: int, batch: int, workspace: Path) -> dict:
        env = {**os.environ, "DUMP_WEIGHTS": str(workspace / "weights"), "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                 "--master_port", str(free_port()), str(Path(driver.__file__)), *common, "-b",
                                 str(batch), "--workspace", str(workspace), str(three_classes)],
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return {rank: torch.load(workspace / f"weights.rank{rank}", weights_only=True) for rank in range(nproc)}

    two, one = torchrun(2, 4, tmp_path / "two"), torchrun(1, 8, tmp_path / "one")
    source = torch.load(tmp_path / "tiny10.pth", weights_only=True)
    assert not torch.equal(two[0]["0.weight"], source["0.weight"])  # the backbone trained in epoch 1
    for name, tensor in two[0].items():
        assert torch.equal(tensor, two[1][name]), name
        torch.testing.assert_close(tensor, one[0][name], rtol=1e-4, atol=1e-5)
