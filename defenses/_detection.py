"""The shape every poison detector shares (BASELINES.md section 0): train the probe on D (M0), flag suspects,
drop them, and let `Defense.train` retrain the same probe, from the same initialisation, on what is left.

A detector implements `detect(model, train, probe, ctx) -> (N,) bool` (True = suspected poison) and records its
own statistics in `self.diagnostics`. TPR/FPR of the removal come from the pipeline (`results.decision_diagnostics`
on `kept_idx`), after the defense has decided; the detector never sees `poison_idx`.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from securetl.interfaces import Defense, LabeledSet, Model, RunContext

from ._features import features, reference_model

log = logging.getLogger(__name__)


class DetectionDefense(Defense):
    """Detection defenses override `detect`; `filter` turns its flags into kept indices."""

    # False for detectors that train their own models from the received encoder (CT): no M0 is trained
    uses_reference_model: ClassVar[bool] = True

    def detect(
        self, encoder: nn.Module, model: Model | None, train: LabeledSet, probe: Any, ctx: RunContext
    ) -> Tensor:
        """(N,) bool, True = suspected poison. `model` is M0 (None when `uses_reference_model` is False)."""
        raise NotImplementedError

    def features(self, model: Model, train: LabeledSet, ctx: RunContext) -> Tensor:
        """M0's penultimate representation of `train` (the encoder's output): what latent-separation detectors read."""
        f = features(model, train.x, ctx, "encoder")
        if not torch.isfinite(f).all():
            raise ValueError(
                f"{self.name}: the features of the model trained on D are not finite (the probe diverged); "
                "lower probe.lr / probe.encoder_lr"
            )
        return f

    def filter(self, encoder: nn.Module, train: LabeledSet, probe: Any, ctx: RunContext) -> Tensor:
        model = reference_model(encoder, train, probe, ctx) if self.uses_reference_model else None
        suspects = torch.as_tensor(self.detect(encoder, model, train, probe, ctx), dtype=torch.bool).cpu()
        if suspects.shape != (len(train),):
            raise ValueError(
                f"{self.name}: detect returned {tuple(suspects.shape)} flags for {len(train)} samples"
            )
        removed = torch.nonzero(suspects).squeeze(1)
        self.decisions["removed_idx"] = removed
        counts = torch.bincount(train.y[removed], minlength=ctx.num_classes)
        self.diagnostics[f"{self.name}/n_removed"] = len(removed)
        self.diagnostics[f"{self.name}/removed_per_class"] = counts.tolist()
        if len(removed) == len(train):
            log.warning("%s flagged every training sample; keeping all of them instead", self.name)
            return torch.arange(len(train))
        log.info(
            "%s: %d of %d samples removed (per class %s)",
            self.name,
            len(removed),
            len(train),
            counts.tolist(),
        )
        return torch.nonzero(~suspects).squeeze(1)
