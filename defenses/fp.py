"""Fine-Pruning -- Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
Networks", RAID 2018; and FT (fine-tuning on clean data), its zero-prune setting.

Reference code read: SCLBD/BackdoorBench defense/fp.py, config/defense/fp/cifar10.yaml, defense/ft.py,
config/defense/ft/cifar10.yaml; vtu81/backdoor-toolbox other_defenses_tool_box/fine_pruning.py (prunes up to 95 %,
an absolute 0.2 drop, 10 fine-tuning epochs). Needs clean labelled data (BackdoorBench: ratio 0.05).

  activations  the mean, over clean data, of every channel entering the final linear layer (M0's penultimate
               layer: the pooled output of its last stage)
  prune        in ascending order of activation (dormant channels first), `prune_step` of the channels at a time
               (once_prune_ratio 0.01), by zeroing the head's weight columns; stop at the last step whose clean
               accuracy is within `acc_ratio` (0.1, relative) of the unpruned accuracy
  fine-tune    the model on the clean data, the pruned columns held at zero (torch prune's mask, as BackdoorBench):
               SGD, momentum 0.9, weight decay 5e-4, batch 256, lr 0.01 annealed to 0 by a cosine (BackdoorBench:
               lr_scheduler CosineAnnealingLR, T_max 100 = its epochs, stepped once an epoch), 100 epochs

FT is the same fine-tuning with nothing pruned (`prune_step: 0`; BackdoorBench ft.py: 100 epochs on 5 %).

Schedule (ours, as NAD and NC's unlearning here: defenses/_features.train_steps): the reference's epochs become
optimiser steps. BackdoorBench fine-tunes on its 5 % of CIFAR-10, 2 500 images at batch 256 (no drop_last): 10 steps
an epoch, 1 000 steps in 100 epochs. On the clean share an epoch has ceil(n / batch) steps and the epochs are
ceil(steps / that): the same number of updates on fewer images (200 images at batch 256: one step an epoch, 1 000
epochs; 100 "epochs" there were 100 updates, a tenth of the reference's). The cosine is stepped once an epoch over
those epochs, i.e. over the steps. Learning rates are the probe's own (its encoder_lr for the stages, lr for the
head) x `lr_scale`: BackdoorBench's 0.01 is its models' own training lr, and NAD here fine-tunes its teacher the
same way, so FT (NAD's teacher, NAD without its distillation term) stays comparable with NAD.

The stopping rule is measured on the held-out part of the clean share (BASELINES.md 2.10: both suites measure it on
the clean test set); the channels are ranked on the rest; the fine-tuning then uses the whole clean share (no
selection follows it). What is fine-tuned is the probe's trainable part of M0: its head and top stages under
probe=finetune, its head alone under a frozen encoder (probe=linear/mlp: pruning and fine-tuning act on the head's
input columns only -- a legitimate but weak baseline). The probe's head standardises its input first, so a zeroed
column holds that channel at its training mean rather than at 0 (alike for a dormant channel). Deviations: no
crop/flip augmentation (the clean data are memoised activations, as in the probe's own loop); the number pruned is
exactly the step's count (BackdoorBench prunes one fewer); the model kept is the last passing step's
(BackdoorBench's net is the same object as the failing step's, so it keeps the over-pruned mask).
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from securetl.interfaces import Defense, Knowledge, LabeledSet, Model, RunContext
from securetl.probe import Probe, Schedule

from ._features import Scope, accuracy, clean_split, reference_model, require_clean, train_steps
from ._pruning import prune, sweep

log = logging.getLogger(__name__)


def first_linear(head: nn.Module) -> nn.Linear:
    """The head's first linear layer: the one the penultimate channels enter (after its standardisation)."""
    for m in head.modules():
        if isinstance(m, nn.Linear):
            return m
    raise ValueError("fine-pruning: the head has no nn.Linear whose input columns could be pruned")


