"""NAD -- Li, Lyu, Koren, Lyu, Li & Ma, "Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural
Networks", ICLR 2021.

Reference code read: bboylyg/NAD main.py, config.py, at.py, utils/util.py; SCLBD/BackdoorBench defense/nad.py,
config/defense/nad/{config,cifar10}.yaml. Needs clean labelled data (5 %, both codes). On the backdoored model M0:

  teacher   M0 fine-tuned on the clean data with CE (BackdoorBench: te_epochs 10)
  student   M0 trained on the clean data with CE + sum_l beta_l AT(student_l, teacher_l), the teacher frozen in eval
            mode; AT = MSE of the attention maps sum_c |F_c|^2 / ||.||_2 (defenses/_attention.py); SGD, momentum
            0.9, weight decay 1e-4, batch 64; betas (0, 0, 5000) on the three groups of the original's WRN-16-1,
            i.e. the last group only

Transfer learning (BASELINES.md 2.11, ours): M0 is the probe trained on D, and NAD acts on what the probe trains.
Under probe=finetune that is the encoder's top stages + the head, trained on the memoised activations entering
them; `betas` weigh the encoder's LAST stages (the last entry = the last stage, the original's "high layer"), laid
over the trainable stages (a stage below the scope is the same in student and teacher: its AT is 0). Under a frozen
encoder (probe=linear/mlp) the student's and teacher's maps coincide, AT is identically 0 and NAD is fine-tuning
of the head: it refuses to run there (defense=ft is that method).

Schedules are optimiser steps, from the reference's epochs on its 5 % of CIFAR-10 (2 500 images at batch 64: 40
steps an epoch): teacher 10 epochs = 400 steps, student 20 epochs = 800 steps. On the clean share here an epoch has
ceil(n_fit / batch) steps and the epochs are ceil(steps / that): the same number of updates on fewer images (at 5 %
of 4 000 images, 160 fit images, 3 steps an epoch: 134 and 267 epochs). Learning rates are the probe's own (its
encoder_lr for the stages, lr for the head) times `lr_scale`, constant: BackdoorBench fine-tunes at its training lr
(0.01; its adjust_learning_rate keeps 0.01 throughout); the original's 0.1 for two epochs then 0.01 is a
from-scratch WRN's schedule.

Selection (ours, on the held-out 20 % of the clean share): the original saves the student of an epoch whose TEST
clean accuracy exceeds min(70 %, the lowest test ASR so far), which in practice is the last epoch that keeps clean
accuracy; BackdoorBench keeps the last epoch. Here the student's held-out accuracy is measured after every epoch
and the last epoch whose held-out accuracy is at least `min_acc_ratio` x M0's is kept (none: the epoch with the best
held-out accuracy); `select: last` keeps the final epoch. Teacher and student train on the other 80 %.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from securetl.interfaces import Defense, Knowledge, LabeledSet, Model, RunContext
from securetl.knowledge import split_holdout
from securetl.probe import LossFn, Probe, _Tail, cross_entropy_loss, train_loop, trainable_copy
from securetl.validate import ConfigError

from ._attention import align_betas, attention_transfer, stage_outputs
from ._features import Scope, reference_model

log = logging.getLogger(__name__)


def require_clean(ctx: RunContext, method: str) -> LabeledSet:
    """The defense's clean share; a one-line ValueError when it has none."""
    if ctx.clean is None or len(ctx.clean) == 0:
        raise ValueError(f"{method} needs the clean reserve (defense.clean_fraction > 0); it got none")
    return ctx.clean


def epochs_for(steps: int, n: int, batch_size: int) -> int:
    """Epochs over n samples that make at least `steps` optimiser steps (at least one epoch)."""
    return max(1, math.ceil(steps / max(1, math.ceil(n / batch_size))))


