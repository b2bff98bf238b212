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
(0.01: the student's adjust_learning_rate keeps 0.01 for its 10 epochs and its scheduler step is commented out; the
teacher's CosineAnnealingLR has T_max 100 over 10 epochs, lr x 0.976 at the end); the original's 0.1 for two epochs
then 0.01 is a from-scratch WRN's schedule. The held-out check runs at every epoch's end (train_loop's
on_epoch_end), within one run of the optimiser.

Selection (ours, on the held-out 20 % of the clean share): the original saves the student of an epoch whose TEST
clean accuracy exceeds min(70 %, the lowest test ASR so far), which in practice is the last epoch that keeps clean
accuracy; BackdoorBench keeps the last epoch. Here the student's held-out accuracy is measured after every epoch
and the last epoch whose held-out accuracy is at least `min_acc_ratio` x M0's is kept (none: the epoch with the best
held-out accuracy); `select: last` keeps the final epoch. Teacher and student train on the other 80 %.
"""

from __future__ import annotations

import copy
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from securetl.interfaces import Defense, Knowledge, LabeledSet, Model, RunContext
from securetl.probe import LossFn, Probe, _Tail, cross_entropy_loss
from securetl.validate import ConfigError

from ._attention import align_betas, attention_transfer, stage_outputs
from ._features import Scope, accuracy, clean_split, reference_model, require_clean, train_steps

log = logging.getLogger(__name__)


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
    uses_reference_model = True

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
        require_clean(ctx, "NAD")
        if probe.frozen:
            raise ConfigError(
                f"defense=nad needs trainable encoder stages (probe=finetune): under probe={probe.kind} the encoder "
                "is frozen, student and teacher attention maps coincide and NAD is fine-tuning of the head (defense=ft)"
            )
        # with one clean image a class nothing is held out: the last epoch is kept (no selection to make)
        fit, held = clean_split(ctx, "NAD", self.holdout, ctx.generator(salt=21101), strict=False)
        m0 = reference_model(encoder, train, probe, ctx)
        scope = Scope.of_model(m0, probe, fit.x, ctx)
        x_fit, x_held = scope.inputs, scope.inputs_for(held.x, ctx)
        betas = align_betas(self.betas, len(m0.encoder.stages) - scope.start)
        k = ctx.num_classes
        self._check_maps(scope.module(k, ctx), x_fit[:2].to(ctx.device), betas)
        acc_m0 = accuracy(scope.module(k, ctx), x_held, held.y, ctx)

        # 1. teacher: M0 fine-tuned on the clean data (CE)
        teacher = scope.module(k, ctx)
        te_epochs = self._fit(
            probe, teacher, x_fit, fit.y, ctx, 21102, self.teacher_steps, cross_entropy_loss, "nad teacher"
        )
        teacher.eval().requires_grad_(False)

        # 2. student: M0 trained with CE + sum_l beta_l AT(student_l, teacher_l), checked on the held-out part
        student = scope.module(k, ctx)
        select = self.select if len(held) else "last"
        rule = _Selection(self.min_acc_ratio * acc_m0)

        def check(epoch: int) -> None:
            rule.observe(epoch, accuracy(student, x_held, held.y, ctx), student)

        st_epochs = self._fit(
            probe, student, x_fit, fit.y, ctx, 21103, self.student_steps, nad_loss(teacher, betas, self.p),
            "nad student", check if select == "holdout" else None,
        )  # fmt: skip
        chosen = st_epochs
        if select == "holdout":
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
                "nad/holdout_acc_teacher": accuracy(teacher, x_held, held.y, ctx),
                "nad/holdout_acc_student": accuracy(student, x_held, held.y, ctx),
                "nad/holdout_acc_per_epoch": rule.accs,
            }
        )
        return scope.model(student)

    def _fit(
        self, probe, module, x, y, ctx, salt: int, steps: int, loss: LossFn, desc: str, on_epoch_end=None
    ) -> int:
        """SGD on `module` for `steps` updates (the YAML's schedule) with `loss`; the epochs it took."""
        return train_steps(
            module, x, y, ctx, ctx.generator(salt=salt), probe, steps=steps, batch_size=self.batch_size,
            lr_scale=self.lr_scale, weight_decay=self.weight_decay, loss_fn=loss, on_epoch_end=on_epoch_end,
            desc=desc,
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