class FinePruning(Defense):
    name = "fp"
    knowledge = Knowledge(clean_fraction=0.05, needs_clean=True)
    uses_reference_model = True

    def __init__(
        self,
        prune_step: float = 0.01,
        acc_ratio: float = 0.1,
        steps: int = 1000,
        lr_scale: float = 1.0,
        weight_decay: float = 5e-4,
        batch_size: int = 256,
        holdout: float = 0.2,
        schedule: Schedule = "cosine",
        clean_fraction: float | None = None,
    ) -> None:
        super().__init__(clean_fraction)
        if schedule not in ("cosine", None):
            raise ValueError(f"defense.schedule={schedule!r}; choose cosine or null (a constant lr)")
        if not 0.0 <= prune_step <= 1.0:
            raise ValueError(f"defense.prune_step={prune_step} must lie in [0, 1] (0 = FT: nothing pruned)")
        self.prune_step, self.acc_ratio, self.holdout = prune_step, acc_ratio, holdout
        self.schedule = schedule
        if int(steps) < 1 or int(batch_size) < 1:
            raise ValueError(f"defense.steps={steps} and defense.batch_size={batch_size} must be >= 1")
        self.steps, self.lr_scale = int(steps), float(lr_scale)
        self.weight_decay, self.batch_size = float(weight_decay), int(batch_size)
        if prune_step == 0:
            self.name = "ft"

    def train(self, encoder: nn.Module, train: LabeledSet, probe: Probe, ctx: RunContext) -> Model:
        clean = require_clean(ctx, self.name)
        g = ctx.generator(salt=21001)
        m0 = reference_model(encoder, train, probe, ctx)
        scope = Scope.of_model(m0, probe, clean.x, ctx)  # M0's trainable part, on the memoised clean inputs
        module = scope.module(ctx.num_classes, ctx)
        linear = first_linear(Scope.head_of(module))
        n_pruned = 0
        if self.prune_step > 0:
            fit, held = clean_split(ctx, self.name, self.holdout, g)
            n_pruned = self._prune(module, linear, scope, fit, held, ctx)
        # the reference's optimiser steps at the probe's learning rates (NAD's rule: FT is its teacher), cosine
        epochs = train_steps(
            module,
            scope.inputs,
            clean.y,
            ctx,
            g,
            probe,
            steps=self.steps,
            batch_size=self.batch_size,
            lr_scale=self.lr_scale,
            weight_decay=self.weight_decay,
            schedule=self.schedule,
            desc=self.name,
        )
        if n_pruned:
            torch_prune.remove(linear, "weight")  # the zeroed columns become plain zeros in the weight
        self.diagnostics[f"{self.name}/n_clean"] = len(clean)
        self.diagnostics[f"{self.name}/steps"] = self.steps
        self.diagnostics[f"{self.name}/epochs"] = epochs  # the epochs those steps took on the clean share
        return scope.model(module)

    def _prune(
        self, module: nn.Module, linear: nn.Linear, scope: Scope, fit: LabeledSet, held: LabeledSet, ctx
    ) -> int:
        """Rank the head's input channels by mean clean activation, choose how many to prune on the holdout, zero
        those columns of `linear` and keep them at zero (a pruning mask) through fine-tuning."""
        dev = ctx.device
        act = Scope.penultimate(module, scope.inputs_for(fit.x, ctx), dev).mean(0)
        f_held = Scope.penultimate(module, scope.inputs_for(held.x, ctx), dev)
        scores = {"w": act}
        head = Scope.head_of(module)

        def acc_with(k: int) -> float:
            h = copy.deepcopy(head)
            prune({"w": first_linear(h).weight}, scores, number=k, dim=1)
            return accuracy(h, f_held, held.y, ctx)

        channels = len(act)
        step = max(1, math.ceil(channels * self.prune_step))
        base = acc_with(0)
        k, accs = sweep(list(range(0, channels, step)), acc_with, base, self.acc_ratio, stop_at_failure=True)
        k = k or 0
        chosen = prune({"w": linear.weight}, scores, number=k, dim=1)["w"]
        if k:
            keep = (~chosen).to(linear.weight.device, linear.weight.dtype).expand_as(linear.weight)
            torch_prune.custom_from_mask(linear, "weight", keep.clone())
        n = self.name
        self.decisions["pruned_channels"] = torch.nonzero(chosen).squeeze(1).tolist()
        self.diagnostics.update(
            {
                f"{n}/channels": channels,
                f"{n}/pruned": k,
                f"{n}/holdout_acc_m0": base,
                f"{n}/holdout_acc_pruned": accs[k // step] if accs else base,
                f"{n}/sweep_holdout_acc": [round(a, 4) for a in accs],
            }
        )
        log.info(
            "%s: %d of %d channels pruned, holdout acc %.3f -> %.3f", n, k, channels, base, accs[k // step]
        )
        return k
