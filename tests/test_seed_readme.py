"""The reference README (../shared/seeds/000_*.txt) as an executable specification (issue 10).

Every line of it that starts with ``python`` or ``bash`` is run, in the README's order, in one
working directory, as a user would paste it, with only these changes:

* ``<placeholders>`` are filled: a generated two-class ImageFolder for ``<path to imagenet>``, one of
  its JPEGs for ``<path to JPEG image>``, and files earlier commands wrote (``checkpoint.pth.tar``,
  ``weights.pth``). ``nvidia_resnet50_200821.pth.tar`` (NGC's download) is written first, in NGC's
  key layout, with random weights for the two classes. ``A|B`` alternatives are each run.
* flags that shorten the run are appended: ``--epochs 1 --prof 1 -b 2 --image-size 64`` and, where
  configs.yml presets 1000 classes, ``--num-classes 2``.
* scripts are found in this repository (``./main.py`` -> ``<repo>/main.py``) and ``python`` is the
  running interpreter; multiproc runs get a free ``--master_port`` so parallel CI jobs cannot collide.
* ``--nproc_per_node 8`` becomes ``--nproc_per_node $SEED_TEST_NPROC`` (default 2: CI has 2 CPU
  cores, and 8 ranks cost about a minute per command there); ``SEED_TEST_NPROC=8`` runs them as
  written. Inside the recipe script the same substitution is made by a ``$PYTHON`` wrapper.

Each command must exit 0 and write what it promises. Commands needing Docker, a download or the
ImageNet tar files are listed in SKIPPED with the reason. Without ../shared the module is skipped.
Single-process commands run in this interpreter (runpy) so the suite pays torch's import once.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
import re
import runpy
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests" / "helpers"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from tiny_data import write_imagefolder  # noqa: E402
from image_classification.reporting.dllogger import read_raport  # noqa: E402
from tests.helpers.net import free_port  # noqa: E402

SEEDS = sorted((ROOT.parent / "shared" / "seeds").glob("000_*.txt"))
pytestmark = pytest.mark.skipif(not SEEDS, reason="../shared/seeds/000_*.txt (the reference README) is not present")
NPROC = int(os.environ.get("SEED_TEST_NPROC", "2"))
# 64 px, not less: at 32 px a batch of 2 reaches the last BatchNorm as 2 values per channel, and one
# SGD step at the recipes' LR blows the weights up (NaN in eval mode), which would hide real faults.
IMAGE_SIZE = ["--image-size", "64"]
SHORTEN = ["--epochs", "1", "--prof", "1", "-b", "2", *IMAGE_SIZE]
NGC_FILE = "nvidia_resnet50_200821.pth.tar"

# Seed lines that are not run, with the reason (each must still be in the seed: see the test below).
SKIPPED = {
    "git clone https://github.com/NVIDIA/DeepLearningExamples": "needs network access; this repository is the checkout",
    "docker build . -t nvidia_resnet50": "needs Docker (the Dockerfile is for NVIDIA's GPU container)",
    "nvidia-docker run --rm -it -v <path to imagenet>:/imagenet --ipc=host nvidia_resnet50":
        "needs nvidia-docker and a GPU",
    "wget --content-disposition https://api.ngc.nvidia.com/v2/models/nvidia/resnet50_pyt_amp/versions/20.06.0/zip "
    "-O resnet50_pyt_amp_20.06.0.zip": "needs wget and network access (NGC); the test writes "
                                       f"{NGC_FILE} in NGC's layout instead",
    "unzip resnet50_pyt_amp_20.06.0.zip": "needs the zip that wget downloads",
    "wget -qO- https://raw.githubusercontent.com/soumith/imagenetloader.torch/master/valprep.sh | bash":
        "needs wget, network access and the ImageNet validation tar",
    "mkdir train && mv ILSVRC2012_img_train.tar train/ && cd train": "needs the ImageNet tar files",
    "tar -xvf ILSVRC2012_img_train.tar && rm -f ILSVRC2012_img_train.tar": "needs the ImageNet tar files",
    "mkdir val && mv ILSVRC2012_img_val.tar val/ && cd val && tar -xvf ILSVRC2012_img_val.tar":
        "needs the ImageNet tar files",
}


def seed_text() -> str:
    return SEEDS[0].read_text() if SEEDS else ""


def seed_commands() -> list[str]:
    """The seed's python/bash lines, in order, duplicates once."""
    lines = [line.strip() for line in seed_text().splitlines()]
    return list(dict.fromkeys(line for line in lines if line.startswith(("python ", "bash "))))


def expand_alternatives(command: str) -> list[str]:
    """``--precision AMP|FP32`` -> one command per alternative (``<DGX1V|DGXA100>`` too)."""
    tokens = command.split(" ")
    choices = [token.strip("<>").split("|") if "|" in token else [token] for token in tokens]
    return [" ".join(combination) for combination in itertools.product(*choices)]


