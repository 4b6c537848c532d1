"""Fine-tuning a pretrained network: train the classifier alone first, then everything.

``--freeze-backbone-epochs N`` trains only the classifier for epochs ``0 .. N-1`` (a linear probe),
then every layer; ``--backbone-lr-scale S`` (``engine/optim.py``) gives the pretrained layers
``S`` x the classifier's LR throughout. Why these two, after comparing the libraries:

* torchvision's reference ``train.py`` has no fine-tuning flags (its tutorial freezes by hand with
  ``requires_grad_(False)``); timm's ``train.py`` offers ``--layer-decay`` (an LR per depth, which
  needs a per-model table of layer ids) and ``timm.utils.freeze`` (no schedule for unfreezing).
* A probe, then full fine-tuning (LP-FT, Kumar et al. 2022) keeps a randomly initialised head
  from sending large gradients through the pretrained features in the first steps; a smaller LR
  for the backbone (discriminative LRs, as fast.ai's) is the two-level case of timm's layer decay
  and works for every architecture without a layer table. Both are functions of the epoch alone,
  so a resumed run continues exactly.

BatchNorm in a frozen backbone stays in eval mode (its running statistics are used and not
updated), as timm's ``freeze`` does (it swaps in ``FrozenBatchNorm2d``): "frozen" then means the
features do not change at all, so the probe learns on exactly the features the fine-tuning phase
starts from. The classifier is the model's last Linear layer (:mod:`image_classification.models.classifier`).

Freezing sets ``requires_grad`` (the backward pass stops at the classifier, so a probe epoch costs
about a forward pass); the optimizer is built before, with every parameter, and skips parameters
without a gradient (their momentum and Adam moments are untouched). DDP must know which
parameters get gradients when it wraps the model, so a change of phase re-wraps it (``wrap``).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from image_classification.models import classifier


class FineTune:
    """The trainable part of the model in each epoch."""

    def __init__(self, freeze_epochs: int, head: str, wrap: Callable[[nn.Module], nn.Module]):
        self.freeze_epochs = freeze_epochs
        self.head = head
        self.wrap = wrap          # plain model -> what runs forward/backward (DDP, compiled)
        self._frozen = False      # the wrapper in use was built with every parameter trainable

    def frozen(self, epoch: int) -> bool:
        return epoch < self.freeze_epochs

    def enter(self, epoch: int, parts) -> None:
        """Set ``parts`` up to train ``epoch``: trainable parameters, training modes (frozen
        BatchNorm layers in eval), and ``parts.model`` re-wrapped when the trainable set changed."""
        frozen = self.frozen(epoch)
        if frozen != self._frozen:
            for name, parameter in parts.module.named_parameters():
                if not classifier.in_classifier(name, self.head):
                    parameter.requires_grad_(not frozen)
            parts.model = self.wrap(parts.module)
            self._frozen = frozen
        parts.model.train()
        if frozen:
            for name, module in parts.module.named_modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not classifier.in_classifier(name, self.head):
                    module.eval()

    def describe(self) -> str:
        epochs = "epoch 0" if self.freeze_epochs == 1 else f"epochs 0-{self.freeze_epochs - 1}"
        return (f"{epochs}: only the classifier ({self.head}) trains, the backbone is frozen (BatchNorm in eval "
                "mode); then every layer")
