"""DECREE -- Feng, Tao, Cheng, Shen, Xu, Liu, Zhang, Ma & Zhang, "Detecting Backdoors in Pre-trained Encoders",
CVPR 2023.

Reference code read: GiantSeaweed/DECREE main.py, utils.py (compute_self_cos_sim), run_decree.py, README.md (9c13b88).
A detector that needs the encoder and unlabelled images only (no head, no labels): a backdoored encoder maps any image
carrying its trigger to one embedding, so a SMALL trigger that collapses a batch of clean images exists for it.

  1. invert   a mask m (H x W) and a pattern p (C x H x W), tanh-parameterised, x' = (1 - m) x + m p; minimise
              -(mean off-diagonal cosine similarity of the encoder's embeddings of the stamped batch) + lambda |m|_1,
              the L1 counted over the mask repeated on 3 channels; Adam, betas (0.5, 0.9), lr 0.5 (run_decree.py;
              main.py's default is 1e-3) then 0.1 from epoch 30 and 0.05 from epoch 50 (its CIFAR schedule); lambda
              from 1e-3, x5 after more than 5 steps in a row with cosine > 0.99, / 5 after more than 5 without, never
              divided below 1e-5 and reset to 1e-3 after more than 10 successes below it, never multiplied at 1e5 or
              above; the smallest-L1 successful mask is kept; stop at the end of an epoch whose mean succeeded once
              more than 10 steps in a row left that L1 unimproved; at most 1 000 epochs, batch 256; the mask starts
              uniform at random (`rand`, run_decree.py) or as the fixed 22 x 22 square at (5, 5) of 32 x 32 (`orc`)
              (defenses/_inversion.py: one check per step, as main.py)
  2. statistic PL1 = L1 / (3 H W): the share of the image the trigger covers (the README: "the PL1-norm can be easily
              computed from the L1-norm"; this is our reading). No successful trigger: PL1 = 1 (main.py reports an L1 of
              1e7 then, i.e. no trigger short of the whole image)
  3. verdict  backdoored when PL1 < `threshold`

The threshold: the paper's value could not be read, and it is a property of the image size and the encoder family. It
is calibrated on CLEAN encoders only (BASELINES.md 2.15): `python scripts/decree_calibrate.py` runs DECREE with
`action=continue` on clean encoders the suite pre-trains (SSL methods x pre-training seeds that no table uses),
puts the threshold at exp(median - k x 1.4826 MAD) of their log PL1 (k = 2, the MAD rule of the suite's other
detectors, on the log scale of a ratio), and with `--write` stores it in conf/deltas/<dataset>.yaml, so every row's
config carries the threshold it was judged by.
The YAML's threshold is null: with no calibrated threshold DECREE can only report its statistic (`action: continue`).

What a user does with the verdict (`action`), recorded in the row with the statistic (decree/pl1, decree/flagged,
decree/action):
  continue  use the encoder anyway (the row's ACC and ASR are those of no defense)
  refuse    a flagged encoder is not used and nothing is deployed: the model abstains on every input (an extra
            "refused" logit above every class), so the row reports ACC 0 and ASR 0 -- the cost of a false alarm on a
            clean encoder is all of its accuracy
  fallback  a flagged encoder is replaced by `fallback_checkpoint` (a trusted encoder of the same architecture), or,
            when null, by the same architecture without pre-training (freshly initialised): the probe trains on it
  distill   a flagged encoder is distilled (defenses/distill.py, settings under defense.distill) and the student
            replaces it (BASELINES.md's decree+distill)

Transfer learning (ours): DECREE runs before the probe on the defense's share of the clean reserve, unlabelled (the
authors' shadow set is 1 000 CIFAR-10 test images; 5 % of |D| = 200 here), in [0, 1] with each encoder's own input
normalisation (the codes feed 0-255 images through the encoder's transform: the same images). Schedules are optimiser
steps, the reference's epochs at its 4 steps an epoch (1 000 images at batch 256): 4 000 steps at most, lr steps at
120 and 200; on our 200 images one step is the whole share. The inversion is cached (kind `decree`: mask, pattern and
statistic), keyed on the encoder's weights, the images, the inversion settings and the seed, so a table that only
changes the action or the probe does not invert again.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from securetl.cache import config_hash
from securetl.encoders.checkpoint import load_checkpoint
from securetl.encoders.obtain import digest
from securetl.interfaces import Defense, Knowledge, LabeledSet, Model, RunContext
from securetl.probe import Probe, trainable_copy
from securetl.validate import ConfigError

from ._features import require_clean
from ._inversion import EarlyStop, Inverted, LambdaSchedule, invert_trigger
from .distill import UNLABELLED, Distillation, frozen, reinitialised, state_digest

log = logging.getLogger(__name__)

ACTIONS = ("continue", "refuse", "fallback", "distill")


def self_cosine(embeddings: Tensor) -> Tensor:
    """Mean cosine similarity between the distinct pairs of a batch of embeddings (utils.compute_self_cos_sim)."""
    z = F.normalize(embeddings.float(), dim=1)
    sim = z @ z.T
    n = len(z)
    return (sim.sum() - sim.diagonal().sum()) / max(1, n * (n - 1))


def collapse_objective(encoder: nn.Module):
    """DECREE's objective: minus the batch's self-cosine; the score is the self-cosine itself."""

    def fn(xs: Tensor) -> tuple[Tensor, Tensor]:
        cos = self_cosine(encoder(xs))
        return -cos, cos

    return fn


def square_mask(h: int, w: int) -> Tensor:
    """main.py's `orc` initial mask: 1 on a square (22 x 22 from (5, 5) on 32 x 32, scaled), ~0 elsewhere."""
    m = torch.full((h, w), 1e-7)
    r0, c0, side_h, side_w = round(5 * h / 32), round(5 * w / 32), round(22 * h / 32), round(22 * w / 32)
    m[r0 : r0 + side_h, c0 : c0 + side_w] = 1.0
    return m