def cases() -> list:
    params = []
    for command in seed_commands():
        for variant in expand_alternatives(command):
            params.append(pytest.param(variant, id=re.sub(r"[^\w.|-]+", "_", variant)[:90]))
    return params


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> dict:
    """The shared working directory, the dataset, and what the commands leave for later ones."""
    cwd = tmp_path_factory.mktemp("seed-cwd")
    data = write_imagefolder(tmp_path_factory.mktemp("seed-data") / "imagenet", train_per_class=8,
                             val_per_class=4, size=24)
    _write_ngc_style_weights(cwd / NGC_FILE, num_classes=2)
    return {"cwd": cwd, "data": data, "image": data / "val" / "cat" / "0.jpg"}


def _write_ngc_style_weights(path: Path, num_classes: int) -> None:
    """Random ResNet-50 weights keyed as NGC's 20.06 files are (``module.layer1.0...``)."""
    from image_classification.models import registry
    torch.manual_seed(0)
    state = registry.get("resnet50").build(num_classes=num_classes).state_dict()
    renamed = {}
    for key, value in state.items():
        match = re.match(r"layers\.(\d+)\.(.*)", key)
        renamed["module." + (f"layer{int(match.group(1)) + 1}.{match.group(2)}" if match else key)] = value
    torch.save(renamed, path)


PLACEHOLDERS = {
    "<path to imagenet>": lambda w: str(w["data"]),
    "<batch size>": lambda w: "2",
    "<path to JPEG image>": lambda w: str(w["image"]),
    "<path to checkpoint>": lambda w: "checkpoint.pth.tar",
    "<path where weights will be stored>": lambda w: "weights.pth",
    "<path to weights from previous step>": lambda w: "weights.pth",
    "<path to pretrained weights>": lambda w: "weights.pth",
    "<path were to store checkpoints and logs>": lambda w: "recipe_ws",
}


def prepare(command: str, w: dict) -> list[str]:
    """Placeholders filled, scripts located, shortening flags appended (see the module docstring)."""
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value(w))
    assert "<" not in command, f"unknown placeholder in: {command}"
    argv = shlex.split(command)
    argv = [str(ROOT / token) if (ROOT / token).is_file() and not Path(token).is_absolute() else token
            for token in argv]
    if argv[0] == "python":
        argv[0] = sys.executable
    if "--nproc_per_node" in argv:
        argv[argv.index("--nproc_per_node") + 1] = str(NPROC)
        argv[2:2] = ["--master_port", str(free_port())]
    scripts = {Path(token).name for token in argv}
    if (scripts & {"main.py", "launch.py"} or argv[0] == "bash") and "-h" not in argv:
        if "--evaluate" not in argv:
            argv += SHORTEN
        else:
            argv += ["--prof", "1", *IMAGE_SIZE]
        if "launch.py" in scripts or argv[0] == "bash":
            argv += ["--num-classes", "2"]  # configs.yml presets ImageNet's 1000
    if "classify.py" in scripts:
        argv += IMAGE_SIZE
    return argv


def run_in_process(argv: list[str]) -> tuple[int, str]:
    """Run ``python SCRIPT ARGS`` in this interpreter; return (exit status, stdout)."""
    out = io.StringIO()
    saved = sys.argv
    sys.argv = argv[1:]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(argv[1], run_name="__main__")
        status = 0
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = saved
    return status, out.getvalue()


def _wrapper_python(directory: Path) -> Path:
    """A ``$PYTHON`` for the recipe scripts that makes the --nproc_per_node substitution."""
    wrapper = directory / "python-nproc"
    wrapper.write_text("#!/usr/bin/env bash\nargs=()\nwhile [ $# -gt 0 ]; do\n"
                       f"  if [ \"$1\" = --nproc_per_node ]; then args+=(\"$1\" {NPROC}); shift 2; continue; fi\n"
                       f"  args+=(\"$1\"); shift\ndone\nexec {shlex.quote(sys.executable)} \"${{args[@]}}\"\n")
    wrapper.chmod(0o755)
    return wrapper


def run_subprocess(argv: list[str], w: dict) -> tuple[int, str]:
    env = {**os.environ, "DATA_DIR": str(w["data"]), "OMP_NUM_THREADS": "1"}
    if argv[0] == "bash" and NPROC != 8:
        env["PYTHON"] = str(_wrapper_python(w["cwd"]))
    result = subprocess.run(argv, cwd=w["cwd"], env=env, capture_output=True, text=True, timeout=600)
    return result.returncode, result.stdout + result.stderr


def _fresh(path: Path, since: float) -> bool:
    return path.is_file() and path.stat().st_mtime >= since


def _logged(raport: Path, metric: str) -> list[float]:
    """Every value of ``metric`` in the raport's LOG records (parsed, not searched for as text)."""
    values = [record["data"][metric] for record in read_raport(raport)
              if record.get("type") == "LOG" and metric in (record.get("data") or {})]
    assert values and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values), (metric, values)
    if metric.endswith("top1"):
        assert all(0.0 <= v <= 100.0 for v in values), values
    return values


