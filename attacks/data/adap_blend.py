"""Adap-Blend (Qi, Xie, Li, Mahloujifar & Mittal, ICLR 2023, "Revisiting the Assumption of Latent
Separability for Backdoor Defenses"). The blend trigger is cut into a grid of pieces; every poison
(relabelled to the target) and every cover sample (label kept) carries the trigger with a random subset
of pieces masked out, at a low training opacity. At test time the full trigger is used, at a higher
opacity. Cover samples and the partial triggers keep the poisons' latent representations close to the
clean ones, which defeats defenses that assume latent separability.

Mechanics follow backdoor-toolbox (poison_tool_box/adaptive_blend.py): x + a * mask * (pattern - x), a
grid of `pieces` cells of which round(mask_rate * pieces) are masked per sample, covers and poisons
disjoint."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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
from securetl.attacks.data.blended import with_alpha
from securetl.interfaces import DataAttack, LabeledSet, Poisoned, Trigger
from securetl.triggers.blend import check_alpha
from securetl.validate import DataSizes


def piece_masks(n: int, pieces: int, masked: int, h: int, w: int, generator: torch.Generator) -> Tensor:
    """(n, 1, h, w) masks: a sqrt(pieces) x sqrt(pieces) grid with `masked` random cells set to 0 per sample."""
    side = math.isqrt(pieces)
    order = torch.rand(n, pieces, generator=generator).argsort(dim=1)
    keep = torch.ones(n, pieces)
    keep.scatter_(1, order[:, :masked], 0.0)
    return F.interpolate(keep.view(n, 1, side, side), size=(h, w), mode="nearest")


class AdaptiveBlend(DataAttack):
    name = "adap_blend"

    def __init__(
        self,
        trigger: Trigger,
        target: int = 0,
        poison_rate: float = 0.003,
        cover_rate: float = 0.003,
        train_alpha: float = 0.15,
        test_alpha: float | None = None,
        pieces: int = 16,
        mask_rate: float = 0.5,
        exclude_target: bool = True,
    ) -> None:
        """poison_rate / cover_rate: fractions of the WHOLE train set; train_alpha: opacity of the partial
        training triggers; test_alpha: opacity of the full test trigger (None: the trigger's alpha);
        pieces: grid cells (a square number); mask_rate: fraction of cells masked on each sample."""
        if not hasattr(trigger, "blend"):
            raise ValueError(f"Adap-Blend needs a blend trigger, got {type(trigger).__name__}")
        self.trigger, self.target = trigger, int(target)
        self.poison_rate = check_rate("poison_rate", poison_rate)
        self.cover_rate = check_rate("cover_rate", cover_rate)
        check_rate("poison_rate + cover_rate", self.poison_rate + self.cover_rate)
        self.train_alpha = check_alpha("data_attack.train_alpha", train_alpha)
        self.test_trigger = with_alpha(trigger, test_alpha, "test_alpha")
        self.pieces = int(pieces)
        if self.pieces < 1 or math.isqrt(self.pieces) ** 2 != self.pieces:
            raise ValueError(
                f"data_attack.pieces={pieces} must be a square number (a grid of pieces), e.g. 16"
            )
        self.mask_rate = check_rate("mask_rate", mask_rate)
        self.masked = int(round(self.mask_rate * self.pieces))
        if self.masked >= self.pieces:
            raise ValueError(
                f"data_attack.mask_rate={mask_rate} masks all {self.pieces} pieces: no trigger left"
            )
        self.exclude_target = bool(exclude_target)

    def _stamp(self, x: Tensor, generator: torch.Generator) -> Tensor:
        h, w = x.shape[-2:]
        masks = piece_masks(len(x), self.pieces, self.masked, h, w, generator)
        return transform_uint8(x, lambda xb, rows: self.trigger.blend(xb, self.train_alpha, masks[rows]))

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
        return self.test_trigger.apply(x)