def pl1(inv: Inverted, image_shape: tuple[int, ...]) -> float:
    """The statistic: the 3-channel L1 of the kept mask over the number of input values; 1 when nothing succeeded."""
    c, h, w = image_shape
    return inv.l1 / (3 * h * w) if inv.found else 1.0


class Abstain(nn.Module):
    """The head of a refused encoder: `num_classes` + 1 logits, the last ("refused") the largest, so the model
    answers no class for any input."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, f: Tensor) -> Tensor:
        out = f.new_zeros(len(f), self.num_classes + 1)
        out[:, -1] = 1.0
        return out


@dataclass
class _Inversion:
    """The inversion settings (what the cached result depends on besides the encoder, the images and the seed)."""

    steps: int
    batch_size: int
    lr: float
    lr_steps: list[int]
    lr_values: list[float]
    success: float
    init_lambda: float
    lambda_factor: float
    patience: int
    lambda_min: float
    lambda_reset_patience: int
    lambda_max: float
    early_stop_patience: int
    mask_init: str


class DECREE(Defense):
    name = "decree"
    knowledge = Knowledge(clean_fraction=0.05, needs_clean=True)

    def __init__(
        self,
        threshold: float | None = None,
        action: Literal["continue", "refuse", "fallback", "distill"] = "refuse",
        fallback_checkpoint: str | None = None,
        distill: Distillation | None = None,
        steps: int = 4000,
        batch_size: int = 256,
        lr: float = 0.5,
        lr_steps: tuple[int, ...] = (120, 200),
        lr_values: tuple[float, ...] = (0.1, 0.05),
        success: float = 0.99,
        init_lambda: float = 1e-3,
        lambda_factor: float = 5.0,
        patience: int = 5,
        lambda_min: float = 1e-5,
        lambda_reset_patience: int = 10,
        lambda_max: float = 1e5,
        early_stop_patience: int = 10,
        mask_init: Literal["rand", "orc"] = "rand",
        clean_fraction: float | None = None,
    ) -> None:
        super().__init__(clean_fraction)
        if action not in ACTIONS:
            raise ValueError(f"defense.action={action!r}; choose one of {', '.join(ACTIONS)}")
        if threshold is None and action != "continue":
            raise ValueError(
                f"defense.action={action} needs a verdict, but defense.threshold is null (not calibrated): run "
                "`python scripts/decree_calibrate.py --write`, set defense.threshold=..., or use defense.action=continue"
            )
        if mask_init not in ("rand", "orc"):
            raise ValueError(f"defense.mask_init={mask_init!r}; choose rand or orc")
        if len(lr_steps) != len(lr_values):
            raise ValueError(
                f"defense.lr_steps {list(lr_steps)} and lr_values {list(lr_values)} differ in length"
            )
        if steps < 1 or batch_size < 2:
            raise ValueError("defense.steps must be >= 1 and defense.batch_size >= 2")
        self.threshold = None if threshold is None else float(threshold)
        self.action, self.fallback_checkpoint = action, fallback_checkpoint
        self.distiller = distill if distill is not None else (Distillation() if action == "distill" else None)
        if action == "distill":  # it may train an encoder
            self.knowledge = replace(self.knowledge, trains_encoder=True)
        self.inv = _Inversion(
            int(steps), int(batch_size), float(lr), [int(s) for s in lr_steps], [float(v) for v in lr_values],
            float(success), float(init_lambda), float(lambda_factor), int(patience), float(lambda_min),
            int(lambda_reset_patience), float(lambda_max), int(early_stop_patience), mask_init,
        )  # fmt: skip

    # ------------------------------------------------------------------ the detector
    def invert(self, encoder: nn.Module, images: Tensor, ctx: RunContext) -> Inverted:
        """Step 1 on `images` (uint8 or float in [0, 1]) through a frozen copy of `encoder` (images -> embeddings)."""
        s = self.inv
        net = frozen(trainable_copy(encoder), ctx)
        n, _, h, w = images.shape
        per_epoch = math.ceil(n / s.batch_size)  # the reference's loader keeps its last partial batch
        epochs = math.ceil(s.steps / per_epoch)

        def lr_at(epoch: int) -> float:
            step = epoch * per_epoch
            passed = [v for at, v in zip(s.lr_steps, s.lr_values) if step >= at]
            return passed[-1] if passed else s.lr

        return invert_trigger(
            collapse_objective(net),
            images,
            ctx,
            ctx.generator(salt=21501),
            epochs=epochs,
            batch_size=s.batch_size,
            success=s.success,
            lr=s.lr,
            lam=LambdaSchedule(
                init=s.init_lambda, up=s.lambda_factor, down=s.lambda_factor, patience=s.patience, strict=True,
                floor=s.lambda_min, reset_patience=s.lambda_reset_patience, cap=s.lambda_max,
            ),
            stop=EarlyStop(
                threshold=1.0, patience=s.early_stop_patience, strict=True, after_lambda_moves=False, on_success=True
            ),
            per_step=True,
            l1_channels=3,
            mask_init=square_mask(h, w) if s.mask_init == "orc" else None,
            lr_at=lr_at,
            desc="decree",
        )  # fmt: skip

    def detect(self, encoder: nn.Module, images: Tensor, ctx: RunContext) -> dict[str, Any]:
        """Steps 1-3 (the inversion from the cache when it has it); records and returns the diagnostics."""
        cache = ctx.cache
        key = config_hash(
            "decree", state_digest(encoder), digest(images), asdict(self.inv), ctx.seed, ctx.num.record()
        )
        with cache.building("decree", key) if cache else nullcontext():
            state = cache.load_state("decree", key) if cache else None
            if state is not None:
                meta = cache.load_meta("decree", key) or {}
                inv = Inverted(state["mask"], state["pattern"], **meta["inverted"])
            else:
                inv = self.invert(encoder, images, ctx)
                if cache:
                    fields = {k: getattr(inv, k) for k in ("l1", "score", "found", "epochs", "lam")}
                    cache.save_state(
                        "decree", key, {"mask": inv.mask, "pattern": inv.pattern}, {"inverted": fields}
                    )
        stat = pl1(inv, tuple(images.shape[1:]))
        flagged = None if self.threshold is None else bool(stat < self.threshold)
        out = {
            "decree/pl1": stat,
            "decree/l1": inv.l1,
            "decree/found": inv.found,
            "decree/cosine": inv.score,
            "decree/epochs": inv.epochs,
            "decree/lambda": inv.lam,
            "decree/n_images": len(images),
            "decree/threshold": self.threshold,
            "decree/flagged": flagged,
        }
        if (
            cache
        ):  # where the inverted trigger is: <cache>/decree/<key>.safetensors holds its mask and pattern
            out["decree/trigger_key"] = key
        self.diagnostics.update(out)
        self.inverted = inv
        verdict = {None: "no verdict", True: "backdoored", False: "clean"}[flagged]
        log.info("decree: PL1 %.4f (threshold %s): %s", stat, self.threshold, verdict)
        return out

    # ------------------------------------------------------------------ the defense
    def train(self, encoder: nn.Module, train: LabeledSet, probe: Probe, ctx: RunContext) -> Model:
        clean = require_clean(ctx, "DECREE", UNLABELLED)
        if (
            self.action == "fallback"
            and self.fallback_checkpoint
            and not Path(self.fallback_checkpoint).is_file()
        ):
            raise ConfigError(f"defense.fallback_checkpoint={self.fallback_checkpoint}: no such file")
        flagged = self.detect(encoder, clean.x, ctx)["decree/flagged"]
        act = self.action if flagged else "continue"
        self.diagnostics["decree/action"] = act
        if act == "refuse":
            log.info("decree: the encoder is refused; nothing is deployed (ACC 0, ASR 0)")
            return Model(encoder, Abstain(ctx.num_classes)).eval()
        if act == "fallback":
            encoder = self.fallback(encoder, ctx)
        elif act == "distill":
            encoder = self.distiller.repair(encoder, train, probe, ctx)
            self.diagnostics.update(self.distiller.diagnostics)
        return probe.fit(encoder, train, ctx)

    def fallback(self, encoder: nn.Module, ctx: RunContext) -> nn.Module:
        """The trusted checkpoint loaded into the received architecture, or that architecture freshly initialised."""
        if self.fallback_checkpoint:
            replacement = trainable_copy(encoder)
            load_checkpoint(replacement, self.fallback_checkpoint)
        else:
            replacement = reinitialised(encoder, ctx.seed * 10 + 5)
        return frozen(replacement, ctx)
