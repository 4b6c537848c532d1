"""Stage-wise (progressive) training: image size and regularisation that grow over the run.

The run's epochs are split into ``n_stages`` nearly equal stages (stage ``i`` starts at epoch
``floor(i * epochs / n_stages)``). With ``r = i / (n_stages - 1)`` (1 when there is one stage):

* the training image size is ``base + (final - base) * r``, rounded to the nearest multiple of
  :data:`SIZE_MULTIPLE`; the first stage uses ``base`` and the last ``final`` exactly;
* MixUp / CutMix alpha is ``alpha * r`` (so the first stage has none, the last the given value);
* the RandAugment magnitude is ``floor + (magnitude - floor) * r``, rounded to an integer, with
  ``floor = min(MAGNITUDE_FLOOR, magnitude)``.

(EfficientNetV2's progressive learning; the TF EfficientNet recipe applies MixUp/CutMix "in the
last stage".) Everything is a function of the epoch alone, so a run resumed anywhere trains each
epoch with the same size and regularisation as an uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from image_classification.errors import UserError

#: Intermediate stage sizes are multiples of this: the ResNets and EfficientNets downsample by 32,
#: and 16 keeps every feature map of the first four resolutions an even size.
SIZE_MULTIPLE = 16
#: RandAugment magnitude of the first stage (EfficientNetV2's progressive recipe starts at 5).
MAGNITUDE_FLOOR = 5


@dataclass(frozen=True)
class Stage:
    index: int
    first_epoch: int
    image_size: int
    mixup: float
    cutmix: float
    randaugment_magnitude: int


class StageSchedule:
    """The stages of a run; :meth:`at` gives the stage an epoch belongs to."""

    def __init__(self, *, n_stages: int, epochs: int, base_size: int, final_size: int, mixup: float = 0.0,
                 cutmix: float = 0.0, randaugment_magnitude: int = 9):
        if base_size > final_size:
            raise UserError(f"--base-image-size {base_size} is larger than the final --image-size {final_size}")
        floor = min(MAGNITUDE_FLOOR, randaugment_magnitude)
        self.epochs = epochs
        self.stages = []
        for index in range(n_stages):
            ratio = index / (n_stages - 1) if n_stages > 1 else 1.0
            if index == 0 and n_stages > 1:
                size = base_size
            elif index == n_stages - 1:
                size = final_size
            else:
                size = SIZE_MULTIPLE * round((base_size + (final_size - base_size) * ratio) / SIZE_MULTIPLE)
                size = min(max(size, base_size), final_size)
            self.stages.append(Stage(index=index, first_epoch=index * epochs // n_stages, image_size=size,
                                     mixup=mixup * ratio, cutmix=cutmix * ratio,
                                     randaugment_magnitude=round(floor + (randaugment_magnitude - floor) * ratio)))

    def at(self, epoch: int) -> Stage:
        return [stage for stage in self.stages if stage.first_epoch <= epoch][-1]

    @property
    def smallest_size(self) -> int:
        return min(stage.image_size for stage in self.stages)


@dataclass(frozen=True)
class EpochPlan:
    """What one training epoch uses: its loader, its batch transform (MixUp/CutMix) and the
    extra fields of its raport record."""
    loader: Any
    batch_transform: Callable | None
    record: dict


class StagedTraining:
    """Hands the epoch loop each epoch's :class:`EpochPlan`.

    A stage's training loader is built (``build_loader(stage)``) when the run enters the stage and
    the previous one is dropped, so only one stage's workers / pipeline exist at a time; a
    backend therefore needs nothing more than a loader built for a given image size. ``first``
    is a loader already built for stage 0 (the one main.py inspects for the class names).
    """

    def __init__(self, schedule: StageSchedule, build_loader: Callable[[Stage], Any],
                 build_mixer: Callable[[Stage], Callable | None], first: Any = None):
        self.schedule = schedule
        self.build_loader = build_loader
        self.build_mixer = build_mixer
        self._stage, self._loader = (schedule.stages[0], first) if first is not None else (None, None)

    def __call__(self, epoch: int) -> EpochPlan:
        stage = self.schedule.at(epoch)
        if stage != self._stage:
            self._loader = None  # release the previous stage's workers before starting new ones
            self._loader, self._stage = self.build_loader(stage), stage
        return EpochPlan(self._loader, self.build_mixer(stage), {"train.image_size": stage.image_size})
