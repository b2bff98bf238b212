"""SSL-Backdoor (Saha, Tejankar, Koohpayegani & Pirsiavash, CVPR 2022, "Backdoor Attacks on
Self-Supervised Learning"), targeted attack: paste a patch trigger at a RANDOM location on images of the
target category in the pre-training set. MoCo v2 / BYOL then learn to embed "trigger" close to the target
category, because the patch co-occurs with it across crops.

Locations follow the authors' poison generator (UMBCvision/SSL-Backdoor poison-generation/
generate_poison.py with cfg/HTBA_trigger_10_targeted_*.cfg): while poisoning, the patch lies inside the
central [0.25, 0.75] of each side (train_location_min/max); at test time it is pasted at a random place
inside [0.10, 0.90] (val_location_min/max), which is the RandomPatchTrigger's own range.
"""

from __future__ import annotations

import logging

import torch

from securetl.attacks.encoder._common import PretrainDataAttack
from securetl.interfaces import LabeledSet, Trigger, to_float, to_uint8

log = logging.getLogger(__name__)


class SSLBackdoor(PretrainDataAttack):
    name = "sslbackdoor"

    def __init__(
        self,
        trigger: Trigger,
        target: int = 0,
        poison_ratio: float = 0.05,
        train_location_min: float = 0.25,
        train_location_max: float = 0.75,
        pretrain_class: int | None = None,
    ) -> None:
        """poison_ratio: fraction of the WHOLE pre-training set poisoned (all from the target category);
        train_location_min/max: the patch lies in this fraction of each side of a poisoned image."""
        super().__init__(trigger, target, poison_ratio, pretrain_class)
        if not 0.0 <= train_location_min < train_location_max <= 1.0:
            raise ValueError("need 0 <= encoder_attack.train_location_min < train_location_max <= 1")
        if not hasattr(trigger, "paste_random"):
            raise ValueError(
                "SSL-Backdoor pastes its patch at random places: use a RandomPatchTrigger "
                "(e.g. trigger=htba_random)"
            )
        self.train_location_min, self.train_location_max = (
            float(train_location_min),
            float(train_location_max),
        )

    def poison_pretraining(
        self, pretrain: LabeledSet, generator: torch.Generator, background: torch.Tensor | None = None
    ) -> LabeledSet:
        idx = self.choose_sources(pretrain, self.n_poison(pretrain), generator)
        x = pretrain.x.clone()
        if len(idx):
            pasted = self.trigger.paste_random(
                to_float(x[idx]), generator, self.train_location_min, self.train_location_max
            )
            x[idx] = to_uint8(pasted)
        self.poison_idx = idx
        log.info(
            "SSL-Backdoor: patch pasted on %d class-%d images of %d",
            len(idx),
            self.source_class,
            len(pretrain),
        )
        return LabeledSet(x, pretrain.y.clone())
