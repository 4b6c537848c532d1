"""Test driver: ``main.py`` plus a BatchNorm-free test architecture and a per-rank weight dump.

BatchNorm statistics depend on the per-process batch, so comparing a 2-process run with a
1-process run of double batch needs a model without it. ``DUMP_WEIGHTS=PREFIX`` makes every rank
write its final weights to ``PREFIX.rank<R>`` (and its EMA weights to ``PREFIX.ema.rank<R>``).
"""
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from image_classification import cli  # noqa: E402
from image_classification.engine import loop  # noqa: E402
from image_classification.models.registry import ModelSpec, register  # noqa: E402


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


register(ModelSpec("tiny-cnn", "test", tiny_cnn, default_image_size=16))
_fit = loop.fit


def fit_and_dump(parts, *args, **kwargs):
    state = _fit(parts, *args, **kwargs)
    prefix = os.environ.get("DUMP_WEIGHTS")
    if prefix:
        torch.save(parts.module.state_dict(), f"{prefix}.rank{os.environ.get('RANK', '0')}")
        if parts.ema is not None:
            torch.save(parts.ema.state_dict(), f"{prefix}.ema.rank{os.environ.get('RANK', '0')}")
    return state


loop.fit = fit_and_dump

# FAIL_AT_BATCH=N: on its first attempt (torchrun restart count 0), rank 1 dies at training batch N.
if os.environ.get("FAIL_AT_BATCH") and os.environ.get("RANK") == "1" \
        and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    from image_classification.engine import trainer
    _forward_backward, _calls = trainer._forward_backward, [0]

    def failing_forward_backward(*args, **kwargs):
        _calls[0] += 1
        if _calls[0] == int(os.environ["FAIL_AT_BATCH"]):
            os._exit(3)  # a crash: no cleanup, no checkpoint
        return _forward_backward(*args, **kwargs)

    trainer._forward_backward = failing_forward_backward

if __name__ == "__main__":
    sys.exit(cli.main())
