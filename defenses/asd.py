"""ASD: Adaptively Splitting poisoned Dataset -- Gao, Bai, Gu, Yang & Xia, "Backdoor Defense via Adaptively Splitting
Poisoned Dataset", CVPR 2023.

Reference code read: KuofengGao/ASD ASD.py, config/baseline_asd.yaml, utils/trainer/semi.py, data/dataset.py,
model/loss.py. Needs 10 clean labelled seeds per class. Every epoch splits D into a labelled pool D_C and an
unlabelled pool D_P by the per-sample symmetric-CE loss (alpha 0.1, beta 1) of the current model, then trains one
epoch of MixMatch on them (defenses/_mixmatch.py; Adam 0.002, batch 64, T 0.5, alpha 0.75, lambda_u 15 ramped):

  class-aware   epochs [0, epoch_first): the seeds plus the `choice_num` lowest-loss samples of every class;
                choice_num starts at 0 and grows by `n` every `t` epochs
  class-agnostic epochs [epoch_first, epoch_second): the lowest `epsilon` (50 %) of D
  meta split    epochs [epoch_second, epochs): a copy of the model (the "virtual model") trains `meta_epochs` on
                all of D with CE (Adam 0.015; layer3, layer4 and the linear layer); D_C = the `epsilon` of D
                whose loss fell least (loss before - loss after), defenses/_splits.meta_split

Clean seeds: the reference draws them out of D with each sample's poison flag -- an oracle. Here they are drawn
(at random, `seed_num` per class) from the clean reserve, which the pipeline hands over as ctx.clean; they stay in
the labelled pool in every phase (in the reference they are D's samples, trusted by loss like the rest after the
class-aware phase). The reference keeps the epoch of best TEST accuracy; here (`select: holdout`) the epoch of best
accuracy on a class-balanced 20 % of the clean share held out from the seeds (defenses/_features.clean_split),
or the last epoch (`select: last`).

Transfer learning (BASELINES.md 2.9): the model is the probe's trainable scope (the received encoder's top stages
and a fresh head, or a fresh head on the frozen encoder); the virtual model trains the same scope ("layer3 +
layer4 + linear" is probe=finetune's last2 + head; the head alone under a frozen encoder). T-Core's phase-4 meta
guidance uses the same split helper. Deviations: the split losses read memoised un-augmented inputs, and the
virtual model trains on them (the reference reads both through its training augmentation).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from securetl.interfaces import Defense, Knowledge, LabeledSet, Model, RunContext
from securetl.probe import per_sample_loss, train_loop

from ._features import Scope, accuracy, clean_split, require_clean
from ._mixmatch import Views, mixmatch_epoch, semi_pools
from ._splits import class_aware_split, global_split, meta_split

log = logging.getLogger(__name__)

PHASES = ("aware", "agnostic", "meta")


class ASD(Defense):
    name = "asd"
    knowledge = Knowledge(clean_fraction=0.05, needs_clean=True)

    def __init__(
        self,
        seed_num: int = 10,
        epochs: int = 30,
        epoch_first: int = 15,
        epoch_second: int = 22,
        t: int = 2,
        n: int = 1,
        epsilon: float = 0.5,
        sce_alpha: float = 0.1,
        sce_beta: float = 1.0,
        iterations: int = 64,
        batch_size: int = 64,
        lr: float = 0.002,
        temperature: float = 0.5,
        mix_alpha: float = 0.75,
        lambda_u: float = 15.0,
        rampup_epochs: int | None = None,
        meta_epochs: int = 1,
        meta_lr: float = 0.015,
        meta_batch_size: int = 128,
        augment: bool = True,
        select: str = "holdout",
        holdout: float = 0.2,
        clean_fraction: float | None = None,
    ) -> None:
        super().__init__(clean_fraction)
        if not 0 <= epoch_first <= epoch_second <= epochs:
            raise ValueError(
                f"defense: need 0 <= epoch_first ({epoch_first}) <= epoch_second ({epoch_second}) <= epochs ({epochs})"
            )
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"defense.epsilon={epsilon} must lie in (0, 1)")
        if int(t) < 1 or int(seed_num) < 1:
            raise ValueError(f"defense.t={t} and defense.seed_num={seed_num} must be >= 1")
        if select not in ("holdout", "last"):
            raise ValueError(f"defense.select={select!r}; choose holdout or last")
        self.seed_num, self.epochs = int(seed_num), int(epochs)
        self.epoch_first, self.epoch_second = int(epoch_first), int(epoch_second)
        self.t, self.n, self.epsilon = int(t), int(n), epsilon
        self.sce_alpha, self.sce_beta = sce_alpha, sce_beta
        self.iterations, self.batch_size, self.lr = int(iterations), int(batch_size), lr
        self.temperature, self.mix_alpha, self.lambda_u = temperature, mix_alpha, lambda_u
        self.rampup_epochs = self.epochs if rampup_epochs is None else int(rampup_epochs)
        self.meta_epochs, self.meta_lr, self.meta_batch_size = int(meta_epochs), meta_lr, int(meta_batch_size)
        self.augment, self.select, self.holdout = augment, select, holdout

    def train(self, encoder, train: LabeledSet, probe, ctx: RunContext) -> Model:
        require_clean(ctx, "ASD", ": its clean labelled seeds (10 per class in the paper) come from it")
        g = ctx.generator(salt=20901)
        torch.manual_seed(ctx.seed * 1000 + 209)  # the fresh head's initialisation
        rng = np.random.default_rng(ctx.seed * 1000 + 209)  # MixMatch's Beta draws (host side)
        y, n, k = train.y, len(train), ctx.num_classes
        seeds, held = self.seeds(ctx, k, g)
        scope = Scope.of(encoder, probe, train.x, ctx)
        # D and the seeds side by side: positions >= n are the seeds
        y_all = torch.cat([y, seeds.y])
        seed_pos = n + torch.arange(len(seeds))
        views = Views(encoder, scope.start, torch.cat([train.x, seeds.x]), ctx, self.augment)
        held_inputs = scope.inputs_for(held.x, ctx) if held is not None else None
        module = scope.module(k, ctx)
        opt = torch.optim.Adam(module.parameters(), lr=self.lr)
        best, best_state, best_epoch = -1.0, None, self.epochs - 1
        chosen = None  # (labelled, unlabelled, MixMatch statistics) of the epoch whose model is returned
        bar = tqdm(range(self.epochs), desc="asd[mixmatch]", disable=not ctx.progress, leave=False)
        for epoch in bar:
            losses = self.split_losses(module, scope.inputs, y, ctx)
            phase = self.phase(epoch)
            if phase == "aware":
                picked = class_aware_split(
                    losses, y, torch.full((k,), self.choice_num(epoch), dtype=torch.long)
                )
            elif phase == "agnostic":
                picked = global_split(losses, self.epsilon)
            else:
                after = self.split_losses(
                    self.virtual_model(module, scope.inputs, y, ctx, g), scope.inputs, y, ctx
                )
                picked = meta_split(losses, after, self.epsilon)
            labelled, unlabelled = semi_pools(picked, n)
            # every epoch's D_C (BASELINES.md 2.9: its size and purity per epoch); the pipeline turns `_idx` sets into
            # size and purity afterwards (results.decision_diagnostics), so the defense never sees a poison flag
            self.decisions[f"asd_epoch{epoch}_{phase}_labelled_idx"] = labelled
            stats = mixmatch_epoch(
                module,
                opt,
                views,
                y_all,
                torch.cat([labelled, seed_pos]),
                unlabelled,
                epoch=epoch,
                iterations=self.iterations,
                batch_size=self.batch_size,
                num_classes=k,
                temperature=self.temperature,
                alpha=self.mix_alpha,
                lambda_u=self.lambda_u,
                rampup_epochs=self.rampup_epochs,
                g=g,
                rng=rng,
            )
            bar.set_postfix(phase=phase, loss=f"{stats['loss']:.3f}")
            if held_inputs is None:
                chosen = (labelled, unlabelled, stats)  # select: last
            else:
                acc = accuracy(module, held_inputs, held.y, ctx)
                if acc >= best:  # ties go to the later epoch: it has trained on more of the schedule
                    best, best_epoch = acc, epoch
                    best_state = copy.deepcopy(module.state_dict())
                    chosen = (labelled, unlabelled, stats)
        if best_state is not None:
            module.load_state_dict(best_state)
            self.diagnostics["asd/holdout_acc"] = best
        self.diagnostics["asd/best_epoch"] = best_epoch
        if chosen is not None:
            # the split the returned model trained on, not the last epoch's: `select: holdout` may return an earlier one
            labelled, unlabelled, stats = chosen
            self.decisions["labelled_idx"], self.decisions["unlabelled_idx"] = labelled, unlabelled
            self.diagnostics.update(
                {f"asd/mixmatch_{key}": round(stats[key], 5) for key in ("loss", "lx", "lu")}
            )
        return scope.model(module)

    # ------------------------------------------------------------------ pieces
    def phase(self, epoch: int) -> str:
        if epoch < self.epoch_first:
            return "aware"
        return "agnostic" if epoch < self.epoch_second else "meta"

    def choice_num(self, epoch: int) -> int:
        """Per class, the lowest-loss samples of D the class-aware split adds to the seeds at `epoch`. ASD.py adds
        n at every class-aware epoch with epoch % t == 0 and epoch != 0: n x (the multiples of t in 1..epoch)."""
        return self.n * (epoch // self.t)

    def seeds(self, ctx: RunContext, k: int, g: torch.Generator) -> tuple[LabeledSet, LabeledSet | None]:
        """`seed_num` random clean images per class (fewer if the share has fewer), and the held-out part (None:
        `select: last`, or one image per class, nothing to hold out)."""
        if self.select == "holdout":
            fit, held = clean_split(ctx, "ASD", self.holdout, g, strict=False)
        else:
            fit, held = require_clean(ctx, "ASD"), None
        if held is not None and len(held) == 0:
            held = None
        picks = []
        for c in range(k):
            idx = torch.nonzero(fit.y == c).squeeze(1)
            picks.append(idx[torch.randperm(len(idx), generator=g)[: self.seed_num]])
        picks = torch.cat(picks).sort().values
        per_class = torch.bincount(fit.y[picks], minlength=k)
        if int(per_class.min()) < self.seed_num:
            log.warning(
                "ASD: the clean share gives %s seeds per class, fewer than seed_num=%d (raise defense.clean_fraction)",
                per_class.tolist(),
                self.seed_num,
            )
        self.diagnostics["asd/seeds_per_class"] = per_class.tolist()
        self.diagnostics["asd/n_holdout"] = 0 if held is None else len(held)
        return fit.subset(picks), held

    def split_losses(self, module, inputs, y, ctx: RunContext) -> torch.Tensor:
        return per_sample_loss(module, (inputs, y), ctx, loss="sce", alpha=self.sce_alpha, beta=self.sce_beta)

    def virtual_model(self, module, inputs, y, ctx: RunContext, g: torch.Generator):
        """A copy of the model trained `meta_epochs` on all of D with CE (Adam `meta_lr`)."""
        virtual = copy.deepcopy(module)
        train_loop(
            virtual,
            inputs,
            y,
            ctx,
            [{"params": list(virtual.parameters()), "lr": self.meta_lr}],
            epochs=self.meta_epochs,
            batch_size=self.meta_batch_size,
            g=g,
            optimizer="adam",
            desc="asd[virtual]",
        )
        return virtual
