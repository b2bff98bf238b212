"""ABL: Anti-Backdoor Learning -- Li, Lyu, Koren, Lyu, Li & Ma, "Anti-Backdoor Learning: Training Clean Models on
Poisoned Data", NeurIPS 2021.

Reference code read: bboylyg/ABL backdoor_isolation.py, backdoor_unlearning.py, config.py; SCLBD/BackdoorBench
defense/abl.py, config/defense/abl/cifar10.yaml. No clean data. The premise: a backdoor is learned faster than
the clean task, so early in training the poisons have the lowest loss. One model through three phases:

  isolate    train on all of D for `tuning_epochs` with the local gradient ascent loss sign(CE - gamma) CE
             (the paper's LGA; `loss: flooding` = |CE - b| + b, both codes' default), which holds the loss near
             gamma so that only what is learned fastest falls below it; then the per-sample CE, and the lowest
             `isolation_ratio` of D is the isolated set
  fine-tune  (optional, on in both codes) train on the other samples with CE; the learning rate drops tenfold
             after two thirds of the epochs, within one run of the optimiser (both codes' learning_rate_finetuning:
             the original's 40 of 60)
  unlearn    gradient ascent (-CE) on the isolated set: SGD, momentum 0.9, weight decay 1e-4, lr 5e-4 (the shared
             ascent loop, defenses/_pruning.unlearn, which RNP stops on an accuracy threshold and ABL does not)

Transfer learning (BASELINES.md 2.7): the model is the probe's trainable scope, initialised as the probe
initialises it (the received encoder's top stages and a fresh head, or a fresh head on the frozen encoder), not a
network from scratch. The isolation and fine-tuning phases use the probe's optimiser, learning rates and batch
size (the recipe this model trains with; the codes' SGD lr 0.1, batch 64 train a ResNet from scratch).
Unlearning keeps the codes' optimiser and lr; its length is a number of steps (see conf/defense/abl.yaml).
Deviations from bboylyg/ABL: the isolated set is the LOWEST-loss share (the paper's rule and BackdoorBench's;
the original sorts descending and also saves the isolated examples as the "other" set); SGD without Nesterov
(securetl.probe.train_loop); no augmentation (the scope trains on memoised inputs, as the probe does).
The codes log test ACC/ASR after every epoch; nothing here reads test data.
"""

from __future__ import annotations

import logging

import torch

from securetl.interfaces import Defense, Knowledge, LabeledSet, Model, RunContext
from securetl.numerics import take
from securetl.probe import per_sample_loss, train_loop

from ._features import Scope, epochs_for
from ._pruning import unlearn
from ._splits import lowest
from ._suppression import flooding_loss, lga_loss

log = logging.getLogger(__name__)


