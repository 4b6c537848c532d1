"""--compile: one compile per stage size (not per step), checkpoints keyed as an eager run's,
--resume, EMA, DDP on gloo, and compile time reported apart from the throughput.

The graphs are captured by Dynamo as in a real run; the ``eager`` backend then runs them without
Inductor's code generation, which keeps these tests fast (Inductor itself is measured by
benchmarks/bench_precision.py and smoke-tested on the GPU by benchmarks/gpu_smoke.sh)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from image_classification import cli
from image_classification.checkpoints.files import read_pth
from image_classification.engine import trainer
from tests.helpers.registered import model_for_module
from image_classification.reporting.dllogger import read_raport
from tests.helpers.net import free_port

REPO = Path(__file__).resolve().parents[1]


def _compile_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


_compile_cnn_registered = model_for_module("compile-cnn", _compile_cnn)


COMMON = ["--arch", "compile-cnn", "--data-backend", "synthetic", "--synthetic-epoch-size", "24", "-b", "4",
          "--lr", "0.05", "--device", "cpu", "--workers", "0", "--seed", "5", "--num-classes", "4", "--print-freq", "3"]
# 2 stages over 4 epochs: 16 px (epochs 0-1), then 24 px (epochs 2-3); 6 batches of 4 per epoch.
STAGED = [*COMMON, "--n-stages", "2", "--base-image-size", "16", "--image-size", "24", "--epochs", "4"]


def records(workspace: Path) -> list[dict]:
    return read_raport(workspace / "experiment_raport.json")


def epochs(workspace: Path) -> dict[int, dict]:
    return {r["step"][0]: r["data"] for r in records(workspace) if r.get("type") == "LOG"
            and isinstance(r["step"], list) and len(r["step"]) == 1}


def summary(workspace: Path) -> dict:
    return [r["data"] for r in records(workspace) if r.get("type") == "LOG" and r["step"] == []][-1]


def test_a_stage_change_recompiles_once_not_per_step(tmp_path):
    from torch._dynamo.utils import counters
    counters.clear()
    seen = []  # (epoch, graphs Dynamo has compiled so far) after every training step

    def record(epoch: int, batches_done: int) -> None:
        seen.append((epoch, counters["stats"]["unique_graphs"]))

    assert cli.main([*STAGED, "--compile", "eager", "--training-only", "--no-checkpoints",
                     "--workspace", str(tmp_path)], hooks=trainer.Hooks(after_step=record)) == 0
    assert [epoch for epoch, _ in seen] == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 6
    first = seen[0][1]
    assert first > 0
    # Compiled at the first step of each size, then reused for the other 11 steps of the stage.
    assert [graphs for _, graphs in seen] == [first] * 12 + [2 * first] * 12
    per_epoch = epochs(tmp_path)
    assert per_epoch[0]["train.compile_time"] > 0 and per_epoch[2]["train.compile_time"] > 0
    assert per_epoch[1]["train.compile_time"] == per_epoch[3]["train.compile_time"] == 0.0
    assert summary(tmp_path)["compiled_graphs"] == 2 * first


def test_compiled_run_checkpoints_as_eager_and_resumes(tmp_path):
    """With bf16 AMP, channels_last and EMA: keys identical to an eager run's (no _orig_mod.
    prefix), the same losses (the eager backend runs the same operations), EMA and validation
    compiled, and --resume continues."""
    common = [*COMMON, "--image-size", "24", "--epochs", "4", "--use-ema", "0.9", "--gather-checkpoints",
              "--amp", "--amp-dtype", "bfloat16", "--memory-format", "nhwc"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert cli.main([*common, "--run-epochs", "1", "--workspace", str(eager)]) == 0
    assert cli.main([*common, "--run-epochs", "1", "--compile", "eager", "--workspace", str(compiled)]) == 0
    saved = {name: read_pth(path / "checkpoint.pth.tar") for name, path in
             (("eager", eager), ("compiled", compiled))}
    for key in ("state_dict", "state_dict_ema"):
        assert list(saved["compiled"][key]) == list(saved["eager"][key]), key
        assert not any("_orig_mod" in name for name in saved["compiled"][key])
    assert set(saved["compiled"]) == set(saved["eager"])
    assert epochs(compiled)[0]["train.loss"] == pytest.approx(epochs(eager)[0]["train.loss"], rel=1e-5)
    assert epochs(compiled)[0]["val.top1"] == epochs(eager)[0]["val.top1"]
    assert epochs(compiled)[0]["val.compile_time"] > 0
    # The EMA is validated through the compiler too, and gives the eager EMA's answer.
    assert "val_ema.compile_time" in epochs(compiled)[0] and "val.compile_time" not in epochs(eager)[0]
    assert epochs(compiled)[0]["val_ema.top1"] == epochs(eager)[0]["val_ema.top1"]
    assert epochs(compiled)[0]["val_ema.loss"] == pytest.approx(epochs(eager)[0]["val_ema.loss"], rel=1e-4)

    assert cli.main([*common, "--run-epochs", "2", "--compile", "eager", "--resume",
                     str(compiled / "checkpoint.pth.tar"), "--workspace", str(compiled)]) == 0
    resumed = read_pth(compiled / "checkpoint.pth.tar")
    assert resumed["epoch"] == 3 and list(resumed["state_dict"]) == list(saved["eager"]["state_dict"])
    # The validation batch shape was compiled in the first epoch of this process: not again.
    assert epochs(compiled)[2]["val.compile_time"] == 0.0


@pytest.mark.parametrize("argv, message", [
    (["--compile", "no-such-backend"], "--compile no-such-backend: unknown torch.compile backend"),
    (["--compile", "--jit", "script"], "--compile does not combine with --jit script"),
])
def test_compile_bad_input_is_one_line(tmp_path, capsys, argv, message):
    assert cli.main([*STAGED, *argv, "--workspace", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {message}"] or (len(err) == 1 and err[0].startswith(f"error: {message}"))


def test_compiled_ddp_on_gloo_trains_and_ranks_agree(small_digits_dir, tmp_path):
    env = {**os.environ, "DUMP_WEIGHTS": str(tmp_path / "weights"), "OMP_NUM_THREADS": "1", "MARKERS": str(tmp_path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(REPO / "tests" / "helpers" / "run_main.py"), "--arch", "tiny-cnn",
               "--data-backend", "pytorch", "--image-size", "16", "--val-resize-size", "16", "-b", "4",
               "--epochs", "1", "--workers", "0", "--seed", "3", "--device", "cpu", "--compile", "eager",
               "--optimizer-batch-size", "16", "--workspace", str(tmp_path), str(small_digits_dir)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [(tmp_path / f"threads.rank{rank}").read_text() for rank in (0, 1)] == ["python", "python"]
    rank0 = torch.load(tmp_path / "weights.rank0", weights_only=True)
    rank1 = torch.load(tmp_path / "weights.rank1", weights_only=True)
    assert all(torch.equal(tensor, rank1[name]) for name, tensor in rank0.items())
    assert not any("_orig_mod" in name for name in read_pth(tmp_path / "checkpoint.pth.tar")["state_dict"])
    assert summary(tmp_path)["compiled_graphs"] > 0


def test_classify_compile_gives_the_eager_predictions_and_reports_compile_time(tmp_path, capsys):
    import json

    import classify
    from PIL import Image
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    torch.save(_compile_cnn(num_classes=3).state_dict(), weights)
    for index in range(3):
        Image.new("RGB", (40, 36), (60 * index, 90, 200 - 50 * index)).save(tmp_path / f"{index}.png")
    argv = ["--arch", "compile-cnn", "--weights", str(weights), "--image-size", "32", "--image", str(tmp_path),
            "-b", "2", "--json", "--precision", "FP32", "--cpu", "--num-classes", "3"]
    assert classify.main(argv) == 0
    eager = json.loads(capsys.readouterr().out)
    assert classify.main([*argv, "--compile", "eager"]) == 0
    compiled = json.loads(capsys.readouterr().out)
    assert compiled["compile_time"] > 0 and "compile_time" not in eager
    for ours, theirs in zip(compiled["results"], eager["results"]):
        assert [p["index"] for p in ours["predictions"]] == [p["index"] for p in theirs["predictions"]]
        assert [p["probability"] for p in ours["predictions"]] == pytest.approx(
            [p["probability"] for p in theirs["predictions"]], abs=1e-5)
