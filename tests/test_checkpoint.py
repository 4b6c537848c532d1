"""Checkpoint files: atomic writes, retention, safe loading."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from image_classification import checkpoint
from image_classification.errors import UserError


def _state(epoch, size=10):
    return {"epoch": epoch, "best_prec1": 1.0, "state_dict": {"w": torch.full((size,), float(epoch))},
            "optimizer": {}}


def test_save_writes_reference_files_and_loads(tmp_path):
    written = checkpoint.save(_state(1), tmp_path, epoch_index=0, is_best=True, retention=checkpoint.Retention(-1))
    assert [p.name for p in written] == ["checkpoint_0000.pth.tar", "checkpoint.pth.tar", "model_best.pth.tar"]
    loaded = checkpoint.load(tmp_path / "checkpoint.pth.tar")
    assert loaded["epoch"] == 1 and loaded["format_version"] == checkpoint.FORMAT_VERSION
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("keep, expected", [(0, []), (-1, [0, 1, 2, 3]), (2, [2, 3])])
def test_gather_checkpoints_keeps_what_its_help_says(tmp_path, keep, expected):
    retention = checkpoint.Retention(keep)
    for epoch in range(4):
        checkpoint.save(_state(epoch), tmp_path, epoch_index=epoch, is_best=False, retention=retention)
    kept = sorted(int(p.name[11:15]) for p in tmp_path.glob("checkpoint_*.pth.tar"))
    assert kept == expected
    final = checkpoint.load(tmp_path / "checkpoint.pth.tar")
    assert final["epoch"] == 3
    assert final["epoch_files"] == [str(tmp_path.resolve() / f"checkpoint_{e:04d}.pth.tar") for e in expected]


def test_retention_deletes_only_this_runs_own_files_named_after_checkpoint_filename(tmp_path):
    foreign = [tmp_path / "checkpoint_0000.pth.tar", tmp_path / "other_0001.pth.tar"]
    for path in foreign:
        path.write_bytes(b"another run's file")
    retention = checkpoint.Retention(1)
    for epoch in range(3):
        checkpoint.save(_state(epoch), tmp_path, epoch_index=epoch, is_best=False, filename="mine.pth.tar",
                        retention=retention)
    assert all(path.read_bytes() == b"another run's file" for path in foreign)
    assert sorted(p.name for p in tmp_path.glob("mine*")) == ["mine.pth.tar", "mine_0002.pth.tar"]
    assert retention.written == [str(tmp_path.resolve() / "mine_0002.pth.tar")]


def test_a_run_resumed_into_another_workspace_deletes_nothing_there_or_in_its_old_one(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    first_run = checkpoint.Retention(1)
    checkpoint.save(_state(0), first, epoch_index=0, is_best=False, retention=first_run)
    foreign = second / "checkpoint_0000.pth.tar"  # another run's file, named as ours
    foreign.write_bytes(b"another run's file")
    resumed = checkpoint.Retention.resumed(1, checkpoint.load(first / "checkpoint.pth.tar"),
                                           first / "checkpoint.pth.tar")
    checkpoint.save(_state(1), second, epoch_index=1, is_best=False, retention=resumed)
    # Before: the kept names were bare, and keeping the last 1 deleted second/checkpoint_0000.pth.tar.
    assert foreign.read_bytes() == b"another run's file"
    assert (first / "checkpoint_0000.pth.tar").is_file()  # outside the workspace this run writes now
    assert resumed.written == [str(second.resolve() / "checkpoint_0001.pth.tar")]


def test_a_format_1_checkpoints_bare_epoch_files_are_its_own_directorys(tmp_path):
    (tmp_path / "checkpoint_0000.pth.tar").write_bytes(b"written by the resumed run")
    resumed = checkpoint.Retention.resumed(1, {"epoch_files": ["checkpoint_0000.pth.tar"]},
                                           tmp_path / "checkpoint.pth.tar")
    checkpoint.save(_state(1), tmp_path, epoch_index=1, is_best=False, retention=resumed)
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*")) == ["checkpoint_0001.pth.tar"]


def test_a_failed_save_is_one_line_naming_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(_state(1), tmp_path, epoch_index=None, is_best=False)
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode and ".tmp." in str(path):
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(UserError, match=r"could not write checkpoint .*checkpoint\.pth\.tar: No space left"):
        checkpoint.save(_state(2), tmp_path, epoch_index=None, is_best=False)
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "checkpoint.pth.tar")["epoch"] == 1


def test_unwritable_workspace_is_one_line():
    with pytest.raises(UserError, match="--workspace /proc/convnets-x cannot be written: No such file"):
        checkpoint.check_workspace("/proc/convnets-x")


def test_failure_during_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(_state(1), tmp_path, epoch_index=None, is_best=False)

    def crash(*args):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(UserError, match="could not write checkpoint"):
        checkpoint.save(_state(2), tmp_path, epoch_index=None, is_best=False)
    assert checkpoint.load(tmp_path / "checkpoint.pth.tar")["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth.tar"]


WRITER = """
import sys, torch
from image_classification import checkpoint
epoch = 0
while True:
    epoch += 1
    checkpoint.save({"epoch": epoch, "state_dict": {"w": torch.full((4_000_000,), float(epoch))}},
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
        state = checkpoint.load(tmp_path / "checkpoint.pth.tar")
        assert torch.all(state["state_dict"]["w"] == state["epoch"])


def test_truncated_foreign_and_missing_files_are_clear_errors(tmp_path):
    checkpoint.save(_state(1), tmp_path, epoch_index=None, is_best=False)
    good = (tmp_path / "checkpoint.pth.tar").read_bytes()
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        checkpoint.load(truncated)
    foreign = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(UserError, match="not a training checkpoint"):
        checkpoint.load(foreign)
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load(tmp_path / "nope.pth.tar")


def test_unsafe_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    path = tmp_path / "evil.pth.tar"
    torch.save({"epoch": 1, "state_dict": {}, "payload": Evil()}, path)
    with pytest.raises(UserError, match="cannot be loaded safely"):
        checkpoint.load(path)


def test_a_checkpoint_of_a_newer_format_is_one_line(tmp_path):
    path = tmp_path / "future.pth.tar"
    torch.save({**_state(1), "format_version": checkpoint.FORMAT_VERSION + 1}, path)
    with pytest.raises(UserError, match=f"has format_version {checkpoint.FORMAT_VERSION + 1}, newer than this "
                                        "convnets reads") as error:
        checkpoint.load(path)
    assert "\n" not in str(error.value)


def test_the_bytes_are_written_once_and_the_copies_are_links_that_later_saves_leave_alone(tmp_path, monkeypatch):
    writes, write_atomic = [], checkpoint.write_atomic
    monkeypatch.setattr(checkpoint, "write_atomic", lambda data, path: writes.append(path) or write_atomic(data, path))
    written = checkpoint.save(_state(1), tmp_path, epoch_index=0, is_best=True, retention=checkpoint.Retention(-1))
    # Before: the same bytes were serialized into each of the three files.
    assert writes == [tmp_path / "checkpoint_0000.pth.tar"]
    assert len({path.stat().st_ino for path in written}) == 1
    checkpoint.save(_state(2), tmp_path, epoch_index=None, is_best=False)
    assert checkpoint.load(tmp_path / "checkpoint.pth.tar")["epoch"] == 2
    assert [checkpoint.load(tmp_path / name)["epoch"] for name in ("checkpoint_0000.pth.tar", "model_best.pth.tar")] \
        == [1, 1]
    assert not list(tmp_path.glob(".*tmp*"))


def test_without_hard_links_the_copies_are_atomic_copies(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(1, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    written = checkpoint.save(_state(1), tmp_path, epoch_index=None, is_best=True)
    assert [checkpoint.load(path)["epoch"] for path in written] == [1, 1]
    assert len({path.stat().st_ino for path in written}) == 2
