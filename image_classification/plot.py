"""Draw a run's training curves from its DLLogger raport.

    python -m image_classification.plot WORKSPACE/experiment_raport.json [-o curves.png]

Four panels over epochs, from the raport's epoch records (step ``[epoch]``): loss (train.loss,
val.loss, val_ema.loss), top-1 (val.top1, val_ema.top1), top-k (val.top5 or whichever
val.top{k} the run used, and its val_ema twin) and the learning rate (train.lr); a fifth shows
the training image size (train.image_size) when the raport has it (stage-wise training). Series the run
did not log are left out. The PNG defaults to the raport's name with ``.png``; the names of the
plotted series are stored in its ``Series`` text field.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Sequence

from image_classification.errors import UserError
from image_classification.reporting.dllogger import read_raport

Series = dict[str, list[tuple[int, float]]]

_TOPK = re.compile(r"^val\.top(\d+)$")


def epoch_series(records: list[dict]) -> Series:
    """metric -> [(epoch, value)] from the epoch records of the last training run in the raport.

    Runs append to the raport, each starting with a PARAMETER record. A resumed run's record has
    ``resume_epoch``: the history so far is kept up to that epoch and continued (a later record
    for the same epoch replaces the earlier one). A fresh training run starts the history anew;
    an ``--evaluate`` run changes nothing.
    """
    by_metric: dict[str, dict[int, float]] = {}
    for record in records:
        step = record.get("step")
        if record.get("type") == "LOG" and step == "PARAMETER":
            _start_run(by_metric, record.get("data") or {})
            continue
        if record.get("type") != "LOG" or not isinstance(step, list) or len(step) != 1:
            continue
        for name, value in (record.get("data") or {}).items():
            number = _number(value)
            if number is not None:
                by_metric.setdefault(name, {})[int(step[0])] = number
    return {name: sorted(points.items()) for name, points in by_metric.items() if points}


def _start_run(by_metric: dict[str, dict[int, float]], parameters: dict) -> None:
    if parameters.get("evaluate"):
        return
    first_new = int(parameters.get("resume_epoch", 0))
    for points in by_metric.values():
        for epoch in [e for e in points if e >= first_new]:
            del points[epoch]


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if value in ("nan", "inf", "-inf"):  # non-finite floats are written as strings
        return float(value)
    return None


def panels(series: Series) -> list[tuple[str, str, list[str]]]:
    """(title, y label, metric names) per panel, keeping only metrics present in ``series``."""
    ks = sorted(int(m.group(1)) for name in series if (m := _TOPK.match(name)) and m.group(1) != "1")
    topk = f"top{ks[0]}" if ks else "top5"
    layout = [
        ("Loss", "loss", ["train.loss", "val.loss", "val_ema.loss"]),
        ("Top-1 accuracy", "%", ["val.top1", "val_ema.top1"]),
        (f"Top-{topk[3:]} accuracy", "%", [f"val.{topk}", f"val_ema.{topk}"]),
        ("Learning rate", "lr", ["train.lr"]),
    ]
    if "train.image_size" in series:  # stage-wise runs: the training resolution per epoch
        layout.append(("Training image size", "px", ["train.image_size"]))
    return [(title, label, [name for name in names if name in series]) for title, label, names in layout]


def plot_raport(raport: str | Path, output: str | Path | None = None, title: str | None = None) -> tuple[Path, list[str]]:
    """Write the curves of ``raport`` to ``output`` (PNG); returns (path, plotted series)."""
    raport = Path(raport)
    if not raport.is_file():
        raise UserError(f"raport {raport} does not exist")
    try:
        records = read_raport(raport)
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{raport} is not a DLLogger raport (a line cannot be parsed: {error})") from None
    if not records:
        raise UserError(f"{raport} has no DLLL records; is it a raport written by main.py?")
    series = epoch_series(records)
    layout = panels(series)
    plotted = [name for _, _, names in layout for name in names]
    if not plotted:
        raise UserError(f"{raport} has no epoch records (step [epoch]) with loss, accuracy or LR: the run "
                        "did not finish an epoch")
    output = Path(output) if output else raport.with_suffix(".png")
    if not output.parent.resolve().is_dir():
        raise UserError(f"output directory {output.parent} does not exist")

    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    columns = -(-len(layout) // 2)
    figure, axes = plt.subplots(2, columns, figsize=(5.5 * columns, 7.5))
    try:
        for axis in axes.flat[len(layout):]:
            axis.set_visible(False)
        for axis, (panel_title, ylabel, names) in zip(axes.flat, layout):
            axis.set_title(panel_title)
            axis.set_xlabel("epoch")
            axis.set_ylabel(ylabel)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.grid(True, alpha=0.3)
            for name in names:
                epochs, values = zip(*series[name])
                axis.plot(epochs, values, marker="o" if len(epochs) < 30 else None, markersize=3, label=name)
            if names:
                axis.legend()
            else:
                axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes)
        figure.suptitle(title or raport.name)
        figure.tight_layout()
        figure.savefig(output, dpi=100, metadata={"Series": json.dumps(plotted), "Software": "convnets"})
    finally:
        plt.close(figure)
    return output, plotted


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m image_classification.plot",
                                     description="Plot loss, top-1, top-k and LR over epochs from a raport.")
    parser.add_argument("raport", help="DLLogger raport (WORKSPACE/experiment_raport.json)")
    parser.add_argument("-o", "--output", default=None, help="PNG to write (default: the raport with .png)")
    parser.add_argument("--title", default=None, help="figure title (default: the raport's file name)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path, plotted = plot_raport(args.raport, args.output, args.title)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"=> wrote {path} ({', '.join(plotted)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
