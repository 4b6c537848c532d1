"""Is the export faithful? Run it and the eager model on the same random images and compare."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from image_classification.deploy.runners import Runner
from image_classification.errors import UserError


@dataclass(frozen=True)
class Parity:
    batch: int
    max_abs_diff: float
    max_abs_output: float
    top1_agreement: float = 1.0  # fraction of images whose top-1 class is the same

    def scaled(self) -> float:
        """Difference relative to the output magnitude (absolute when outputs are within +-1)."""
        return self.max_abs_diff / max(1.0, self.max_abs_output)


def compare(got: torch.Tensor, expected: torch.Tensor) -> Parity:
    """The logits ``got`` from an export against ``expected`` from PyTorch, for the same images."""
    return Parity(batch=len(expected), max_abs_diff=float((got - expected).abs().max()),
                  max_abs_output=float(expected.abs().max()),
                  top1_agreement=float((got.argmax(1) == expected.argmax(1)).double().mean()))


def check_parity(runner: Runner, model: nn.Module, image_size: int, *, device: torch.device,
                 batches: Sequence[int] = (1, 4), seed: int = 0) -> list[Parity]:
    """Feed the same random images to ``runner`` and to the eager ``model``; one result per batch."""
    generator = torch.Generator().manual_seed(seed)
    results = []
    for batch in batches:
        images = torch.randn(batch, 3, image_size, image_size, generator=generator)
        with torch.no_grad():
            expected = model(images.to(device)).float().cpu()
        got = runner(images).float()
        if got.shape != expected.shape:
            raise UserError(f"exported model returned shape {list(got.shape)} for batch {batch}, "
                            f"PyTorch {list(expected.shape)}")
        results.append(compare(got, expected))
    return results
