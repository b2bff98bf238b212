"""DBD: Decoupling the training process -- Huang, Li, Wu, Qin & Ren, "Backdoor Defense via Decoupling the Training
Process", ICLR 2022.

Reference code read: SCLBD/DBD simclr.py, mixmatch_finetune.py, data/utils.py (get_semi_idx), data/dataset.py,
model/loss.py, config/defense/{simclr,mixmatch_finetune}/badnets/cifar10_resnet18/example.yaml; the trainers as
copied into SCLBD/BackdoorBench defense/DBD/utils_db/trainer/{simclr,semi}.py. No clean data. Three stages:

  1 self-supervised  SimCLR on the images of D without labels: the backbone cannot learn the trigger-label link
  2 warm-up          freeze the backbone; train a linear head with symmetric CE (0.1 CE + 1 RCE; Adam 0.002,
                     batch 128) for `warmup_epochs`
  3 semi-supervised  every epoch: the per-sample SCE loss of the current model on D; the globally lowest
                     `epsilon` (50 %) is labelled, the rest is used without labels; one epoch of MixMatch
                     (defenses/_mixmatch.py; Adam 0.002, batch 64, T 0.5, alpha 0.75, lambda_u 15 ramped) over
                     the whole model

Transfer learning (BASELINES.md 2.8): stage 1 IS the given encoder -- DBD's premise is a backbone trained without
the poisoned labels, which a clean pre-trained encoder is, and which a backdoored encoder (Threat-1) breaks; no
SimCLR is run here. Stage 2 trains the probe's head on the frozen encoder's features; stage 3 trains the probe's
trainable scope (the head, or the top stages and the head) with MixMatch on augmented images passed through the
frozen rest of the encoder. The model returned is the last epoch's: the reference keeps the epoch of best TEST
accuracy, and with no clean data there is nothing to choose by that does not reward fitting D's poison.
Deviations: the warm-up and the split losses read memoised un-augmented inputs (the reference augments both);
the lambda_u ramp counts from the first MixMatch epoch over `rampup_epochs` (mixmatch_finetune.py passes its global
epoch, the 10 warm-up epochs included, to a ramp of rampup_length 190 = the MixMatch epochs: its lambda_u starts at
10/190 of full and is full for the last 10 epochs).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from securetl.interfaces import Defense, Knowledge, LabeledSet, Model, RunContext
from securetl.probe import per_sample_loss, train_loop

from ._features import Scope
from ._mixmatch import Views, mixmatch_epoch, semi_pools
from ._splits import global_split
from ._suppression import sce_loss

log = logging.getLogger(__name__)


class DBD(Defense):
    name = "dbd"
    knowledge = Knowledge()  # no clean data

    def __init__(
        self,
        warmup_epochs: int = 10,
        warmup_lr: float = 0.002,
        warmup_batch_size: int = 128,
        sce_alpha: float = 0.1,
        sce_beta: float = 1.0,
        epsilon: float = 0.5,
        epochs: int = 20,
        iterations: int = 64,
        batch_size: int = 64,
        lr: float = 0.002,
        temperature: float = 0.5,
        mix_alpha: float = 0.75,
        lambda_u: float = 15.0,
        rampup_epochs: int | None = None,
        augment: bool = True,
        clean_fraction: float | None = None,
    ) -> None:
        super().__init__(clean_fraction)
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"defense.epsilon={epsilon} must lie in (0, 1)")
        if temperature <= 0:
            raise ValueError(f"defense.temperature={temperature} must be > 0")
        self.warmup_epochs, self.warmup_batch_size = int(warmup_epochs), int(warmup_batch_size)
        self.warmup_lr = warmup_lr
        self.sce_alpha, self.sce_beta, self.epsilon = sce_alpha, sce_beta, epsilon
        self.epochs, self.iterations, self.batch_size = int(epochs), int(iterations), int(batch_size)
        self.lr = lr
        self.temperature, self.mix_alpha, self.lambda_u = temperature, mix_alpha, lambda_u
        self.rampup_epochs = self.epochs if rampup_epochs is None else int(rampup_epochs)
        self.augment = augment

    def train(self, encoder, train: LabeledSet, probe, ctx: RunContext) -> Model:
        g = ctx.generator(salt=20801)
        torch.manual_seed(ctx.seed * 1000 + 208)  # the fresh head's initialisation
        rng = np.random.default_rng(ctx.seed * 1000 + 208)  # MixMatch's Beta draws (host side)
        y, n = train.y, len(train)
        # stage 1: the received encoder is DBD's self-supervised backbone
        scope = Scope.of(encoder, probe, train.x, ctx)
        module = scope.module(ctx.num_classes, ctx)
        self.warm_up(module, scope, y, ctx, g)
        views = Views(encoder, scope.start, train.x, ctx, self.augment)
        opt = torch.optim.Adam(module.parameters(), lr=self.lr)
        bar = tqdm(range(self.epochs), desc="dbd[mixmatch]", disable=not ctx.progress, leave=False)
        for epoch in bar:
            losses = per_sample_loss(
                module, (scope.inputs, y), ctx, loss="sce", alpha=self.sce_alpha, beta=self.sce_beta
            )
            labelled, unlabelled = semi_pools(global_split(losses, self.epsilon), n)
            # every epoch's labelled pool (BASELINES.md 2.8: its size and purity per epoch); the pipeline turns
            # `_idx` sets into size and purity afterwards (results.decision_diagnostics): no poison flag seen here
            self.decisions[f"dbd_epoch{epoch}_labelled_idx"] = labelled
            if epoch == 0:
                self.decisions["warmup_unlabelled_idx"] = unlabelled  # the split the warmed-up head makes
            stats = mixmatch_epoch(
                module,
                opt,
                views,
                y,
                labelled,
                unlabelled,
                epoch=epoch,
                iterations=self.iterations,
                batch_size=self.batch_size,
                num_classes=ctx.num_classes,
                temperature=self.temperature,
                alpha=self.mix_alpha,
                lambda_u=self.lambda_u,
                rampup_epochs=self.rampup_epochs,
                g=g,
                rng=rng,
            )
            bar.set_postfix(loss=f"{stats['loss']:.3f}")
        if self.epochs:
            # the last epoch's split: the one the returned (last-epoch) model trained on
            self.decisions["labelled_idx"], self.decisions["unlabelled_idx"] = labelled, unlabelled
            self.diagnostics["dbd/labelled_per_class"] = torch.bincount(
                y[labelled], minlength=ctx.num_classes
            ).tolist()
            self.diagnostics.update({f"dbd/mixmatch_{k}": round(stats[k], 5) for k in ("loss", "lx", "lu")})
        return scope.model(module)

    def warm_up(self, module, scope: Scope, y, ctx: RunContext, g: torch.Generator) -> None:
        """Stage 2: the head alone, with SCE, on the frozen features (the received encoder's output)."""
        head = Scope.head_of(module)
        feats = Scope.penultimate(module, scope.inputs, ctx.device)
        train_loop(
            head,
            feats,
            y,
            ctx,
            [{"params": list(head.parameters()), "lr": self.warmup_lr}],
            epochs=self.warmup_epochs,
            batch_size=self.warmup_batch_size,
            g=g,
            optimizer="adam",
            loss_fn=sce_loss(self.sce_alpha, self.sce_beta),
            desc="dbd[warmup]",
        )
