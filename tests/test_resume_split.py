"""A run preempted mid-epoch and resumed on another split (number of processes, ``-b``) trains the
rest of the epoch's samples, each exactly once (issue 23).

The training images are solid colours whose red value is the sample's number, and the
``sample-recorder`` test model (tests/helpers/run_main.py) writes down the number of every image it
trains on, so the test sees the samples the run really trained, not what the sampler says.
"""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from image_classification.checkpoints.files import read_pth
from image_classification.data.prepare import cli as prepare
from tests.test_preemption import _launch, _preempt, _run

SAMPLES = 100  # training images, numbered 0..99


@pytest.fixture(scope="module")
def numbered(tmp_path_factory) -> Path:
    """An ImageFolder of 100 training images (2 classes) numbered by their red value, 4 val images."""
    root = tmp_path_factory.mktemp("numbered")
    for number in range(SAMPLES + 4):
        split, label = ("train", number % 2) if number < SAMPLES else ("val", number % 2)
        folder = root / split / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 20, 3), (number, 40, 80), dtype=np.uint8)).save(folder / f"{number:03d}.png")
    return root


@pytest.fixture(scope="module")
def numbered_shards(numbered, tmp_path_factory) -> Path:
    """The same images as WebDataset shards of 10 samples."""
    root = tmp_path_factory.mktemp("numbered-shards")
    assert prepare.main([str(numbered), str(root), "--to", "webdataset", "--shard-samples", "10", "-j", "1"]) == 0
    return root


def _seen(workspace: Path) -> list[int]:
    return [int(n) for path in sorted(workspace.glob("weights.seen.rank*")) for n in path.read_text().split()]


ARGS = ["--arch", "sample-recorder", "--data-backend", "pytorch", "--workers", "0"]


@pytest.mark.parametrize("data, saved, resumed", [
    ("folder", (2, 4), (1, 4)),      # fewer processes
    ("folder", (2, 4), (2, 3)),      # another -b
    ("folder", (1, 4), (2, 4)),      # more processes
    ("shards-window", (2, 4), (1, 4)),
    ("shards", (1, 4), (2, 3)),
])
def test_a_resume_on_another_split_trains_each_remaining_sample_once(numbered, numbered_shards, tmp_path, data,
                                                                      saved, resumed):
    source = numbered if data == "folder" else numbered_shards
    window = ["--shard-shuffle-window", "2"] if data == "shards-window" else []
    (saved_ranks, saved_batch), (ranks, batch) = saved, resumed
    workspace = tmp_path / "run"
    # Paused after 3 steps; ranks act on their stop vote one step later: 4 steps (3 for one process).
    status, output = _preempt(_launch("torchrun", saved_ranks), workspace, source,
                              [*ARGS, *window, "-b", str(saved_batch)], ranks=saved_ranks, pause_at=3)
    assert status in (0, 1), output[-3000:]  # (torchrun reports a SIGTERM it forwarded as 1)
    before = _seen(workspace)
    assert len(before) == (4 if saved_ranks > 1 else 3) * saved_ranks * saved_batch
    assert read_pth(workspace / "checkpoint.pth.tar")["epoch_progress"] != []
    for path in workspace.glob("weights.seen.rank*"):
        path.unlink()

    output = _run(_launch("torchrun", ranks), workspace, source,
                  [*ARGS, *window, "-b", str(batch), "--resume", str(workspace / "checkpoint.pth.tar")])
    after = _seen(workspace)
    trained = collections.Counter(before + after)
    assert max(trained.values()) == 1, sorted(n for n, count in trained.items() if count > 1)
    assert set(trained) <= set(range(SAMPLES))
    left_out = SAMPLES - len(trained)
    assert 0 <= left_out < ranks * batch  # only the rest's last incomplete global batch
    assert read_pth(workspace / "checkpoint.pth.tar")["epoch"] == 1
    changed = (f" (saved on {saved_ranks}); global batch {saved_ranks * saved_batch} -> {ranks * batch}, "
               "LR 0.1 -> 0.1") if (ranks, batch) != saved else ""
    assert (f"=> resumed from {workspace / 'checkpoint.pth.tar'}: epoch 0 at sample {len(before)} of {SAMPLES} on "
            f"{ranks} process(es){changed}\n") in output
    assert ("RNG states were saved for" in output) == (ranks != saved_ranks)
