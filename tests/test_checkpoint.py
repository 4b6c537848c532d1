"""Checkpoint files: atomic writes, retention, safe loading, the view they are read through."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from image_classification.checkpoints import contents, files, writer
from image_classification.checkpoints.contents import SavedRun
from image_classification.errors import UserError


def _state(epoch, size=10):
    return {"epoch": epoch, "best_prec1": 1.0, "state_dict": {"w": torch.full((size,), float(epoch))},
            "optimizer": {}}


def test_save_writes_reference_files_and_loads(tmp_path):
    written = writer.save(_state(1), tmp_path, epoch_index=0, is_best=True, retention=writer.Retention(-1))
    assert [p.name for p in written] == ["checkpoint_0000.pth.tar", "checkpoint.pth.tar", "model_best.pth.tar"]
    loaded = files.read_pth(tmp_path / "checkpoint.pth.tar")
    assert loaded["epoch"] == 1 and loaded["format_version"] == contents.FORMAT_VERSION
    assert contents.load(tmp_path / "checkpoint.pth.tar").epoch == 1
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("keep, expected", [(0, []), (-1, [0, 1, 2, 3]), (2, [2, 3])])
def test_gather_checkpoints_keeps_what_its_help_says(tmp_path, keep, expected):
    retention = writer.Retention(keep)
    for epoch in range(4):
        writer.save(_state(epoch), tmp_path, epoch_index=epoch, is_best=False, retention=retention)
    kept = sorted(int(p.name[11:15]) for p in tmp_path.glob("checkpoint_*.pth.tar"))
    assert kept == expected
    final = files.read_pth(tmp_path / "checkpoint.pth.tar")
    assert final["epoch"] == 3
    assert final["epoch_files"] == [str(tmp_path.resolve() / f"checkpoint_{e:04d}.pth.tar") for e in expected]


def test_retention_deletes_only_this_runs_own_files_named_after_checkpoint_filename(tmp_path):
    foreign = [tmp_path / "checkpoint_0000.pth.tar", tmp_path / "other_0001.pth.tar"]
    for path in foreign:
        path.write_bytes(b"another run's file")
    retention = writer.Retention(1)
    for epoch in range(3):
        writer.save(_state(epoch), tmp_path, epoch_index=epoch, is_best=False, filename="mine.pth.tar",
                        retention=retention)
    assert all(path.read_bytes() == b"another run's file" for path in foreign)
    assert sorted(p.name for p in tmp_path.glob("mine*")) == ["mine.pth.tar", "mine_0002.pth.tar"]
    assert retention.written == [str(tmp_path.resolve() / "mine_0002.pth.tar")]


def test_a_run_resumed_into_another_workspace_deletes_nothing_there_or_in_its_old_one(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    first_run = writer.Retention(1)
    writer.save(_state(0), first, epoch_index=0, is_best=False, retention=first_run)
    foreign = second / "checkpoint_0000.pth.tar"  # another run's file, named as ours
    foreign.write_bytes(b"another run's file")
    resumed = writer.Retention.resumed(1, contents.load(first / "checkpoint.pth.tar"))
    writer.save(_state(1), second, epoch_index=1, is_best=False, retention=resumed)
    # Before: the kept names were bare, and keeping the last 1 deleted second/checkpoint_0000.pth.tar.
    assert foreign.read_bytes() == b"another run's file"
    assert (first / "checkpoint_0000.pth.tar").is_file()  # outside the workspace this run writes now
    assert resumed.written == [str(second.resolve() / "checkpoint_0001.pth.tar")]


def test_a_format_1_checkpoints_bare_epoch_files_are_its_own_directorys(tmp_path):
    (tmp_path / "checkpoint_0000.pth.tar").write_bytes(b"written by the resumed run")
    resumed = writer.Retention.resumed(1, SavedRun({"epoch_files": ["checkpoint_0000.pth.tar"]},
                                                   tmp_path / "checkpoint.pth.tar"))
    writer.save(_state(1), tmp_path, epoch_index=1, is_best=False, retention=resumed)
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*")) == ["checkpoint_0001.pth.tar"]


def test_a_failed_save_is_one_line_naming_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    writer.save(_state(1), tmp_path, epoch_index=None, is_best=False)
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode and ".tmp." in str(path):
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(UserError, match=r"could not write checkpoint .*checkpoint\.pth\.tar: No space left"):
        writer.save(_state(2), tmp_path, epoch_index=None, is_best=False)
    monkeypatch.undo()
    assert contents.load(tmp_path / "checkpoint.pth.tar").epoch == 1


def test_unwritable_workspace_is_one_line():
    with pytest.raises(UserError, match="--workspace /proc/convnets-x cannot be written: No such file"):
        writer.check_workspace("/proc/convnets-x")


def test_failure_during_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    writer.save(_state(1), tmp_path, epoch_index=None, is_best=False)

    def crash(*args):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(UserError, match="could not write checkpoint"):
        writer.save(_state(2), tmp_path, epoch_index=None, is_best=False)
    assert contents.load(tmp_path / "checkpoint.pth.tar").epoch == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth.tar"]


WRITER = """
import sys, torch
from image_classification.checkpoints import writer
epoch = 0
while True:
    epoch += 1
    writer.save({"epoch": epoch, "state_dict": {"w": torch.full((4_000_000,), float(epoch))}},
                    sys.argv[1], epoch_index=None, is_best=False)
    print(epoch, flush=True)
