"""The reference README's interface (issue 10): its `main.py -h` options, `-c/--model-config`,
`--data-backends`, and --topk defaults that fit the number of classes.

The seed's `-h` dump is restated here as data (option strings, metavar, stated default) so these
checks run without ../shared; tests/test_seed_readme.py checks the restatement against the seed.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests" / "helpers"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import classify  # noqa: E402
from image_classification import cli, config, flag_rules, settings  # noqa: E402
from image_classification.data import registry as data_registry  # noqa: E402
from image_classification.errors import UserError  # noqa: E402
from image_classification.models import registry  # noqa: E402
from image_classification.models.resnet import INIT_PRESETS  # noqa: E402
from image_classification.reporting.dllogger import read_raport  # noqa: E402
from tiny_data import write_imagefolder  # noqa: E402

# (option strings, metavar or None for a switch, default stated in the help text or None)
SEED_HELP_OPTIONS = [
    (("--data-backend",), "BACKEND", "dali-cpu"),
    (("--arch", "-a"), "ARCH", "resnet50"),
    (("--model-config", "-c"), "CONF", "classic"),
    (("-j", "--workers"), "N", "5"),
    (("--epochs",), "N", None),
    (("--run-epochs",), "N", None),
    (("-b", "--batch-size"), "N", "256"),
    (("--optimizer-batch-size",), "N", None),
    (("--lr", "--learning-rate"), "LR", None),
    (("--lr-schedule",), "SCHEDULE", None),
    (("--warmup",), "E", None),
    (("--label-smoothing",), "S", None),
    (("--mixup",), "ALPHA", None),
    (("--momentum",), "M", None),
    (("--weight-decay", "--wd"), "W", "1e-4"),
    (("--bn-weight-decay",), None, "false"),
    (("--nesterov",), None, "false"),
    (("--print-freq", "-p"), "N", "10"),
    (("--resume",), "PATH", "none"),
    (("--pretrained-from-file",), "PATH", None),
    (("--static-loss-scale",), "STATIC_LOSS_SCALE", None),
    (("--dynamic-loss-scale",), None, None),
    (("--prof",), "N", None),
    (("--amp",), None, None),
    (("--seed",), "SEED", None),
    (("--gather-checkpoints",), None, None),
    (("--raport-file",), "RAPORT_FILE", None),
    (("--evaluate",), None, None),
    (("--training-only",), None, None),
    (("--no-checkpoints",), None, None),
    (("--checkpoint-filename",), "CHECKPOINT_FILENAME", None),
    (("--workspace",), "DIR", None),
    (("--memory-format",), "{nchw,nhwc}", None),
]
SEED_ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50-32x4d", "resnext101-32x4d",
              "resnext101-32x8d", "resnext101-32x8d-basic", "se-resnext101-32x4d"]
SEED_DATA_BACKENDS = ["pytorch", "synthetic", "dali-gpu", "dali-cpu"]
SEED_MODEL_CONFIGS = ["classic", "fanin", "grp-fanin", "grp-fanout"]


def _takes(action) -> str | None:
    """What the option takes, written as the help shows it: None for a switch."""
    if action.nargs == 0:
        return None
    shown = action.metavar or "{" + ",".join(map(str, action.choices)) + "}"
    return f"[{shown}]" if action.nargs == "?" else shown


def _same_default(ours, stated: str) -> bool:
    if ours is None or isinstance(ours, bool):
        return str(ours).lower() == stated.lower()
    if isinstance(ours, (int, float)):
        return math.isclose(float(ours), float(stated))
    return str(ours) == stated


def help_differences() -> dict[str, str]:
    """Seed -h option -> how ours differs, for every option that does not match exactly."""
    actions = {option: action for action in config.parser_actions(config.build_parser()) for option in action.option_strings}
    found = {}
    for options, metavar, default in SEED_HELP_OPTIONS:
        action = actions.get(options[0])
        if action is None:
            found[options[0]] = "missing"
        elif any(option not in action.option_strings for option in options):
            found[options[0]] = f"lacks the alias(es) of {options}"
        elif _takes(action) != metavar:
            found[options[0]] = f"takes {_takes(action)!r}, the seed {metavar!r}"
        elif default is not None and not _same_default(action.default, default):
            found[options[0]] = f"default {action.default!r}, the seed {default!r}"
    return found


def readme_listed_differences() -> dict[str, str]:
    """The one-line entries ``- `--option`...`` of docs/differences.md (README links to it)."""
    lines = (ROOT / "docs" / "differences.md").read_text().splitlines()
    listed = {}
    for index, line in enumerate(lines):
        match = re.match(r"- `(--?[\w-]+)[^`]*`: (.+)", line)
        if match:
            following = lines[index + 1] if index + 1 < len(lines) else ""
            assert not following.startswith("  "), f"docs/differences.md entry for {match.group(1)} is not one line"
            listed[match.group(1)] = match.group(2)
    return listed


def test_every_seed_help_option_matches_or_readme_says_why():
    differences = help_differences()
    assert set(differences) == set(readme_listed_differences()), (
        f"options that differ from the seed's -h: {differences}; docs/differences.md explains: {readme_listed_differences()}")


def test_the_seed_help_choices_exist():
    assert [name for name in SEED_ARCHS if name not in registry.names()] == ["resnext101-32x8d-basic"]
    with pytest.raises(UserError, match="nearest: resnext101-32x8d "):
        registry.get("resnext101-32x8d-basic")
    assert set(SEED_DATA_BACKENDS) <= set(data_registry.names())
    assert list(INIT_PRESETS) == SEED_MODEL_CONFIGS


def test_data_backends_is_the_readme_spelling_of_data_backend():
    assert config.parse_args(["--data-backends", "pytorch", "d"]).data_backend == "pytorch"


# ---------------------------------------------------------------- -c / --model-config

def _conv_std(options: dict) -> float:
    torch.manual_seed(0)
    model = registry.get("resnet18").build(**options)
    return model.layers[1][0].conv1.weight.std().item()  # 64 -> 128 channels, 3x3: fan_in 576, fan_out 1152


@pytest.mark.parametrize("conf, fan", [("classic", 1152), ("fanin", 576), ("grp-fanin", 576), ("grp-fanout", 1152)])
def test_model_config_presets_conv_init_and_no_last_bn_zero_init(conf, fan):
    options = settings.model_options(config.parse_args(["-c", conf, "d"]))
    assert options["last_bn_0_init"] is False
    assert _conv_std(options) == pytest.approx(math.sqrt(2 / fan), rel=0.03)
    assert config.parse_args(["--model-config", conf, "d"]).model_config == conf


def test_without_model_config_the_model_flags_keep_their_defaults():
    assert settings.model_options(config.parse_args(["d"])) == {}
    assert _conv_std({}) == pytest.approx(math.sqrt(2 / 576), rel=0.03)  # fan_in, as the published recipes
    assert "--model-config CONF, -c CONF" in config.build_parser().format_help()


def test_an_agreeing_model_flag_is_accepted_and_a_contradicting_one_is_an_error():
    agreeing = config.parse_args(["-c", "classic", "--conv-init", "fan_out", "--last-bn-0-init", "false", "d"])
    assert settings.model_options(agreeing) == {"conv_init": "fan_out", "last_bn_0_init": False}
    with pytest.raises(UserError, match="-c classic means --conv-init fan_out, but --conv-init fan_in was given"):
        flag_rules.check(config.parse_args(["-c", "classic", "--conv-init", "fan_in", "d"]))
    with pytest.raises(UserError, match="-c fanin means --last-bn-0-init false, but --last-bn-0-init true"):
        flag_rules.check(config.parse_args(["d", "-c", "fanin", "--last-bn-0-init"]))


@pytest.mark.parametrize("argv, message", [
    (["-c", "grp-fanin", "--conv_init", "fan_out"], "-c grp-fanin means --conv-init fan_in"),
    (["-c", "fanin", "--arch", "efficientnet-b0"], "presets ResNet initialisation; --arch efficientnet-b0"),
])
def test_model_config_errors_are_one_line(argv, message, capsys):
    assert cli.main(["--data-backend", "synthetic", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


# ---------------------------------------------------------------- --topk fits the classes

@pytest.fixture(scope="module")
def two_classes(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("two-classes"), train_per_class=4, val_per_class=2, size=20)


def _main(data: Path, workspace: Path, *extra: str) -> int:
    return cli.main(["--data-backend", "pytorch", "--arch", "resnet18", "--image-size", "16", "-b", "4",
                     "--workers", "0", "--device", "cpu", "--epochs", "1", "--workspace", str(workspace),
                     *extra, str(data)])


def test_main_validation_reports_top_k_of_all_classes_when_fewer_than_5(two_classes, tmp_path, capsys):
    assert _main(two_classes, tmp_path) == 0
    (record,) = [r["data"] for r in read_raport(tmp_path / "experiment_raport.json")
                 if r.get("type") == "LOG" and r["step"] == [0]]
    assert record["val.top2"] == 100.0 and "val.top5" not in record
    assert _main(two_classes, tmp_path, "--topk", "1", "--evaluate", "--raport-file", "eval.json") == 0
    assert _main(two_classes, tmp_path, "--topk", "5") == 2
    assert capsys.readouterr().err.strip().endswith("error: --topk 5 is more than the dataset's 2 classes")


def test_classify_prints_every_class_of_a_two_class_model(two_classes, tmp_path, capsys):
    weights = tmp_path / "two.pth"
    torch.save(registry.get("resnet18").build(num_classes=2).state_dict(), weights)
    image = str(two_classes / "val" / "cat" / "0.jpg")
    argv = ["--arch", "resnet18", "--pretrained-from-file", str(weights), "--precision", "FP32", "--image", image]
    assert classify.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == image and [line.split(":")[0] for line in lines[1:]] in (["0", "1"], ["1", "0"])
    assert classify.main([*argv, "--topk", "3"]) == 2
    assert "error: --topk 3 is more than the model's 2 classes" in capsys.readouterr().err
