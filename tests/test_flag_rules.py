"""The rules between main.py's flags (image_classification.flag_rules): each broken rule is its own
one line, given before anything is loaded or started, for main.py and launch.py --dry-run alike."""
from __future__ import annotations

import pytest

from image_classification import cli, config, flag_rules
from image_classification.errors import UserError

SYNTHETIC = ["--data-backend", "synthetic", "--device", "cpu"]


@pytest.mark.parametrize("argv, message", [
    (["-j", "-1"], "--workers must be >= 0, got -1"),
    (["--shard-shuffle-window", "-2"], "--shard-shuffle-window must be >= 0, got -2"),
    (["--n-stages", "3", "--epochs", "2"], "--n-stages 3 is more than --epochs 2: every stage needs an epoch"),
    (["--arch", "efficientnet-b0", "-c", "classic"],
     "-c/--model-config presets ResNet initialisation; --arch efficientnet-b0 is an efficientnet model "
     "(set --conv-init instead)"),
    (["--compile", "--onnx", "m.onnx", "--evaluate"], "--compile does not combine with --onnx"),
    (["--compile", "--arch", "efficientnet-quant-b0"], "--compile does not combine with --quantize"),
    (["--optimizer", "rmsprop", "--nesterov"], "--nesterov needs --optimizer sgd or lars and --momentum > 0"),
    (["--evaluate", "--training-only"], "--evaluate and --training-only exclude each other"),
])
def test_each_broken_rule_is_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(UserError) as error:
        flag_rules.check(config.parse_args([*SYNTHETIC, *argv]))
    assert str(error.value) == message
    assert cli.main([*SYNTHETIC, *argv, "--workspace", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []  # refused before the run wrote anything


def test_a_command_line_that_breaks_no_rule_passes():
    args = config.parse_args([*SYNTHETIC, "-j", "0", "--n-stages", "2", "--epochs", "2", "--arch", "resnet18",
                              "-c", "classic", "--compile", "--optimizer", "lars", "--nesterov"])
    assert flag_rules.check(args) is None
    assert args.workers == 0  # parsing reads no machine state: an unset --workers stays None until settings
    assert config.parse_args(SYNTHETIC).workers is None