# --------------------------------------------------------------------------- M0's trainable scope
@dataclass
class M0Scope:
    """The part of M0 its probe trained, as a trainable copy: M0's top stages + head (a `_Tail`) on the memoised
    activations entering them, or M0's head on the frozen features. What removal methods repair."""

    m0: Model
    scope: Scope  # start (first trainable stage, None under a frozen encoder) and the memoised inputs
    probe: Probe

    @classmethod
    def of(cls, m0: Model, probe: Probe, x: Tensor, ctx: RunContext) -> M0Scope:
        return cls(m0, Scope.of(m0.encoder, probe, x, ctx), probe)

    @property
    def start(self) -> int | None:
        return self.scope.start

    def inputs_for(self, x: Tensor, ctx: RunContext) -> Tensor:
        return self.scope.inputs_for(x, ctx)

    def module(self, ctx: RunContext) -> nn.Module:
        """A fresh trainable copy of M0's scope, on the device."""
        head = trainable_copy(self.m0.head)
        if self.start is None:
            return ctx.num.module(head)
        return ctx.num.module(_Tail(trainable_copy(self.m0.encoder), self.start, head))

    def groups(self, module: nn.Module, lr_scale: float = 1.0) -> list[dict]:
        """The probe's optimiser groups (encoder_lr for stages, lr for the head), times `lr_scale`."""
        if isinstance(module, _Tail):
            return [
                {"params": list(module.stages.parameters()), "lr": self.probe.encoder_lr * lr_scale},
                {"params": list(module.head.parameters()), "lr": self.probe.lr * lr_scale},
            ]
        return [{"params": list(module.parameters()), "lr": self.probe.lr * lr_scale}]

    def model(self, module: nn.Module) -> Model:
        """M0 with `module` in place of its scope (a copy; M0 is not touched)."""
        if not isinstance(module, _Tail):
            return Model(self.m0.encoder, module).eval()
        encoder = copy.deepcopy(self.m0.encoder)
        for i, stage in enumerate(module.stages):
            encoder.stages[self.start + i] = stage
        for p in encoder.parameters():
            p.requires_grad_(False)
        return Model(encoder, module.head).eval()

    @torch.no_grad()
    def accuracy(self, module: nn.Module, inputs: Tensor, y: Tensor, ctx: RunContext) -> float:
        """Accuracy of `module` on scope inputs (eval mode; the caller restores train mode if it needs it)."""
        if len(y) == 0:
            return float("nan")
        pred = Scope.logits(module, inputs, ctx.device).argmax(1)
        return float((pred == y).float().mean())

    def finetune(
        self,
        module: nn.Module,
        inputs: Tensor,
        y: Tensor,
        ctx: RunContext,
        g: torch.Generator,
        *,
        steps: int,
        batch_size: int,
        lr_scale: float,
        weight_decay: float,
        loss_fn: LossFn = cross_entropy_loss,
        desc: str = "finetune",
    ) -> int:
        """SGD (momentum 0.9) on `module` for `steps` updates' worth of epochs; returns the epochs run."""
        epochs = epochs_for(steps, len(y), batch_size)
        train_loop(
            module,
            inputs,
            y,
            ctx,
            self.groups(module, lr_scale),
            epochs=epochs,
            batch_size=batch_size,
            g=g,
            optimizer="sgd",
            weight_decay=weight_decay,
            loss_fn=loss_fn,
            desc=desc,
        )
        return epochs