"""


def test_kill_9_during_saves_never_leaves_a_corrupt_checkpoint(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    for delay in (0.35, 0.6, 0.9):
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=repo,
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "1"  # one complete checkpoint exists
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        saved = contents.load(tmp_path / "checkpoint.pth.tar")
        assert torch.all(saved.weights()["w"] == saved.epoch)


def test_truncated_foreign_and_missing_files_are_clear_errors(tmp_path):
    writer.save(_state(1), tmp_path, epoch_index=None, is_best=False)
    good = (tmp_path / "checkpoint.pth.tar").read_bytes()
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        contents.load(truncated)
    foreign = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(UserError, match="not a training checkpoint"):
        contents.load(foreign)
    with pytest.raises(UserError, match="does not exist"):
        contents.load(tmp_path / "nope.pth.tar")


def test_unsafe_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    path = tmp_path / "evil.pth.tar"
    torch.save({"epoch": 1, "state_dict": {}, "payload": Evil()}, path)
    with pytest.raises(UserError, match="cannot be loaded safely"):
        contents.load(path)


def test_a_checkpoint_of_a_newer_format_is_one_line(tmp_path):
    path = tmp_path / "future.pth.tar"
    torch.save({**_state(1), "format_version": contents.FORMAT_VERSION + 1}, path)
    with pytest.raises(UserError, match=f"has format_version {contents.FORMAT_VERSION + 1}, newer than this "
                                        "convnets reads") as error:
        contents.load(path)
    assert "\n" not in str(error.value)


def test_the_bytes_are_written_once_and_the_copies_are_links_that_later_saves_leave_alone(tmp_path, monkeypatch):
    writes, write_atomic = [], files.write_atomic
    monkeypatch.setattr(files, "write_atomic", lambda data, path: writes.append(path) or write_atomic(data, path))
    written = writer.save(_state(1), tmp_path, epoch_index=0, is_best=True, retention=writer.Retention(-1))
    # Before: the same bytes were serialized into each of the three files.
    assert writes == [tmp_path / "checkpoint_0000.pth.tar"]
    assert len({path.stat().st_ino for path in written}) == 1
    writer.save(_state(2), tmp_path, epoch_index=None, is_best=False)
    assert contents.load(tmp_path / "checkpoint.pth.tar").epoch == 2
    assert [contents.load(tmp_path / name).epoch for name in ("checkpoint_0000.pth.tar", "model_best.pth.tar")] \
        == [1, 1]
    assert not list(tmp_path.glob(".*tmp*"))


def test_without_hard_links_the_copies_are_atomic_copies(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(1, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    written = writer.save(_state(1), tmp_path, epoch_index=None, is_best=True)
    assert [contents.load(path).epoch for path in written] == [1, 1]
    assert len({path.stat().st_ino for path in written}) == 2


# ---------------------------------------------------------------- the view and older formats

def test_the_view_reads_what_capture_wrote(tmp_path):
    state = {**_state(2), "epoch_progress": [[0, 48]], "step_in_epoch": 3, "has_best": True, "best_prec1": 71.5,
             "epochs_since_best": 1, "validation_pending": True, "target_epoch": 1, "arch": "resnet18",
             "num_classes": 3, "class_names": ["a", "b", "c"], "rng": [{"torch": torch.zeros(1)}] * 2,
             "split": {"processes": 2, "batch_size": 8, "global_batch": 16, "lr": 0.2},
             "config": {"batch_size": 8, "image_size": 32, "bn_epsilon": 1e-3},
             "eval_preprocessing": {"image_size": 32, "resize_size": 40, "interpolation": "bicubic"},
             "finetune": {"freeze_backbone_epochs": 2, "backbone_lr_scale": None, "classifier": "fc"},
             "state_dict_ema": {"w": torch.ones(3)}, "ema_updates": 7, "modelopt_state": {"modes": []}}
    writer.save(state, tmp_path, epoch_index=None, is_best=False)
    run = contents.load(tmp_path / "checkpoint.pth.tar")
    assert (run.epoch, run.step_in_epoch, run.progress.samples, run.best_top1, run.epochs_since_best) == (2, 3, 48, 71.5, 1)
    assert (run.validation_pending, run.target_epoch, run.arch, len(run.rng_states)) == (True, 1, "resnet18", 2)
    assert run.split == contents.SavedSplit(processes=2, global_batch=16, lr=0.2)
    assert run.model == contents.ModelRecord("resnet18", 3, ["a", "b", "c"], {"bn_epsilon": 1e-3})
    assert (run.preprocessing.resize_size, run.preprocessing.interpolation) == (40, "bicubic")
    assert run.finetune == {"freeze_backbone_epochs": 2} and run.config["batch_size"] == 8
    assert run.has_ema and run.ema_updates == 7 and torch.equal(run.weights(ema=True)["w"], torch.ones(3))
    assert run.quantizers == {"modes": []} and run.epoch_files == []


def test_an_old_file_is_migrated_by_the_view(tmp_path):
    # Before epoch_progress, has_best, eval_preprocessing, finetune and split: the position is
    # step_in_epoch batches of the saving run's -b on as many processes as it saved RNG states.
    old = SavedRun({**_state(1), "step_in_epoch": 3, "config": {"batch_size": 4, "image_size": 64},
                    "rng": [{}, {}]}, tmp_path / "checkpoint.pth.tar")
    assert old.progress.samples == 3 * 4 * 2 and old.progress.started
    assert old.best_top1 == 1.0  # format 1: best_prec1 was always a score
    assert (old.preprocessing.image_size, old.preprocessing.resize_size) == (64, 96)
    assert (old.finetune, old.split, old.has_ema, old.quantizers) == ({}, None, False, None)
    assert SavedRun({**_state(1), "has_best": False}, tmp_path).best_top1 is None
    with pytest.raises(UserError, match="has no EMA weights"):
        old.weights(ema=True)


def test_a_reference_checkpoint_loads_without_its_ddp_prefixes(tmp_path):
    path = tmp_path / "nvidia.pth.tar"
    torch.save({"epoch": 90, "arch": "resnet50", "best_prec1": 76.9, "optimizer": {},
                "state_dict": {"module.fc.weight": torch.zeros(2, 2)}}, path)
    run = contents.load(path)
    assert list(run.weights()) == ["fc.weight"] and run.best_top1 == 76.9
    read = contents.read_weights(str(path))
    assert list(read.state_dict) == ["fc.weight"] and read.checkpoint.arch == "resnet50"
