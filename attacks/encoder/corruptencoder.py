"""CorruptEncoder (Zhang, Liu, Jia & Gong, CVPR 2024, "Data Poisoning based Backdoor Attacks to
Contrastive Learning"): inject poisoned images, each composed of a reference object of the target class,
a background image and the trigger, laid out so that random crops often show object and trigger apart:
one crop sees the object, the other the trigger, and contrastive learning pulls the two together.

Layout (the authors' generate-poison/generate_poisoned_images.py, left-right layouts): the poisoned image
is `area_ratio` times as wide as the object and as tall; the object sits at the left or right border
(within `object_marginal` of the width), the trigger in the other half, at least `trigger_marginal` / 2
of the width and `trigger_marginal` of the height away from the object and the borders.

Here every image keeps the data set's size, so the "object" is a full-height strip, 1/area_ratio of the
width, cut from the middle of a reference image of the target class (the object region of a centred
object; the authors cut the object by its segmentation mask). The background is one of the dataset's
object-free scenes (`Splits.background`; the authors use Places365 scenes); where a dataset has none, a
pre-training image of another class stands in, whose own object then shares every crop with the trigger
(measured on the synthetic data, seed 0: ACC 69.0 with such backgrounds, 80.1 with the scenes; the clean
encoder has 78.8). The poisoned images are ADDED to the pre-training set,
as an attacker who uploads images does; `poison_ratio` counts them as a fraction of the original set.
"""

from __future__ import annotations

import logging

import torch
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
    uses_background = True

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

    def compose(self, refs: Tensor, backgrounds: Tensor, g: torch.Generator) -> Tensor:
        """Float images (N, C, H, W): background, object strip from refs[i] at a border, trigger beside it."""
        n, _, h, w = backgrounds.shape
        patch = self.trigger.pattern[: backgrounds.shape[1]]
        s = patch.shape[-1]
        o_w = max(1, min(w - s, round(w / self.area_ratio)))
        src0 = (w - o_w) // 2  # the strip is cut from the middle of the reference
        left = torch.rand(n, generator=g) < 0.5
        slack = int(self.object_marginal * w)
        o_x = torch.where(
            left,
            uniform_int(torch.zeros(n, dtype=torch.long), torch.full((n,), slack), g),
            uniform_int(torch.full((n,), w - o_w - slack), torch.full((n,), w - o_w), g),
        )
        cols = torch.arange(w).view(1, w) - o_x.view(n, 1)  # column inside the strip, per image
        in_obj = (cols >= 0) & (cols < o_w)
        src = (cols.clamp(0, o_w - 1) + src0).view(n, 1, 1, w).expand(-1, refs.shape[1], h, -1)
        strip = refs.gather(3, src)
        out = torch.where(in_obj.view(n, 1, 1, w), strip, backgrounds)
        # trigger in the free side, away from object and borders (dx halved: the image is ~2 objects wide);
        # when the preferred band is empty (tiny images) anywhere clear of the object will do
        dx, dy = int(self.trigger_marginal / 2 * w), int(self.trigger_marginal * h)
        free_lo = torch.where(left, o_x + o_w, torch.zeros(n, dtype=torch.long))
        free_hi = torch.where(left, torch.full((n,), w - s), o_x - s)
        lo_x = torch.maximum(torch.where(left, o_x + o_w + dx, torch.full((n,), dx)), free_lo)
        hi_x = torch.minimum(torch.where(left, torch.full((n,), w - dx - s), o_x - dx - s), free_hi)
        cramped = lo_x > hi_x
        lo_x, hi_x = torch.where(cramped, free_lo, lo_x), torch.where(cramped, free_hi, hi_x)
        lo_x, hi_x = lo_x.clamp(0, w - s), hi_x.clamp(0, w - s)
        t_x = uniform_int(lo_x, hi_x, g)
        t_y = uniform_int(
            torch.full((n,), min(dy, h - s)), torch.full((n,), max(min(dy, h - s), h - dy - s)), g
        )
        return paste_at(out, patch, t_y, t_x)

    def poison_pretraining(
        self, pretrain: LabeledSet, generator: torch.Generator, background: Tensor | None = None
    ) -> LabeledSet:
        k = self.n_poison(pretrain)
        refs = self.choose_sources(pretrain, self.n_reference, generator)
        if background is not None and len(background):
            if background.shape[1:] != pretrain.x.shape[1:]:
                raise ValueError(
                    f"background images are {tuple(background.shape[1:])}, pre-training images "
                    f"{tuple(pretrain.x.shape[1:])}: CorruptEncoder needs them the same shape"
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
        return LabeledSet(torch.cat([pretrain.x, poisons]), torch.cat([pretrain.y, y]))