class AtEpochEnd:
    """A train_loop loss_fn that first calls `check(module, epochs_done)` at the first batch of every epoch after
    the first (the last epoch's check is the caller's, after the loop). train_loop has no epoch callback, and
    restarting it every epoch would reset SGD's momentum every few steps on a small clean share."""

    def __init__(
        self, loss_fn: LossFn, n: int, batch_size: int, check: Callable[[nn.Module, int], None]
    ) -> None:
        self.loss_fn, self.check = loss_fn, check
        self.per_epoch, self.steps = max(1, math.ceil(n / batch_size)), 0

    def __call__(self, module: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
        if self.steps and self.steps % self.per_epoch == 0:
            self.check(module, self.steps // self.per_epoch)
            module.train()
        self.steps += 1
        return self.loss_fn(module, xb, yb)


# --------------------------------------------------------------------------- NAD
def nad_loss(teacher: _Tail, betas: list[float], p: float) -> LossFn:
    """CE of the student + sum_l beta_l AT(student stage l, teacher stage l) over the trainable stages."""

    def fn(student: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
        hs = stage_outputs(student.stages, xb)
        logits = student.head(hs[-1].mean(dim=(2, 3)) if hs[-1].dim() == 4 else hs[-1])
        with torch.no_grad():
            ht = stage_outputs(teacher.stages, xb)
        return F.cross_entropy(logits.float(), yb) + attention_transfer(hs, ht, betas, p)

    return fn


class _Selection:
    """The held-out rule: the last epoch whose held-out accuracy is >= floor, else the best (the later on ties)."""

    def __init__(self, floor: float) -> None:
        self.floor = floor
        self.accs: list[float] = []
        self.kept: tuple[int, dict] | None = None
        self.best: tuple[int, float, dict] | None = None

    def observe(self, epoch: int, acc: float, module: nn.Module) -> None:
        self.accs.append(acc)
        state = None
        if acc >= self.floor:
            state = copy.deepcopy(module.state_dict())
            self.kept = (epoch, state)
        if self.best is None or acc >= self.best[1]:
            self.best = (epoch, acc, state if state is not None else copy.deepcopy(module.state_dict()))

    def choice(self) -> tuple[int, dict]:
        if self.kept is not None:
            return self.kept
        assert self.best is not None
        return self.best[0], self.best[2]


class NAD(Defense):
    name = "nad"
    knowledge = Knowledge(clean_fraction=0.05, needs_clean=True)

    def __init__(
        self,
        teacher_steps: int = 400,
        student_steps: int = 800,
        batch_size: int = 64,
        lr_scale: float = 1.0,
        weight_decay: float = 1e-4,
        betas: tuple[float, ...] = (0.0, 0.0, 5000.0),
        p: float = 2.0,
        holdout: float = 0.2,
        select: Literal["holdout", "last"] = "holdout",
        min_acc_ratio: float = 0.9,
        clean_fraction: float | None = None,
    ) -> None:
        super().__init__(clean_fraction)
        if select not in ("holdout", "last"):
            raise ValueError(f"defense.select={select!r}; choose holdout or last")
        if not 0.0 < holdout < 1.0:
            raise ValueError(f"defense.holdout={holdout} must lie in (0, 1)")
        self.teacher_steps, self.student_steps, self.batch_size = (
            int(teacher_steps),
            int(student_steps),
            int(batch_size),
        )
        self.lr_scale, self.weight_decay = float(lr_scale), float(weight_decay)
        self.betas, self.p = [float(b) for b in betas], float(p)
        self.holdout, self.select, self.min_acc_ratio = float(holdout), select, float(min_acc_ratio)

    def train(self, encoder: nn.Module, train: LabeledSet, probe: Probe, ctx: RunContext) -> Model:
        clean = require_clean(ctx, "NAD")
        if probe.frozen:
            raise ConfigError(
                f"defense=nad needs trainable encoder stages (probe=finetune): under probe={probe.kind} the encoder "
                "is frozen, student and teacher attention maps coincide and NAD is fine-tuning of the head (defense=ft)"
            )
        fit, held = split_holdout(clean, self.holdout, ctx.generator(salt=21101))
        m0 = reference_model(encoder, train, probe, ctx)
        scope = M0Scope.of(m0, probe, fit.x, ctx)
        x_fit, x_held = scope.scope.inputs, scope.inputs_for(held.x, ctx)
        betas = align_betas(self.betas, len(m0.encoder.stages) - scope.start)
        self._check_maps(scope.module(ctx), x_fit[:2].to(ctx.device), betas)
        acc_m0 = scope.accuracy(scope.module(ctx), x_held, held.y, ctx)

        # 1. teacher: M0 fine-tuned on the clean data (CE)
        teacher = scope.module(ctx)
        te_epochs = self._fit(
            scope, teacher, x_fit, fit.y, ctx, 21102, self.teacher_steps, cross_entropy_loss, "nad teacher"
        )
        teacher.eval().requires_grad_(False)

        # 2. student: M0 trained with CE + sum_l beta_l AT(student_l, teacher_l), checked on the held-out part
        student = scope.module(ctx)
        loss = nad_loss(teacher, betas, self.p)
        # without held-out images (one clean image a class) there is nothing to select on: the last epoch
        select = self.select if len(held) else "last"
        rule = _Selection(self.min_acc_ratio * acc_m0)

        def check(module: nn.Module, epoch: int) -> None:
            rule.observe(epoch, scope.accuracy(module, x_held, held.y, ctx), module)

        if select == "holdout":
            loss = AtEpochEnd(loss, len(fit), self.batch_size, check)
        st_epochs = self._fit(
            scope, student, x_fit, fit.y, ctx, 21103, self.student_steps, loss, "nad student"
        )
        chosen = st_epochs
        if select == "holdout":
            check(student, st_epochs)
            chosen, state = rule.choice()
            student.load_state_dict(state)

        self.diagnostics.update(
            {
                "nad/n_fit": len(fit),
                "nad/n_holdout": len(held),
                "nad/at_stages": [scope.start + i for i, b in enumerate(betas) if b],
                "nad/teacher_epochs": te_epochs,
                "nad/student_epochs": st_epochs,
                "nad/selected_epoch": chosen,
                "nad/holdout_acc_m0": acc_m0,
                "nad/holdout_acc_teacher": scope.accuracy(teacher, x_held, held.y, ctx),
                "nad/holdout_acc_student": scope.accuracy(student, x_held, held.y, ctx),
                "nad/holdout_acc_per_epoch": rule.accs,
            }
        )
        return scope.model(student)

    def _fit(self, scope: M0Scope, module, x, y, ctx, salt: int, steps: int, loss: LossFn, desc: str) -> int:
        """SGD on `module` for `steps` updates (the YAML's schedule) with `loss`; the epochs it took."""
        return scope.finetune(
            module, x, y, ctx, ctx.generator(salt=salt), steps=steps, batch_size=self.batch_size,
            lr_scale=self.lr_scale, weight_decay=self.weight_decay, loss_fn=loss, desc=desc,
        )  # fmt: skip

    @staticmethod
    @torch.no_grad()
    def _check_maps(module: nn.Module, h: Tensor, betas: list[float]) -> None:
        """Attention maps need spatial stage outputs: refuse, before training, an encoder whose weighted stages
        give flat vectors (a timm model wrapped as one stage)."""
        outs = stage_outputs(module.eval().stages, h)
        flat = [i for i, (o, b) in enumerate(zip(outs, betas)) if b and o.dim() != 4]
        if flat:
            raise ConfigError(
                "defense=nad compares attention maps of (N, C, H, W) stage outputs; this encoder's trainable stages "
                f"{flat} give {tuple(outs[flat[0]].shape)}: set defense.betas to 0 there"
            )
