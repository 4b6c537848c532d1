"""Classification loss with label smoothing, for hard (int) and soft (MixUp/CutMix) targets.

``F.cross_entropy(label_smoothing=eps)`` computes ``(1-eps)*CE(target) + eps*mean_c(-log p_c)``
for both target kinds, which is exactly the reference's LabelSmoothing and NLLMultiLabelSmooth,
so no hand-written loss is needed. Logits are cast to fp32 first (as the reference did under AMP).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class SmoothedCrossEntropy(torch.nn.Module):
    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)
