"""Unreadable training files on a distributed run (issue 13 item 8): the ranks must stay in step."""
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from image_classification import cli
from image_classification.checkpoints.files import read_pth
from tests.helpers.net import free_port

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "helpers" / "run_main.py"


def _folder(root: Path, *, per_class: int, unreadable_per_class: int) -> Path:
    for split, count, bad in (("train", per_class, unreadable_per_class), ("val", 2, 0)):
        for label, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
            directory = root / split / label
            directory.mkdir(parents=True)
            for i in range(count):
                if i < bad:
                    (directory / f"{i}.jpg").write_text("not an image\n")
                else:
                    Image.new("RGB", (12, 12), colour).save(directory / f"{i}.jpg")
    return root


def test_ranks_stay_in_step_when_unreadable_files_empty_a_batch(tmp_path):
    # 40 training files, 24 unreadable, -b 2 on 2 ranks: some batches of a rank have no readable
    # file. Before: that rank skipped the step, its collectives went out of step with the other
    # rank's, and both hung after epoch 0 (SIGTERM could not end them).
    data = _folder(tmp_path / "data", per_class=20, unreadable_per_class=12)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    command = [sys.executable, str(REPO / "multiproc.py"), "--nproc_per_node", "2", "--master_port",
               str(free_port()), "--grace_period", "1", str(DRIVER), "--arch", "tiny-cnn", "--data-backend",
               "pytorch", "--image-size", "16", "--val-resize-size", "16", "-b", "2", "-j", "0", "--epochs", "2",
               "--lr", "0.1", "--seed", "1", "--device", "cpu", "--workspace", str(workspace), str(data)]
    run = subprocess.run(command, cwd=workspace, capture_output=True, text=True, timeout=150,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "skipped" in run.stdout + run.stderr and "unreadable file(s)" in run.stdout + run.stderr
    saved = read_pth(workspace / "checkpoint.pth.tar")
    assert (saved["epoch"], saved["step_in_epoch"]) == (2, 0)


def test_one_image_batches_with_a_1x1_last_feature_map_are_one_line_errors(tmp_path, capsys):
    # ResNet at 32 px ends in a 1x1 map: BatchNorm in training cannot normalise one value per channel.
    data = _folder(tmp_path / "data", per_class=2, unreadable_per_class=0)
    argv = ["--arch", "resnet18", "--data-backend", "pytorch", "--image-size", "32", "-b", "1", "-j", "0",
            "--epochs", "1", "--device", "cpu", "--workspace", str(tmp_path / "ws"), str(data)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "-b 1" in err, err


def test_training_batches_stay_full_and_name_each_unreadable_file_once(tmp_path):
    import dataclasses

    import torch

    from image_classification.data.contract import LoaderConfig
    from image_classification.data.loaders import pytorch
    data = _folder(tmp_path / "data", per_class=5, unreadable_per_class=3)
    config = LoaderConfig(data_dir=str(data), image_size=8, val_resize_size=8, batch_size=2, workers=0, prefetch=2,
                          interpolation="bilinear", augmentation="none", memory_format=torch.contiguous_format,
                          device=torch.device("cpu"))
    train = pytorch.train_loader(config)
    sizes = [len(labels) for _, labels in train]
    assert sizes == [2] * 5  # 10 files, 6 unreadable: every slot is filled by a readable file
    assert sorted(Path(p).name for p in train.take_skipped()) == ["0.jpg", "0.jpg", "1.jpg", "1.jpg", "2.jpg", "2.jpg"]
    val = pytorch.val_loader(dataclasses.replace(config, batch_size=4))
    assert sum(len(labels) for _, labels in val) == 4  # validation leaves nothing out nor counts twice
