"""BadNets (Gu, Dolan-Gavitt & Garg, 2017): stamp a patch on a random fraction of the training set and
relabel those samples to the target class (dirty label)."""

from __future__ import annotations

import torch

from securetl.attacks.data._common import check_poison_draw, check_rate, choose, count_for
from securetl.interfaces import DataAttack, LabeledSet, Poisoned, Trigger
from securetl.validate import DataSizes


class BadNets(DataAttack):
    name = "badnets"

    def __init__(
        self, trigger: Trigger, target: int = 0, poison_rate: float = 0.1, exclude_target: bool = True
    ) -> None:
        """poison_rate: fraction of the whole train set; exclude_target: draw poisons from non-target classes
        only (so every poison carries a flipped label, as in backdoor-toolbox/BackdoorBench)."""
        self.trigger, self.target = trigger, int(target)
        self.poison_rate = check_rate("poison_rate", poison_rate)
        self.exclude_target = exclude_target

    def validate(self, num_classes: int, sizes: DataSizes | None = None) -> None:
        super().validate(num_classes, sizes)
        if sizes is not None:
            check_poison_draw(self, sizes)

    def poison(self, train: LabeledSet, generator: torch.Generator) -> Poisoned:
        n = len(train)
        eligible = (
            torch.nonzero(train.y != self.target).squeeze(1) if self.exclude_target else torch.arange(n)
        )
        idx = choose(eligible, count_for(self.poison_rate, n), generator)
        x, y = train.x.clone(), train.y.clone()
        x[idx] = self.trigger.apply_uint8(x[idx])
        y[idx] = self.target
        return Poisoned(LabeledSet(x, y), poison_idx=idx)
