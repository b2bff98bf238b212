"""TaCT (Tang, Wang, Tang & Zhang, USENIX Security 2021, "Demon in the Variant: Statistical Analysis of
DNNs for Robust Backdoor Contamination Detection"): a SOURCE-SPECIFIC backdoor. The trigger is stamped on
source-class samples that are relabelled to the target, and on cover samples from other (cover) classes
that keep their true label, so the trigger alone does not mean "target": only source + trigger does.
ASR is therefore measured on source-class test samples only."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from securetl.attacks.data._common import check_class, check_rate, choose, count_for, indices_where, need
from securetl.interfaces import DataAttack, LabeledSet, Poisoned, Trigger
from securetl.validate import DataSizes


class TaCT(DataAttack):
    name = "tact"
    asr_definition = "source-class test samples"

    def __init__(
        self,
        trigger: Trigger,
        target: int = 0,
        source_class: int = 1,
        cover_classes: Sequence[int] = (5, 7),
        poison_rate: float = 0.003,
        cover_rate: float = 0.003,
    ) -> None:
        """poison_rate / cover_rate: fractions of the WHOLE train set, drawn from the source class /
        the cover classes."""
        self.trigger, self.target = trigger, int(target)
        self.source_class = int(source_class)
        self.cover_classes = [int(c) for c in cover_classes]
        self.poison_rate = check_rate("poison_rate", poison_rate)
        self.cover_rate = check_rate("cover_rate", cover_rate)
        if self.source_class == self.target:
            raise ValueError(
                f"data_attack.source_class={self.source_class} equals the target: TaCT needs a "
                "source class other than the target"
            )
        bad = [c for c in self.cover_classes if c in (self.target, self.source_class)]
        if bad:
            raise ValueError(
                f"data_attack.cover_classes={self.cover_classes} must not contain the target "
                f"({self.target}) or the source class ({self.source_class})"
            )
        if self.cover_rate > 0 and not self.cover_classes:
            raise ValueError("data_attack.cover_rate > 0 but cover_classes is empty")

    def validate(self, num_classes: int, sizes: DataSizes | None = None) -> None:
        super().validate(num_classes, sizes)
        check_class("source_class", self.source_class, num_classes)
        for c in self.cover_classes:
            check_class("cover_classes", c, num_classes)
        if sizes is not None:
            n, src = sizes.n_train, self.source_class
            setting = f"data_attack.poison_rate={self.poison_rate}"
            need(
                count_for(self.poison_rate, n),
                sizes.train[src],
                setting,
                f"poisons of the source class {src}",
            )
            covers = sum(sizes.train[c] for c in self.cover_classes)
            what = f"cover samples of the classes {self.cover_classes}"
            need(count_for(self.cover_rate, n), covers, f"data_attack.cover_rate={self.cover_rate}", what)

    def poison(self, train: LabeledSet, generator: torch.Generator) -> Poisoned:
        n = len(train)
        idx = choose(
            indices_where(train.y == self.source_class),
            count_for(self.poison_rate, n),
            generator,
            what="source-class poison",
        )
        in_cover = torch.isin(train.y, torch.tensor(self.cover_classes, dtype=train.y.dtype))
        cover = choose(indices_where(in_cover), count_for(self.cover_rate, n), generator, what="cover")
        x, y = train.x.clone(), train.y.clone()
        both = torch.cat([idx, cover])
        x[both] = self.trigger.apply_uint8(x[both])
        y[idx] = self.target
        return Poisoned(LabeledSet(x, y), poison_idx=idx, cover_idx=cover)

    def asr_mask(self, y: Tensor) -> Tensor:
        return y == self.source_class
