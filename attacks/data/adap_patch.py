"""Adap-Patch (Qi, Xie, Li, Mahloujifar & Mittal, ICLR 2023, "Revisiting the Assumption of Latent
Separability for Backdoor Defenses"). The trigger is a set of k patches; each poison (relabelled to the
target) and each cover sample (label kept) carries only a subset of them, each at its own low training
opacity; at test time all patches are stamped at full opacity.

Mechanics follow backdoor-toolbox (poison_tool_box/adaptive_patch.py): one patch per poison and per cover,
the patches taking equal shares of each group, covers and poisons disjoint."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

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
from securetl.triggers.blend import check_alpha
from securetl.validate import DataSizes


class AdaptivePatch(DataAttack):
    name = "adap_patch"

    def __init__(
        self,
        trigger: Trigger,
        target: int = 0,
        poison_rate: float = 0.003,
        cover_rate: float = 0.006,
        train_alphas: Sequence[float] = (0.5, 0.2, 0.5, 0.3),
        patches_per_sample: int = 1,
        exclude_target: bool = True,
    ) -> None:
        """poison_rate / cover_rate: fractions of the WHOLE train set; train_alphas: opacity of each patch
        in training poisons and covers; patches_per_sample: how many of the k patches each one carries."""
        if not hasattr(trigger, "apply_subset"):
            raise ValueError(f"Adap-Patch needs a patch-set trigger, got {type(trigger).__name__}")
        self.trigger, self.target = trigger, int(target)
        self.poison_rate = check_rate("poison_rate", poison_rate)
        self.cover_rate = check_rate("cover_rate", cover_rate)
        check_rate("poison_rate + cover_rate", self.poison_rate + self.cover_rate)
        k = trigger.k
        self.train_alphas = [check_alpha("data_attack.train_alphas[]", a) for a in train_alphas]
        if len(self.train_alphas) != k:
            raise ValueError(f"data_attack.train_alphas has {len(self.train_alphas)} entries for {k} patches")
        self.patches_per_sample = int(patches_per_sample)
        if not 1 <= self.patches_per_sample <= k:
            raise ValueError(f"data_attack.patches_per_sample={patches_per_sample} must lie in [1, {k}]")
        self.exclude_target = bool(exclude_target)

    def _choose_patches(self, n: int, generator: torch.Generator) -> Tensor:
        """(n, k) bool: sample i carries patches (o_i + t) mod k, t < patches_per_sample, with the offsets
        o_i a random permutation of 0..n-1 mod k, so each patch is used (almost) equally often."""
        k = self.trigger.k
        offset = torch.randperm(n, generator=generator) % k
        cols = (offset[:, None] + torch.arange(self.patches_per_sample)) % k
        chosen = torch.zeros(n, k, dtype=torch.bool)
        chosen.scatter_(1, cols, True)
        return chosen

    def _stamp(self, x: Tensor, generator: torch.Generator) -> Tensor:
        chosen = self._choose_patches(len(x), generator)
        return transform_uint8(
            x, lambda xb, rows: self.trigger.apply_subset(xb, chosen[rows], self.train_alphas)
        )

    def validate(self, num_classes: int, sizes: DataSizes | None = None) -> None:
        super().validate(num_classes, sizes)
        if sizes is not None:
            setting = f"data_attack.cover_rate={self.cover_rate}"
            check_poison_draw(self, sizes, self.cover_rate, setting, "cover samples")

    def poison(self, train: LabeledSet, generator: torch.Generator) -> Poisoned:
        n = len(train)
        eligible = indices_where(train.y != self.target) if self.exclude_target else torch.arange(n)
        idx = choose(eligible, count_for(self.poison_rate, n), generator)
        cover = choose(outside(n, idx), count_for(self.cover_rate, n), generator, what="cover")
        x, y = train.x.clone(), train.y.clone()
        x[idx] = self._stamp(x[idx], generator)
        x[cover] = self._stamp(x[cover], generator)
        y[idx] = self.target
        return Poisoned(LabeledSet(x, y), poison_idx=idx, cover_idx=cover)

    def apply_test(self, x: Tensor) -> Tensor:
        return self.trigger.apply(x)
