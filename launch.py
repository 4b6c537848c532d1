#!/usr/bin/env python
"""Run main.py with presets from configs.yml.

    python launch.py --model resnet50 --precision AMP --platform DGXA100 --mode convergence \\
        [--recipe R] /imagenet [main.py flags...]

The presets are merged in this order, later wins: ``precision[P]``, ``platform[PL]``,
``models[M][PL][P]``, ``recipe[R]`` (optional: a published recipe's hyperparameters, e.g. MLPerf's
large-batch LARS runs), ``mode[MODE]``. ``arch`` defaults to the model name. The result becomes the
defaults of main.py's parser, so every flag given on the command line beats the presets.
``--dry-run`` prints the resolved main.py arguments as YAML and exits without training.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from image_classification import cli, config, flag_rules, settings
from image_classification.errors import UserError

DEFAULT_CFG = Path(__file__).resolve().with_name("configs.yml")
SECTIONS = ("precision", "platform", "mode", "models")


class _Parser(argparse.ArgumentParser):
    """Parse errors become a one-line UserError, like every other launch.py error."""

    def error(self, message: str):
        raise UserError(message)


def _cfg_file_parser() -> argparse.ArgumentParser:
    parser = _Parser(add_help=False, allow_abbrev=False)
    parser.add_argument("--cfg_file", "--cfg-file", dest="cfg_file", default=str(DEFAULT_CFG), metavar="FILE",
                        help="presets file (default: configs.yml beside launch.py)")
    return parser


def build_parser(cfg: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """launch.py's own flags; all other arguments go to main.py unchanged."""
    def listed(section: str) -> str:
        return ", ".join(cfg.get(section) or {}) if cfg else "see configs.yml"

    parser = _Parser(
        prog="launch.py", allow_abbrev=False, parents=[_cfg_file_parser()],
        usage="%(prog)s --model M --precision P --platform PL --mode MODE [--recipe R] [--cfg_file FILE] "
              "[--dry-run] DATA [main.py flags...]",
        description=__doc__.split("\n\n")[0].strip() + " Presets are merged precision -> platform -> "
                    "model -> recipe -> mode (later wins); flags given on the command line win over all presets.",
        epilog="Any other argument (the dataset DIR, -b, --epochs, --workspace, ...) is passed to main.py; "
               "see `python main.py --help`.")
    parser.add_argument("--model", required=True, metavar="M", help=f"one of: {listed('models')}")
    parser.add_argument("--precision", required=True, metavar="P", help=f"one of: {listed('precision')}")
    parser.add_argument("--platform", required=True, metavar="PL", help=f"one of: {listed('platform')}")
    parser.add_argument("--mode", required=True, metavar="MODE", help=f"one of: {listed('mode')}")
    parser.add_argument("--recipe", default=None, metavar="R",
                        help=f"optional published recipe merged over the model's preset: {listed('recipe')}")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the resolved main.py arguments (YAML) and exit without training")
    return parser


def load_config(path: str | Path) -> dict[str, Any]:
    try:
        with open(path) as stream:
            cfg = yaml.safe_load(stream)
    except OSError as error:
        raise UserError(f"cannot read --cfg_file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise UserError(f"--cfg_file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    missing = [section for section in SECTIONS if not isinstance((cfg or {}).get(section), dict)]
    if missing:
        raise UserError(f"--cfg_file {path} lacks the section(s): {', '.join(missing)}")
    return cfg


def _pick(table: dict, key: str, what: str, context: str = "") -> dict:
    if key not in table:
        raise UserError(f"unknown {what} {key!r}{context}; choose from: {', '.join(map(str, table))}")
    return table[key] or {}


def resolve_presets(cfg: dict[str, Any], *, model: str, precision: str, platform: str,
                    mode: str, recipe: str | None = None) -> dict[str, Any]:
    """Merge the preset layers (later wins); ``arch`` defaults to the model name."""
    precision_layer = _pick(cfg["precision"], precision, "--precision")
    platform_layer = _pick(cfg["platform"], platform, "--platform")
    mode_layer = _pick(cfg["mode"], mode, "--mode")
    platforms = _pick(cfg["models"], model, "--model")
    if platform not in platforms:
        raise UserError(f"--model {model} has no preset for --platform {platform}; "
                        f"choose from: {', '.join(platforms)}")
    precisions = platforms[platform] or {}
    if precision not in precisions:
        raise UserError(f"--model {model} on --platform {platform} has no preset for --precision {precision}; "
                        f"choose from: {', '.join(precisions)}")
    recipe_layer = _pick(cfg.get("recipe") or {}, recipe, "--recipe") if recipe else {}
    merged: dict[str, Any] = {"arch": model}
    for layer in (precision_layer, platform_layer, precisions[precision] or {}, recipe_layer, mode_layer):
        merged.update(layer)
    return merged


def split_argv(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str], dict[str, Any]]:
    """(launch.py options, main.py arguments, merged presets)."""
    argv = list(argv)
    pre, _ = _cfg_file_parser().parse_known_args(argv)
    wants_help = any(arg in ("-h", "--help") for arg in argv)
    try:
        cfg = load_config(pre.cfg_file)
    except UserError:
        if not wants_help:
            raise
        cfg = None
    options, rest = build_parser(cfg).parse_known_args(argv)
    presets = resolve_presets(cfg, model=options.model, precision=options.precision,
                              platform=options.platform, mode=options.mode, recipe=options.recipe)
    return options, rest, presets


def dry_run(options: argparse.Namespace, rest: Sequence[str], presets: dict[str, Any]) -> int:
    args = config.parse_args(rest, presets)
    flag_rules.check(args)
    recipe = f" --recipe {options.recipe}" if options.recipe else ""
    print(f"# launch.py --model {options.model} --precision {options.precision} --platform {options.platform} "
          f"--mode {options.mode}{recipe}: resolved main.py arguments")
    resolved = {**vars(args), "workers": settings.loader_workers(args.workers)}
    print(yaml.safe_dump(resolved, sort_keys=True, default_flow_style=None), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        options, rest, presets = split_argv(argv)
        if options.dry_run:
            return dry_run(options, rest, presets)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return cli.main(rest, defaults=presets)


if __name__ == "__main__":
    sys.exit(main())
