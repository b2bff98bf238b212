"""SIG (Barni, Kallas & Tondi, ICIP 2019, "A new backdoor attack in CNNs by training set corruption
without label poisoning"): CLEAN LABEL. Only target-class training images get the sinusoidal signal and
no label changes; at test time the signal is added to every input."""

from __future__ import annotations

import torch
from torch import Tensor

from securetl.attacks.data._common import check_rate, choose, count_for, indices_where, need
from securetl.interfaces import DataAttack, LabeledSet, Poisoned, Trigger
from securetl.triggers.sinusoid import check_delta
from securetl.validate import DataSizes


class SIG(DataAttack):
    name = "sig"

    def __init__(
        self, trigger: Trigger, target: int = 0, poison_rate: float = 0.02, test_delta: float | None = None
    ) -> None:
        """poison_rate: fraction of the WHOLE train set (all drawn from the target class);
        test_delta: signal amplitude at test time (None: the trigger's own delta)."""
        self.trigger, self.target = trigger, int(target)
        self.poison_rate = check_rate("poison_rate", poison_rate)
        self.test_trigger = trigger
        if test_delta is not None:
            check_delta("data_attack.test_delta", test_delta)
            if not hasattr(trigger, "with_delta"):
                raise ValueError(
                    f"data_attack.test_delta needs a sinusoid trigger, got {type(trigger).__name__}"
                )
            self.test_trigger = trigger.with_delta(test_delta)

    def validate(self, num_classes: int, sizes: DataSizes | None = None) -> None:
        super().validate(num_classes, sizes)
        if sizes is not None:
            k = count_for(self.poison_rate, sizes.n_train)
            what = f"clean-label poisons of the target class {self.target}"
            need(k, sizes.train[self.target], f"data_attack.poison_rate={self.poison_rate}", what)

    def poison(self, train: LabeledSet, generator: torch.Generator) -> Poisoned:
        n = len(train)
        eligible = indices_where(train.y == self.target)
        idx = choose(
            eligible, count_for(self.poison_rate, n), generator, what="target-class (clean-label) poison"
        )
        x = train.x.clone()
        x[idx] = self.trigger.apply_uint8(x[idx])
        return Poisoned(LabeledSet(x, train.y.clone()), poison_idx=idx)

    def apply_test(self, x: Tensor) -> Tensor:
        return self.test_trigger.apply(x)
