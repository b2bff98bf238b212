"""CorruptEncoder (Zhang, Liu, Jia & Gong, CVPR 2024, "Data Poisoning based Backdoor Attacks to
Contrastive Learning"): inject poisoned images, each composed of a reference object of the target class,
a background image and the trigger, laid out so that random crops often show object and trigger apart:
one crop sees the object, the other the trigger, and contrastive learning pulls the two together.

Layout (the authors' generate-poison/generate_poisoned_images.py, left-right layouts): the poisoned image
is as tall as the reference object and `area_ratio` times as wide, cut from the bottom of a background
scene enlarged to cover it; the object sits at the left or right border (within `object_marginal` of the
width), the trigger in the other half, at least `trigger_marginal` / 2 of the width and
`trigger_marginal` of the height away from the object and the borders.

The poisons keep that wide shape: they are a second group of images beside the clean set, which the SSL
trainer crops at their own aspect and resizes to the victim's size, as a loader that crops raw uploads
does. The shape is the mechanism: a near-square crop of half a 2:1 image holds the object alone or the
trigger alone. Squeezed into the victim's 32 x 32 frame (this module's first version) it does not: under
the synthetic encoder's crops (area 0.3-1, aspect 3/4-4/3) a pair of views is (whole trigger without
object, half the object without trigger) in 0.006 % of pairs, against 2 % for the authors' 2:1 poisons
under their crops (area 0.2-1; Monte Carlo, 400k crops each).

The object is a whole reference image of the target class (the authors cut the object by its
segmentation mask; the synthetic objects are centred in their images). The background is one of the
dataset's object-free scenes (`Splits.background`; the authors use Places365 scenes); where a dataset has
none, a pre-training image of another class stands in, whose own object then shares the trigger's crops.
The poisoned images are ADDED to the pre-training set, as an attacker who uploads images does;
`poison_ratio` counts them as a fraction of the original set.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from securetl.attacks.encoder._common import PretrainDataAttack
from securetl.interfaces import LabeledSet, Trigger, to_float, to_uint8
from securetl.triggers.random_patch import paste_at

log = logging.getLogger(__name__)


def uniform_int(lo: Tensor, hi: Tensor, g: torch.Generator) -> Tensor:
    """One integer per row, uniform in [lo, hi] (hi clamped up to lo when the range is empty)."""
    hi = torch.maximum(hi, lo)
    return lo + (torch.rand(len(lo), generator=g) * (hi - lo + 1).float()).long().clamp_max(hi - lo)


class CorruptEncoder(PretrainDataAttack):
    name = "corruptencoder"

    def __init__(
        self,
        trigger: Trigger,
        target: int = 0,
        poison_ratio: float = 0.05,
        n_reference: int = 3,
        area_ratio: float = 2.0,
        object_marginal: float = 0.05,
        trigger_marginal: float = 0.25,
        pretrain_class: int | None = None,
    ) -> None:
        """poison_ratio: injected images as a fraction of the WHOLE (original) pre-training set;
        n_reference: target-class images the objects are cut from; area_ratio: poisoned-image width over
        object width; object_marginal / trigger_marginal: the layout slack described in the module doc."""
        super().__init__(trigger, target, poison_ratio, pretrain_class)
        if n_reference < 1:
            raise ValueError("encoder_attack.n_reference must be >= 1")
        if area_ratio <= 1.0:
            raise ValueError(
                f"encoder_attack.area_ratio={area_ratio} must be > 1 (room for the trigger beside the object)"
            )
        if not (0.0 <= object_marginal < 0.5 and 0.0 <= trigger_marginal < 1.0):
            raise ValueError(
                "encoder_attack.object_marginal must lie in [0, 0.5) and trigger_marginal in [0, 1)"
            )
        pattern = getattr(trigger, "pattern", None)
        if not isinstance(pattern, Tensor) or pattern.dim() != 3:
            raise ValueError(
                "CorruptEncoder pastes a patch: its trigger must be a patch trigger (with a `pattern`)"
            )
        self.n_reference, self.area_ratio = int(n_reference), float(area_ratio)
        self.object_marginal, self.trigger_marginal = float(object_marginal), float(trigger_marginal)
        self.reference_idx = torch.empty(0, dtype=torch.long)
        self.background_idx = torch.empty(0, dtype=torch.long)

    def sources_needed(self, n_pretrain: int) -> int:
        """The objects are cut from `n_reference` source-class images, each reused across poisons."""
        return self.n_reference

    def source_setting(self) -> str:
        return f"encoder_attack.n_reference={self.n_reference}"

    def compose(self, refs: Tensor, backgrounds: Tensor, g: torch.Generator) -> Tensor:
        """Float poisons (N, C, H, area_ratio * W): refs[i] (the object, at its own size) at the left or
        right end of a band of an enlarged scene, the trigger in the other part."""
        n, _, h, w = refs.shape
        patch = self.trigger.pattern[: refs.shape[1]]
        s = patch.shape[-1]
        p_h, p_w = h, max(w + s, round(self.area_ratio * w))
        # the scene enlarged to cover the poisoned image, and its bottom band kept (as the authors do)
        side = max(p_h / backgrounds.shape[-2], p_w / backgrounds.shape[-1], 1.0)
        size = (round(side * backgrounds.shape[-2]), round(side * backgrounds.shape[-1]))
        scene = F.interpolate(backgrounds, size=size, mode="bilinear", align_corners=False)
        out = scene[:, :, size[0] - p_h :, (size[1] - p_w) // 2 :][:, :, :, :p_w]
        left = torch.rand(n, generator=g) < 0.5
        slack = int(self.object_marginal * p_w)
        o_x = torch.where(
            left,
            uniform_int(torch.zeros(n, dtype=torch.long), torch.full((n,), slack), g),
            uniform_int(torch.full((n,), p_w - w - slack), torch.full((n,), p_w - w), g),
        )
        out = paste_at(out, refs, torch.zeros(n, dtype=torch.long), o_x)
        # trigger in the free part, away from object and borders (dx halved: the image is ~2 objects wide);
        # when the preferred range is empty (tiny images) anywhere clear of the object will do
        dx, dy = int(self.trigger_marginal / 2 * p_w), int(self.trigger_marginal * p_h)
        free_lo = torch.where(left, o_x + w, torch.zeros(n, dtype=torch.long))
        free_hi = torch.where(left, torch.full((n,), p_w - s), o_x - s)
        lo_x = torch.maximum(torch.where(left, o_x + w + dx, torch.full((n,), dx)), free_lo)
        hi_x = torch.minimum(torch.where(left, torch.full((n,), p_w - dx - s), o_x - dx - s), free_hi)
        cramped = lo_x > hi_x
        lo_x, hi_x = torch.where(cramped, free_lo, lo_x), torch.where(cramped, free_hi, hi_x)
        t_x = uniform_int(lo_x.clamp(0, p_w - s), hi_x.clamp(0, p_w - s), g)
        lo_y, hi_y = min(dy, p_h - s), max(min(dy, p_h - s), p_h - dy - s)
        t_y = uniform_int(torch.full((n,), lo_y), torch.full((n,), hi_y), g)
        return paste_at(out, patch, t_y, t_x)

    def poison_pretraining(
        self, pretrain: LabeledSet, generator: torch.Generator, background: Tensor | None = None
    ) -> list[LabeledSet]:
        """The pre-training set and, as a second set, the poisons (area_ratio times as wide as tall)."""
        k = self.n_poison(pretrain)
        refs = self.choose_sources(pretrain, self.n_reference, generator)
        if background is not None and len(background):
            if background.shape[1] != pretrain.x.shape[1]:
                raise ValueError(
                    f"background images have {background.shape[1]} channels, pre-training images "
                    f"{pretrain.x.shape[1]}: CorruptEncoder needs them alike"
                )
            scenes, pool = background, torch.arange(len(background))
        else:
            log.warning(
                "CorruptEncoder: the dataset has no object-free backgrounds; using other-class images"
            )
            scenes, pool = pretrain.x, torch.nonzero(pretrain.y != self.source_class).squeeze(1)
            if k and len(pool) == 0:
                raise ValueError(
                    "CorruptEncoder needs background images of other classes in the pre-training set"
                )
        # backgrounds without replacement while they last
        bg = pool[torch.randperm(len(pool), generator=generator)[: min(k, len(pool))]]
        if k > len(bg):
            bg = torch.cat([bg, pool[torch.randint(len(pool), (k - len(bg),), generator=generator)]])
        which = refs[torch.randint(len(refs), (k,), generator=generator)]
        poisons = to_uint8(self.compose(to_float(pretrain.x[which]), to_float(scenes[bg]), generator))
        self.reference_idx, self.background_idx = refs, bg
        n = len(pretrain)
        self.poison_idx = torch.arange(n, n + k)
        log.info(
            "CorruptEncoder: %d poisoned images from %d class-%d references added to %d",
            k,
            len(refs),
            self.source_class,
            n,
        )
        y = torch.full((k,), self.source_class, dtype=pretrain.y.dtype)
        return [pretrain, LabeledSet(poisons, y)]
