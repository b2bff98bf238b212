"""RNP: Reconstructive Neuron Pruning -- Li, Lyu, Ma, Koren, Lyu, Li & Jiang, "Reconstructive Neuron Pruning for
Backdoor Defense", ICML 2023.

Reference code read: bboylyg/RNP main.py, README.md (its log: BadNets on ResNet-18, ASR collapses at threshold 0.20
with 24 neurons pruned); SCLBD/BackdoorBench defense/rnp.py, utils/defense_utils/rnp/rnp_model/mask_batchnorm.py,
config/defense/rnp/config.yaml (ratio 0.01). Needs clean labelled data (1 %, "500 defense data").

  unlearn  gradient ascent on the clean CE over every parameter of a copy of M0's stages + head: SGD lr 0.01,
           momentum 0.9, weight decay 5e-4, lr x 0.1 after epochs 10 and 20, batch 128; stop after the first epoch
           whose running training accuracy is <= 0.2, or after 20 epochs
  recover  a mask per BN channel (on its weight, init 1) of the unlearned copy, trained alone on the clean data with
           loss 0.2 CE: SGD lr 0.2, momentum 0.9, 20 epochs, clipped to [0, 1]
  prune    zero the BN weight (gamma) of every channel of the ORIGINAL M0 whose mask is <= the threshold

The threshold (or number) is chosen on the held-out part of the clean share (defenses/_pruning.MaskPruning); the codes
print test ASR for every threshold. Unlearning and recovery run in train mode (BN on batch statistics), as both codes.
Deviations: no gradient clipping (both codes call clip_grad_norm_ before backward, on the previous step's zeroed
gradients: a no-op); 20 unlearning epochs at most (BackdoorBench; bboylyg/RNP's loop runs 21); the clean samples are
memoised activations (no crop/flip augmentation). The masks cover every BN of the encoder, as both codes
(`stages: null`); `stages: k` (ours) restricts unlearning, recovery and pruning to M0's top k stages. Unlearning is
securetl.probe.train_loop with the step schedule and an end-of-epoch stopping check (defenses/_pruning.unlearn, ABL's
unlearning too); mask recovery is the loop T-Core's channel filter uses (defenses/_pruning.recover_masks).
"""

from __future__ import annotations

from torch import Tensor

from securetl.interfaces import RunContext

from ._pruning import MaskPruning, recover_masks, unlearn


class RNP(MaskPruning):
    name = "rnp"
    salt = 21201

    def __init__(
        self,
        unlearning_lr: float = 0.01,
        unlearning_epochs: int = 20,
        clean_threshold: float = 0.2,
        schedule: tuple[int, ...] = (10, 20),
        weight_decay: float = 5e-4,
        recovering_lr: float = 0.2,
        recovering_epochs: int = 20,
        alpha: float = 0.2,
        batch_size: int = 128,
        stages: int | None = None,
        pruning_by: str = "threshold",
        pruning_max: float = 0.9,
        pruning_step: float = 0.05,
        pruning_number: float | None = None,
        acc_ratio: float = 0.1,
        holdout: float = 0.2,
        clean_fraction: float | None = None,
    ) -> None:
        super().__init__(
            stages, pruning_by, pruning_max, pruning_step, pruning_number, acc_ratio, holdout, clean_fraction
        )
        if not 0.0 <= clean_threshold <= 1.0:
            raise ValueError(f"defense.clean_threshold={clean_threshold} must lie in [0, 1]")
        self.unlearning_lr, self.unlearning_epochs = unlearning_lr, int(unlearning_epochs)
        self.clean_threshold, self.schedule = clean_threshold, tuple(int(e) for e in schedule)
        self.weight_decay, self.recovering_lr = weight_decay, recovering_lr
        self.recovering_epochs, self.alpha, self.batch_size = int(recovering_epochs), alpha, int(batch_size)

    def learn_masks(self, work, inputs, y, g, ctx: RunContext) -> dict[str, Tensor]:
        weights = [p for name, p in work.named_parameters() if not name.endswith(".mask")]
        info = unlearn(
            work,
            inputs,
            y,
            ctx,
            g,
            weights,
            epochs=self.unlearning_epochs,
            threshold=self.clean_threshold,
            lr=self.unlearning_lr,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            milestones=self.schedule,
            desc="rnp[unlearn]",
        )
        self.diagnostics["rnp/unlearn_epochs"] = info["epochs"]
        self.diagnostics["rnp/unlearn_acc"] = info["acc"]
        return recover_masks(
            work,
            inputs,
            y,
            g,
            epochs=self.recovering_epochs,
            lr=self.recovering_lr,
            alpha=self.alpha,
            batch_size=self.batch_size,
            train_mode=True,
            num=ctx.num,
        )
