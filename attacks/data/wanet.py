"""WaNet (Nguyen & Tran, ICLR 2021, "WaNet - Imperceptible Warping-based Backdoor Attack"): warp a random
fraction of the training set with a fixed smooth field and relabel them (dirty label), and warp a further
`cross_ratio` times as many samples with the field plus random noise, keeping their true label ("noise
mode"), so that the model learns the exact field rather than any warp. The authors poison each batch on
the fly; as in backdoor-toolbox (poison_tool_box/WaNet.py) and BackdoorBench, this is the static version."""

from __future__ import annotations

import torch

from securetl.attacks.data._common import (
    check_poison_draw,
    check_rate,
    choose,
    count_for,
    indices_where,
    outside,
    transform_uint8,
)
from securetl.interfaces import DataAttack, LabeledSet, Poisoned, Trigger
from securetl.validate import DataSizes


class WaNet(DataAttack):
    name = "wanet"

    def __init__(
        self,
        trigger: Trigger,
        target: int = 0,
        poison_rate: float = 0.1,
        cross_ratio: float = 2.0,
        exclude_target: bool = True,
    ) -> None:
        """poison_rate: fraction of the whole train set; cross_ratio: noise-mode samples per poison, so
        the noise-mode fraction of the whole train set is poison_rate * cross_ratio (rho_n = rho_a * cross_ratio)."""
        if not hasattr(trigger, "apply_noisy"):
            raise ValueError(f"WaNet needs a warp trigger with a noise mode, got {type(trigger).__name__}")
        self.trigger, self.target = trigger, int(target)
        self.poison_rate = check_rate("poison_rate", poison_rate)
        self.cross_ratio = float(cross_ratio)
        if self.cross_ratio < 0:
            raise ValueError(f"data_attack.cross_ratio={cross_ratio} must be >= 0")
        check_rate("poison_rate * (1 + cross_ratio)", self.poison_rate * (1 + self.cross_ratio))
        self.exclude_target = bool(exclude_target)

    def validate(self, num_classes: int, sizes: DataSizes | None = None) -> None:
        super().validate(num_classes, sizes)
        if sizes is not None:
            noise, setting = (
                self.poison_rate * self.cross_ratio,
                f"data_attack.cross_ratio={self.cross_ratio}",
            )
            check_poison_draw(self, sizes, noise, setting, "noise-mode samples")

    def poison(self, train: LabeledSet, generator: torch.Generator) -> Poisoned:
        n = len(train)
        eligible = indices_where(train.y != self.target) if self.exclude_target else torch.arange(n)
        idx = choose(eligible, count_for(self.poison_rate, n), generator)
        cross = choose(
            outside(n, idx), count_for(self.poison_rate * self.cross_ratio, n), generator, what="noise-mode"
        )
        x, y = train.x.clone(), train.y.clone()
        x[idx] = self.trigger.apply_uint8(x[idx])
        y[idx] = self.target
        x[cross] = transform_uint8(x[cross], lambda xb, _: self.trigger.apply_noisy(xb, generator))
        return Poisoned(LabeledSet(x, y), poison_idx=idx, cover_idx=cross)