class ABL(Defense):
    name = "abl"
    knowledge = Knowledge()  # no clean data

    def __init__(
        self,
        isolation_ratio: float = 0.01,
        loss: str = "lga",
        gamma: float = 0.5,
        flooding: float = 0.5,
        tuning_epochs: int = 10,
        finetuning: bool = True,
        finetuning_epochs: int = 20,
        unlearning_steps: int = 32,
        unlearning_lr: float = 5e-4,
        unlearning_batch_size: int = 64,
        weight_decay: float = 1e-4,
        clean_fraction: float | None = None,
    ) -> None:
        super().__init__(clean_fraction)
        if not 0.0 < isolation_ratio < 1.0:
            raise ValueError(f"defense.isolation_ratio={isolation_ratio} must lie in (0, 1)")
        if loss not in ("lga", "flooding"):
            raise ValueError(f"defense.loss={loss!r}; choose lga or flooding")
        self.isolation_ratio, self.loss, self.gamma, self.flooding = isolation_ratio, loss, gamma, flooding
        self.tuning_epochs, self.finetuning = int(tuning_epochs), finetuning
        self.finetuning_epochs = int(finetuning_epochs)
        self.unlearning_steps, self.unlearning_lr = int(unlearning_steps), unlearning_lr
        self.unlearning_batch_size, self.weight_decay = int(unlearning_batch_size), weight_decay

    def train(self, encoder, train: LabeledSet, probe, ctx: RunContext) -> Model:
        g = ctx.generator(salt=20701)
        torch.manual_seed(ctx.seed * 1000 + 207)  # the fresh head's initialisation
        scope = Scope.of(encoder, probe, train.x, ctx)
        module = scope.module(ctx.num_classes, ctx)
        x, y = scope.inputs, train.y

        isolated = self.isolate(module, x, y, probe, ctx, g)
        self.decisions["isolated_idx"] = isolated
        other = torch.ones(len(y), dtype=torch.bool)
        other[isolated] = False
        other = torch.nonzero(other).squeeze(1)
        if self.finetuning:
            self.finetune(module, take(x, other), y[other], probe, ctx, g)
        self.unlearn(module, take(x, isolated), y[isolated], ctx, g)
        return scope.model(module)

    # ------------------------------------------------------------------ the three phases
    def isolate(self, module, x, y, probe, ctx: RunContext, g: torch.Generator) -> torch.Tensor:
        """Train with LGA (or flooding) for `tuning_epochs`; the lowest-CE `isolation_ratio` of the samples."""
        loss_fn = lga_loss(self.gamma) if self.loss == "lga" else flooding_loss(self.flooding)
        train_loop(
            module,
            x,
            y,
            ctx,
            Scope.groups(module, probe),
            epochs=self.tuning_epochs,
            batch_size=probe.batch_size,
            g=g,
            optimizer=probe.optimizer,
            weight_decay=self.weight_decay,
            loss_fn=loss_fn,
            desc="abl[isolate]",
        )
        losses = per_sample_loss(module, (x, y), ctx)
        isolated = lowest(losses, int(len(y) * self.isolation_ratio)).sort().values
        if len(isolated) == 0:
            raise ValueError(
                f"ABL: isolation_ratio={self.isolation_ratio} of {len(y)} samples isolates none; raise it"
            )
        self.diagnostics["abl/isolation_loss_max"] = float(losses[isolated].max())
        self.diagnostics["abl/train_loss_median"] = float(losses.median())
        self.diagnostics["abl/isolated_per_class"] = torch.bincount(
            y[isolated], minlength=ctx.num_classes
        ).tolist()
        log.info(
            "ABL: isolated %d of %d samples (loss <= %.4f)", len(isolated), len(y), losses[isolated].max()
        )
        return isolated

    def finetune(self, module, x, y, probe, ctx: RunContext, g: torch.Generator) -> None:
        """CE on the samples not isolated; the learning rate drops tenfold after two thirds of the epochs."""
        train_loop(
            module,
            x,
            y,
            ctx,
            Scope.groups(module, probe),
            epochs=self.finetuning_epochs,
            batch_size=probe.batch_size,
            g=g,
            optimizer=probe.optimizer,
            weight_decay=self.weight_decay,
            schedule=[round(2 * self.finetuning_epochs / 3)],
            desc="abl[finetune]",
        )

    def unlearn(self, module, x, y, ctx: RunContext, g: torch.Generator) -> None:
        """Gradient ascent on the isolated samples: whole epochs over them, at least `unlearning_steps` steps."""
        steps = self.unlearning_steps
        info = unlearn(
            module,
            x,
            y,
            ctx,
            g,
            list(module.parameters()),
            epochs=epochs_for(steps, len(y), self.unlearning_batch_size) if steps > 0 else 0,
            threshold=None,
            lr=self.unlearning_lr,
            weight_decay=self.weight_decay,
            batch_size=self.unlearning_batch_size,
            desc="abl[unlearn]",
        )
        self.diagnostics["abl/unlearning_steps"] = info["steps"]
