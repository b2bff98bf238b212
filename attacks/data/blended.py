"""Blended (Chen, Liu, Li, Lu & Song, 2017, "Targeted Backdoor Attacks on Deep Learning Systems Using
Data Poisoning"): blend a full-image pattern into a random fraction of the training set with opacity
alpha and relabel those samples to the target (dirty label). Train and test opacity may differ."""

from __future__ import annotations

import torch
from torch import Tensor

from securetl.attacks.data._common import check_poison_draw, check_rate, choose, count_for, indices_where
from securetl.interfaces import DataAttack, LabeledSet, Poisoned, Trigger
from securetl.triggers.blend import check_alpha
from securetl.validate import DataSizes


def with_alpha(trigger: Trigger, alpha: float | None, what: str) -> Trigger:
    """`trigger` at opacity `alpha` (None: as configured); only blend-style triggers have an opacity."""
    if alpha is None:
        return trigger
    check_alpha(f"data_attack.{what}", alpha)
    if not hasattr(trigger, "with_alpha"):
        raise ValueError(f"data_attack.{what}={alpha} needs a blend trigger, got {type(trigger).__name__}")
    return trigger.with_alpha(alpha)


class Blended(DataAttack):
    name = "blended"

    def __init__(
        self,
        trigger: Trigger,
        target: int = 0,
        poison_rate: float = 0.1,
        exclude_target: bool = True,
        train_alpha: float | None = None,
        test_alpha: float | None = None,
    ) -> None:
        """poison_rate: fraction of the whole train set; train_alpha/test_alpha: blend opacity used to
        poison / at test time (None: the trigger's own alpha)."""
        self.trigger, self.target = trigger, int(target)
        self.poison_rate = check_rate("poison_rate", poison_rate)
        self.exclude_target = bool(exclude_target)
        self.train_trigger = with_alpha(trigger, train_alpha, "train_alpha")
        self.test_trigger = with_alpha(trigger, test_alpha, "test_alpha")

    def validate(self, num_classes: int, sizes: DataSizes | None = None) -> None:
        super().validate(num_classes, sizes)
        if sizes is not None:
            check_poison_draw(self, sizes)

    def poison(self, train: LabeledSet, generator: torch.Generator) -> Poisoned:
        n = len(train)
        eligible = indices_where(train.y != self.target) if self.exclude_target else torch.arange(n)
        idx = choose(eligible, count_for(self.poison_rate, n), generator)
        x, y = train.x.clone(), train.y.clone()
        x[idx] = self.train_trigger.apply_uint8(x[idx])
        y[idx] = self.target
        return Poisoned(LabeledSet(x, y), poison_idx=idx)

    def apply_test(self, x: Tensor) -> Tensor:
        return self.test_trigger.apply(x)
