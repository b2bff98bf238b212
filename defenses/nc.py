"""Neural Cleanse -- Wang, Yao, Shan, Li, Viswanath, Zheng & Zhao, "Neural Cleanse: Identifying and Mitigating
Backdoor Attacks in Neural Networks", IEEE S&P 2019.

Reference code read: bolunwang/backdoor visualizer.py, gtsrb_visualize_example.py, mad_outlier_detection.py (the
authors'); SCLBD/BackdoorBench defense/nc.py, config/defense/nc/{config,cifar10}.yaml. Needs clean labelled data.

  1. reverse-engineer, for every class t, the smallest trigger that sends the clean images to t: a mask m (H x W)
     and a pattern p (C x H x W), tanh-parameterised, x' = (1 - m) x + m p, loss CE(M0(x'), t) + lambda |m|_1;
     Adam lr 0.1, betas (0.5, 0.9); lambda from 1e-3, x2 after 5 epochs in a row whose mean attack success is
     >= 98 %, / 2^1.5 after 5 below; the smallest-L1 successful mask is kept; early stop once it has not improved
     by 1 % for 25 epochs and lambda has moved both ways; at most 80 epochs (defenses/_inversion.py)
  2. detect: anomaly index of each class's L1 norm, |l1 - median| / (1.4826 MAD) (defenses/_scoring.py); the
     classes below the median with index > 2 are flagged (the backdoor targets)
  3. mitigate (unlearning): stamp each flagged class's reversed trigger on 20 % of the clean data, keep their true
     labels, and fine-tune M0 on that mix. No class flagged: M0 is returned as it is (BackdoorBench)

Transfer learning (BASELINES.md 2.14, ours): the trigger is optimised in input space, through the whole of M0 (the
frozen bottom of the encoder, then the scope its probe trained: top stages + head under probe=finetune, the head
under a frozen encoder) -- the same blend as the authors' raw-pixel one, since each encoder normalises its own input.
Unlearning fine-tunes M0's trainable scope (defenses/_features.Scope.of_model): under probe=linear/mlp only the head, on the
frozen features of the clean and stamped images, which is what NC can still do there (weak by design).

Deviations, and why: inversion and unlearning read the clean share, not the test set (the authors' example inverts
on X_test); no selection rule is made on data (the thresholds are fixed), so NC uses all of its clean share and
holds nothing out. Batch 32 is the authors' (BackdoorBench inverts at its loader's 256, which on a 200-image share
is one Adam step an epoch). Unlearning is BackdoorBench's fine-tuning (100 epochs of 2 500 images at batch 256 =
1 000 steps, SGD momentum 0.9, weight decay 5e-4) as optimiser steps at the probe's own learning rates, annealed
with a cosine over those steps as BackdoorBench's CosineAnnealingLR over its 100 epochs (`unlearn_schedule`); the
stamp is the blend above, quantised to uint8 like an image (BackdoorBench adds a min-max-rescaled copy of mask x
pattern instead).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from securetl.interfaces import Defense, Knowledge, LabeledSet, Model, RunContext, to_float, to_uint8
from securetl.probe import Probe

from ._features import Scope, reference_model, require_clean, train_steps
from ._inversion import EarlyStop, Inverted, LambdaSchedule, invert_trigger, stamp
from ._scoring import mad_anomaly_index

log = logging.getLogger(__name__)


def target_objective(model: nn.Module, target: int):
    """CE of the model's logits towards `target`; score = the share of the batch classified as `target`."""

    def fn(xs: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(xs).float()
        y = torch.full((len(xs),), target, dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()

    return fn


def outliers(l1: np.ndarray, threshold: float) -> tuple[list[int], np.ndarray]:
    """(flagged classes, anomaly index of every class): the classes whose L1 lies below the median with an anomaly
    index above `threshold`, smallest L1 first (mad_outlier_detection.py)."""
    index = mad_anomaly_index(l1)
    below = l1 < np.median(l1)
    flagged = [int(c) for c in np.argsort(l1, kind="stable") if below[c] and index[c] > threshold]
    return flagged, index


def unlearning_set(
    clean: LabeledSet, triggers: list[Inverted], ratio: float, g: torch.Generator
) -> LabeledSet:
    """The clean share with `ratio` of it (drawn from g) replaced by its copies stamped with each trigger, at their
    true labels (BackdoorBench: the first 1 - ratio clean, the rest stamped once per flagged class)."""
    perm = torch.randperm(len(clean), generator=g)
    n_stamped = round(ratio * len(clean))
    keep, chosen = perm[n_stamped:].sort().values, perm[:n_stamped].sort().values
    xs, ys = [clean.x[keep]], [clean.y[keep]]
    for t in triggers:
        xs.append(to_uint8(stamp(to_float(clean.x[chosen]), t.mask, t.pattern)))
        ys.append(clean.y[chosen])
    return LabeledSet(torch.cat(xs), torch.cat(ys))


class NeuralCleanse(Defense):
    name = "nc"
    knowledge = Knowledge(clean_fraction=0.05, needs_clean=True)
    uses_reference_model = True

    def __init__(
        self,
        epochs: int = 80,
        batch_size: int = 32,
        lr: float = 0.1,
        init_cost: float = 1e-3,
        cost_multiplier: float = 2.0,
        patience: int = 5,
        attack_success: float = 0.98,
        early_stop_threshold: float = 0.99,
        early_stop_patience: int = 25,
        anomaly_threshold: float = 2.0,
        unlearning_ratio: float = 0.2,
        unlearn_steps: int = 1000,
        unlearn_batch_size: int = 256,
        unlearn_lr_scale: float = 1.0,
        unlearn_weight_decay: float = 5e-4,
        unlearn_schedule: str | None = "cosine",
        clean_fraction: float | None = None,
    ) -> None:
        super().__init__(clean_fraction)
        if not 0.0 < unlearning_ratio < 1.0:
            raise ValueError(f"defense.unlearning_ratio={unlearning_ratio} must lie in (0, 1)")
        self.epochs, self.batch_size, self.lr = int(epochs), int(batch_size), float(lr)
        self.schedule = LambdaSchedule(
            init=init_cost, up=cost_multiplier, down=cost_multiplier**1.5, patience=patience
        )
        self.stop = EarlyStop(threshold=early_stop_threshold, patience=early_stop_patience)
        self.attack_success, self.anomaly_threshold = float(attack_success), float(anomaly_threshold)
        self.unlearning_ratio, self.unlearn_steps = float(unlearning_ratio), int(unlearn_steps)
        self.unlearn_batch_size, self.unlearn_lr_scale = int(unlearn_batch_size), float(unlearn_lr_scale)
        self.unlearn_weight_decay = float(unlearn_weight_decay)
        if unlearn_schedule not in (None, "cosine"):
            raise ValueError(f"defense.unlearn_schedule={unlearn_schedule!r}; choose cosine or null")
        self.unlearn_schedule = unlearn_schedule

    # ------------------------------------------------------------------ the three steps
    def reverse_engineer(self, model: nn.Module, images: Tensor, ctx: RunContext) -> list[Inverted]:
        """Step 1 for every class, through a frozen copy of `model` (images in [0, 1] -> logits)."""
        net = copy.deepcopy(model)
        for q in net.parameters():
            q.requires_grad_(False)
        ctx.num.module(net.eval())
        g = ctx.generator(salt=21401)
        out = []
        for t in tqdm(range(ctx.num_classes), desc="nc: classes", disable=not ctx.progress, leave=False):
            out.append(
                invert_trigger(
                    target_objective(net, t),
                    images,
                    ctx,
                    g,
                    epochs=self.epochs,
                    batch_size=self.batch_size,
                    success=self.attack_success,
                    lr=self.lr,
                    lam=self.schedule,
                    stop=self.stop,
                    desc=f"nc: class {t}",
                )
            )
        return out

    def detect(self, triggers: list[Inverted]) -> list[int]:
        """Step 2: the flagged classes; records the norms and anomaly indices."""
        l1 = np.array([t.l1 for t in triggers], dtype=np.float64)
        flagged, index = outliers(l1, self.anomaly_threshold)
        self.diagnostics.update(
            {
                "nc/l1": l1.tolist(),
                "nc/anomaly_indices": index.tolist(),
                # the index of the smallest norm, the one the paper reports per model
                "nc/anomaly_index": float(index[int(np.argmin(l1))]),
                "nc/flagged_classes": flagged,
                "nc/inversion_found": [t.found for t in triggers],
                "nc/inversion_success": [t.score for t in triggers],
                "nc/inversion_epochs": [t.epochs for t in triggers],
            }
        )
        return flagged

    def unlearn(self, m0: Model, data: LabeledSet, probe: Probe, ctx: RunContext) -> Model:
        """Step 3: fine-tune M0's trainable scope on the clean + stamped mix."""
        scope = Scope.of_model(m0, probe, data.x, ctx)
        module = scope.module(ctx.num_classes, ctx)
        epochs = train_steps(
            module,
            scope.inputs,
            data.y,
            ctx,
            ctx.generator(salt=21403),
            probe,
            steps=self.unlearn_steps,
            batch_size=self.unlearn_batch_size,
            lr_scale=self.unlearn_lr_scale,
            weight_decay=self.unlearn_weight_decay,
            schedule=self.unlearn_schedule,
            desc="nc unlearn",
        )
        self.diagnostics["nc/unlearn_epochs"] = epochs
        return scope.model(module)

    # ------------------------------------------------------------------ the defense
    def train(self, encoder: nn.Module, train: LabeledSet, probe: Probe, ctx: RunContext) -> Model:
        clean = require_clean(ctx, "Neural Cleanse")
        m0 = reference_model(encoder, train, probe, ctx)
        triggers = self.reverse_engineer(m0, clean.x, ctx)
        flagged = self.detect(triggers)
        self.diagnostics["nc/unlearned"] = bool(flagged)
        if not flagged:
            log.info(
                "nc: no class flagged (anomaly index <= %s): M0 is returned unchanged", self.anomaly_threshold
            )
            self.diagnostics["nc/n_stamped"] = 0
            return m0
        mix = unlearning_set(
            clean, [triggers[c] for c in flagged], self.unlearning_ratio, ctx.generator(salt=21402)
        )
        self.diagnostics["nc/n_stamped"] = round(self.unlearning_ratio * len(clean)) * len(flagged)
        return self.unlearn(m0, mix, probe, ctx)