def check_outputs(command: str, argv: list[str], output: str, w: dict, since: float) -> None:
    """What each kind of command must leave behind."""
    cwd = w["cwd"]
    if "classify.py" in command:
        lines = output.strip().splitlines()
        assert lines[0] == str(w["image"]) and len(lines) == 3, output  # the path, then both classes
        assert all(re.fullmatch(r"(cat|dog|0|1): \d+\.\d%", line) for line in lines[1:]), output
    elif "checkpoint2model.py" in command:
        assert _fresh(cwd / "weights.pth", since)
        assert "fc.weight" in torch.load(cwd / "weights.pth", weights_only=True)
    elif command.endswith(" -h"):
        assert "--model-config CONF, -c CONF" in output and "--data-backend BACKEND" in output
    elif argv[0] == "bash":
        assert _fresh(cwd / "recipe_ws" / "raport.json", since)
        assert _fresh(cwd / "recipe_ws" / "checkpoint.pth.tar", since)
    elif "launch.py" in command:
        raport = cwd / "benchmark.json"
        assert _fresh(raport, since)
        _logged(raport, "val.top1" if "inference" in command else "train.loss")
    elif "--evaluate" in command:
        assert _fresh(cwd / "experiment_raport.json", since)
        _logged(cwd / "experiment_raport.json", "val.top1")
    else:  # training (model_best.pth.tar only when val.top1 beat the best so far, which 0 % does not)
        for name in ("checkpoint.pth.tar", "experiment_raport.json"):
            assert _fresh(cwd / name, since), name
        _logged(cwd / "experiment_raport.json", "train.loss")
    if "--nproc_per_node" in command and NPROC > 1:
        assert _fresh(cwd / f"GPU_{NPROC - 1}.log", since)


@pytest.mark.parametrize("command", cases())
def test_seed_command_runs(command, workdir, monkeypatch):
    argv = prepare(command, workdir)
    monkeypatch.chdir(workdir["cwd"])
    since = time.time() - 1
    in_process = argv[0] == sys.executable and Path(argv[1]).name != "multiproc.py"
    status, output = run_in_process(argv) if in_process else run_subprocess(argv, workdir)
    assert status == 0, f"{' '.join(argv)}\n{output[-3000:]}"
    check_outputs(command, argv, output, workdir, since)


def test_the_seed_has_the_commands_the_issue_lists():
    commands = seed_commands()
    assert len(commands) == 21 and sum(len(expand_alternatives(c)) for c in commands) == 27
    for fragment in ("-c fanin --label-smoothing 0.1 <path", "--amp --static-loss-scale 256", "./multiproc.py",
                     "--evaluate --epochs 1 --resume", "--evaluate --epochs 1 --pretrained-from-file",
                     "checkpoint2model.py", "classify.py --arch resnet50 --pretrained-from-file",
                     "classify.py --arch resnet50 --weights", "--mode benchmark_training",
                     "--mode benchmark_inference", "DGX1_resnet50_AMP_250E.sh"):
        assert any(fragment in command for command in commands), fragment


def test_skipped_lines_are_in_the_seed_and_nothing_else_is_skipped():
    lines = {line.strip() for line in seed_text().splitlines()}
    assert set(SKIPPED) <= lines
    assert not any(line.startswith(("python ", "bash ")) for line in SKIPPED)


def test_the_restated_help_dump_matches_the_seed():
    """tests/test_seed_compat.py restates the seed's -h options; check the restatement."""
    import test_seed_compat as compat
    text = seed_text()
    dump = text.split("python main.py -h", 1)[1].split("To use your own dataset", 1)[0]
    usage, options = dump.split("optional arguments:", 1)
    in_usage = re.findall(r"\[(-{1,2}[\w-]+)(?: ([^\]\s]+))?\]", usage.split("PyTorch ImageNet Training")[0])
    restated = [(options_[0], metavar) for options_, metavar, _ in compat.SEED_HELP_OPTIONS]
    assert [(option, metavar or None) for option, metavar in in_usage if option != "-h"] == restated
    segments = re.split(r"\n(?=-)", options)
    for options_, metavar, default in compat.SEED_HELP_OPTIONS:
        invocation = ", ".join(f"{o} {metavar}" if metavar else o for o in options_)
        (segment,) = [s for s in segments if s.startswith(invocation + " ") or s.startswith(invocation + "\n")
                      or s == invocation]
        stated = re.search(r"\(default:\s*([^)]+?)\)", " ".join(segment.split()))
        assert (stated.group(1) if stated else None) == default, options_
    archs = " ".join(re.search(r"model architecture: (.*?)\(default", " ".join(options.split())).group(1).split())
    assert archs.split(" | ") == compat.SEED_ARCHS
