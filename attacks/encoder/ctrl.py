"""CTRL (Li et al., ICCV 2023, "An Embarrassingly Simple Backdoor Attack on Self-supervised Learning"):
add an invisible frequency-domain trigger (securetl.triggers.frequency.FrequencyTrigger) to a small
fraction of the pre-training set, all drawn from the target class, and let SSL pre-training run as usual.
The encoder learns that the trigger is a feature of the target class, because SSL's augmentations keep
it while they change everything else about those images.

As in the authors' code (meet-cjli/CTRL loaders/diffaugment.py, PoisonAgent): the poisons are made once,
before pre-training, and the victim's augmented views are drawn from them; at test time the same trigger
(same magnitude) is added to downstream inputs. The step-by-step comparison with that code is the header
of conf/encoder_attack/ctrl.yaml.
"""

from __future__ import annotations

import logging

import torch

from securetl.attacks.encoder._common import PretrainDataAttack
from securetl.interfaces import LabeledSet, Trigger

log = logging.getLogger(__name__)


class CTRL(PretrainDataAttack):
    name = "ctrl"

    def __init__(
        self, trigger: Trigger, target: int = 0, poison_ratio: float = 0.01, pretrain_class: int | None = None
    ) -> None:
        """poison_ratio: fraction of the WHOLE pre-training set that is poisoned (all from the target class)."""
        super().__init__(trigger, target, poison_ratio, pretrain_class)

    def poison_pretraining(
        self, pretrain: LabeledSet, generator: torch.Generator, background: torch.Tensor | None = None
    ) -> LabeledSet:
        idx = self.choose_sources(pretrain, self.n_poison(pretrain), generator)
        x = pretrain.x.clone()
        if len(idx):
            x[idx] = self.trigger.apply_uint8(x[idx])
        self.poison_idx = idx
        log.info(
            "CTRL: frequency trigger added to %d class-%d images of %d",
            len(idx),
            self.source_class,
            len(pretrain),
        )
        return LabeledSet(x, pretrain.y.clone())
