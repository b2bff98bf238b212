"""Distillation -- Han, Song, Sun, Ding, Feng, Fang, Li, Qian, Chen & Liu, "Can Distillation Mitigate Backdoor Attacks
in Pre-trained Encoders?" (arXiv 2403.03846, 2024; v1: "On the Effectiveness of Distillation in Mitigating Backdoors in
Pre-trained Encoder"). ASR 80.87 % -> 27.51 % for -6.35 ACC points over BadEncoder-type attacks; of four teachers,
three students and six losses, a fine-tuned teacher, a warm-up-trained student and an attention loss did best.

No official code: the structure is the paper's (abstract and figure 2), the mechanics and numbers come from the same
group's MIMIC (wssun/MIMIC: MIMIC.py, models/AT.py, models/simclr_model.py) and from the loss zoo MIMIC's AT is taken
from (AberHu/Knowledge-Distillation-Zoo: train_kd.py, example_train_script.sh). Needs clean UNLABELLED images: the
defense's share of the clean reserve, whose labels it never reads. An encoder-level removal, before any probe:

  teacher   the received encoder fine-tuned with SimCLR on the clean images (`teacher: finetuned`, the paper's best);
            `received`: the received encoder as is (MIMIC's teacher)
  student   a freshly initialised encoder of the received one's architecture (or `student_arch` / `student_width`),
            warmed up with SimCLR on the clean images (`student: warmup`, the paper's best); `random`: no warm-up
            (MIMIC's student); `received`: the received weights (self-distillation)
  distill   each step, on two augmented views of a clean batch: ssl_weight x the student's NT-Xent (T 0.5, MIMIC's
            conloss) + loss_weight x the distillation term between student and (frozen, eval-mode) teacher on view 1
            + clone_weight x MIMIC's feature clone, -mean cos(student embedding, teacher embedding); Adam lr 1e-3,
            weight decay 1e-6, batch 128 (MIMIC)
  swap      the student replaces the received encoder; the probe is trained on it as usual

Distillation terms (`loss`). The paper's six could not be read (only its abstract was available): these six are the
ones of the zoo MIMIC draws from, each at that zoo's weight, all computed in fp32.
  attention  AT (Zagoruyko & Komodakis 2017): sum over `stages` of MSE between L2-normalised attention maps,
             1000 per stage (MIMIC's opt1-4 on ResNet layer1-4; its mutual-information re-weighting is dropped)
  hint       FitNets (Romero et al. 2015): MSE between the stage outputs, mean over `stages`, 0.1 (the zoo)
  sp         similarity preserving (Tung & Mori 2019): MSE between row-normalised batch Gram matrices of the stage
             outputs, mean over `stages`, 3000 (the zoo)
  rkd        relational KD (Park et al. 2019) on the embeddings: 25 x distance + 50 x angle (smooth L1), weight 1
  pkt        probabilistic KT (Passalis & Tefas 2018) on the embeddings: KL between cosine-kernel distributions, 10000
  clone      MIMIC's feature clone alone (clone_weight is then not added a second time), 1

Transfer learning (BASELINES.md 2.16, ours): Threat-1 only -- the poisoned D of Threat-2 is untouched. Schedules are
optimiser steps (the clean share is much smaller than MIMIC's 4 % of CIFAR-10, 2 000 images at 15 steps an epoch):
teacher 300 and warm-up 750 (E_t = 20 and E_w = 50 epochs at MIMIC's 15 steps an epoch: our E_t, E_w), distillation
3 000 (200 epochs, BASELINES' CPU preset, of MIMIC's 1 000); `steps: 0` is no distillation at all (the received
encoder as is: the "before" column of the distill_synthetic table). No selection rule (MIMIC keeps the last epoch), so
nothing is held out. The distilled student is cached, keyed on the received weights, the clean images, every setting
and the seed.
"""

from __future__ import annotations

import hashlib
import logging
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from securetl.cache import config_hash
from securetl.encoders.obtain import digest
from securetl.encoders.resnet import Encoder, build_encoder
from securetl.interfaces import Defense, Knowledge, LabeledSet, Model, RunContext
from securetl.numerics import take
from securetl.probe import Probe, trainable_copy
from securetl.progress import bar_disabled
from securetl.ssl.augment import SimCLRAugment
from securetl.ssl.losses import nt_xent
from securetl.ssl.methods import SimCLR
from securetl.ssl.trainer import pretrain
from securetl.validate import ConfigError

from ._attention import attention_loss
from ._features import require_clean

log = logging.getLogger(__name__)
# what the clean-share refusal adds for the encoder defenses, which use the reserve's images without labels
UNLABELLED = ": its clean images (the labels are not used)"

LOSSES = ("attention", "hint", "sp", "rkd", "pkt", "clone")
STAGE_LOSSES = ("attention", "hint", "sp")  # compare stage outputs; the others compare embeddings
READ_EVERY = 25  # distillation steps between host reads of the loss
DEFAULT_WEIGHT = {"attention": 1000.0, "hint": 0.1, "sp": 3000.0, "rkd": 1.0, "pkt": 10000.0, "clone": 1.0}


# --------------------------------------------------------------------------- the distillation terms
def hint_loss(fs: Tensor, ft: Tensor) -> Tensor:
    """FitNets' hint: MSE between two feature maps of one shape."""
    return F.mse_loss(fs.float(), ft.float())


def sp_loss(fs: Tensor, ft: Tensor) -> Tensor:
    """Similarity preserving: MSE between the row-normalised (N x N) Gram matrices of the flattened maps, so the
    widths may differ."""
    gs, gt = (F.normalize(f.float().flatten(1) @ f.float().flatten(1).T, dim=1) for f in (fs, ft))
    return F.mse_loss(gs, gt)


def _pairwise_distance(e: Tensor, eps: float = 1e-12) -> Tensor:
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp_min(eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))  # a point is at 0 from itself


def rkd_loss(es: Tensor, et: Tensor, w_dist: float = 25.0, w_angle: float = 50.0) -> Tensor:
    """Relational KD: smooth-L1 between the pairwise distances (each set scaled by its mean non-zero distance)
    and between the angles of every triplet (cosines of normalised difference vectors)."""
    es, et = es.float(), et.float()
    n = len(es)
    ds, dt = _pairwise_distance(es), _pairwise_distance(et)
    # every off-diagonal distance is > 0 (clamped): their mean without a data-dependent (host-syncing) selection
    ds = ds / (ds.sum() / max(1, n * (n - 1))).clamp_min(1e-12)
    dt = dt / (dt.sum() / max(1, n * (n - 1))).clamp_min(1e-12)
    us = F.normalize(es[None, :, :] - es[:, None, :], dim=2)
    ut = F.normalize(et[None, :, :] - et[:, None, :], dim=2)
    angle_s, angle_t = torch.bmm(us, us.transpose(1, 2)), torch.bmm(ut, ut.transpose(1, 2))
    return w_dist * F.smooth_l1_loss(ds, dt) + w_angle * F.smooth_l1_loss(angle_s, angle_t)


def pkt_loss(es: Tensor, et: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic KT: each sample's cosine similarities to the batch, shifted to [0, 1] and normalised into a
    distribution; the mean of t log(t / s) over the batch (the zoo's form)."""

    def dist(e: Tensor) -> Tensor:
        z = F.normalize(e.float(), dim=1)
        k = (z @ z.T + 1.0) / 2.0
        return k / k.sum(1, keepdim=True)

    ps, pt = dist(es), dist(et)
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


def clone_loss(es: Tensor, et: Tensor) -> Tensor:
    """MIMIC's feature clone: minus the mean cosine between the student's and the teacher's embeddings."""
    return -(F.normalize(es.float(), dim=1) * F.normalize(et.float(), dim=1)).sum(1).mean()


def distillation_term(
    loss: str, hs: list[Tensor], ht: list[Tensor], es: Tensor, et: Tensor, p: float = 2.0
) -> Tensor:
    """The unweighted term `loss` between the student's and the teacher's selected stage outputs (hs, ht) and
    embeddings (es, et): attention summed over the stages (MIMIC), hint and sp averaged (the zoo)."""
    if loss == "attention":
        return sum((attention_loss(s, t, p) for s, t in zip(hs, ht)), es.new_zeros((), dtype=torch.float32))
    if loss in ("hint", "sp"):
        fn = hint_loss if loss == "hint" else sp_loss
        return sum(fn(s, t) for s, t in zip(hs, ht)) / max(1, len(hs))
    return {"rkd": rkd_loss, "pkt": pkt_loss, "clone": clone_loss}[loss](es, et)


@torch.no_grad()
def attention_distance(
    student: Encoder, teacher: Encoder, images: Tensor, ctx: RunContext, stages: list[int], batch: int = 256
) -> float:
    """Sum over `stages` of AT(student, teacher) on `images` (both in eval mode), averaged over batches: how far
    the student's attention maps are from the teacher's (the quantity attention distillation minimises)."""
    num = ctx.num
    modes = [(m, m.training) for m in (student, teacher)]
    for m, _ in modes:
        m.eval()
    total, count = 0.0, 0
    with num.autocast():
        for i in range(0, len(images), batch):
            xb = num.batch(images[i : i + batch])
            hs, ht = student.forward_stages(xb), teacher.forward_stages(xb)
            d = sum(float(attention_loss(hs[s], ht[s])) for s in stages)
            total, count = total + d * len(xb), count + len(xb)
    for m, mode in modes:
        m.train(mode)
    return total / max(1, count)


# --------------------------------------------------------------------------- encoders: identity and fresh copies
def state_digest(module: nn.Module) -> str:
    """Content hash of a module's architecture (its repr), weights and buffers: a cache key part that follows the
    encoder itself, not the config that made it."""
    h = hashlib.sha256(repr(module).encode())  # the architecture, then every tensor
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def reinitialised(encoder: nn.Module, seed: int) -> nn.Module:
    """A trainable copy of `encoder` with every layer re-drawn from its default initialisation (BatchNorm
    statistics reset) under `seed`: the architecture without its pre-training."""
    fresh = trainable_copy(encoder).cpu()  # drawn on the host: the same weights whatever the device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in fresh.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return fresh


def frozen(module: nn.Module, ctx: RunContext) -> nn.Module:
    """`module` on the run's device, in eval mode, without gradients: how the pipeline hands encoders out."""
    for q in module.parameters():
        q.requires_grad_(False)
    return ctx.num.module(module.eval())


def steps_to_epochs(steps: int, n: int, batch_size: int) -> int:
    """Epochs of the SSL trainer (which drops a last partial batch) that make at least `steps` updates."""
    return math.ceil(steps / max(1, n // batch_size)) if steps > 0 else 0


# --------------------------------------------------------------------------- the defense
@dataclass
class _Settings:
    """Everything the distilled encoder depends on besides the received weights, the images and the seed."""

    loss: str
    loss_weight: float
    clone_weight: float
    ssl_weight: float
    stages: list[int]
    p: float
    teacher: str
    student: str
    student_arch: str | None
    student_width: int | None
    teacher_steps: int
    warmup_steps: int
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    temperature: float
    augment: dict[str, Any] = field(default_factory=dict)


class Distillation(Defense):
    name = "distill"
    knowledge = Knowledge(clean_fraction=0.05, needs_clean=True, trains_encoder=True)

    def __init__(
        self,
        loss: Literal["attention", "hint", "sp", "rkd", "pkt", "clone"] = "attention",
        loss_weight: float | None = None,
        clone_weight: float = 1.0,
        ssl_weight: float = 1.0,
        stages: tuple[int, ...] = (1, 2, 3, 4),
        p: float = 2.0,
        teacher: Literal["finetuned", "received"] = "finetuned",
        student: Literal["warmup", "random", "received"] = "warmup",
        student_arch: str | None = None,
        student_width: int | None = None,
        teacher_steps: int = 300,
        warmup_steps: int = 750,
        steps: int = 3000,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        temperature: float = 0.5,
        augment: dict[str, Any] | None = None,
        clean_fraction: float | None = None,
    ) -> None:
        super().__init__(clean_fraction)
        if loss not in LOSSES:
            raise ValueError(f"defense.loss={loss!r}; choose one of {', '.join(LOSSES)}")
        if teacher not in ("finetuned", "received"):
            raise ValueError(f"defense.teacher={teacher!r}; choose finetuned or received")
        if student not in ("warmup", "random", "received"):
            raise ValueError(f"defense.student={student!r}; choose warmup, random or received")
        if student == "received" and (student_arch is not None or student_width is not None):
            raise ValueError(
                "defense.student=received starts from the received weights: leave student_arch/width null"
            )
        if min(teacher_steps, warmup_steps, steps) < 0 or batch_size < 2:
            raise ValueError("defense: teacher_steps, warmup_steps and steps must be >= 0, batch_size >= 2")
        if not stages and loss in STAGE_LOSSES:
            raise ValueError(f"defense.loss={loss} compares stage outputs: defense.stages must name some")
        weight = DEFAULT_WEIGHT[loss] if loss_weight is None else float(loss_weight)
        self.s = _Settings(
            loss, weight, float(clone_weight), float(ssl_weight), [int(i) for i in stages], float(p), teacher, student,
            student_arch, None if student_width is None else int(student_width), int(teacher_steps),
            int(warmup_steps), int(steps), int(batch_size), float(lr), float(weight_decay), float(temperature),
            dict(augment or {}),
        )  # fmt: skip
        SimCLRAugment(**self.s.augment)  # a bad augment key fails here, not after the teacher is trained

    # ------------------------------------------------------------------ the defense
    def train(self, encoder: nn.Module, train: LabeledSet, probe: Probe, ctx: RunContext) -> Model:
        """The student in place of the encoder, then the probe on D as usual (nothing is filtered)."""
        return probe.fit(self.repair(encoder, train, probe, ctx), train, ctx)

    def repair(self, encoder: nn.Module, train: LabeledSet, probe: Any, ctx: RunContext) -> nn.Module:
        clean = require_clean(ctx, "Distillation", UNLABELLED)
        if self.s.steps == 0:
            log.info("distill: steps=0, the received encoder is used as is")
            self.diagnostics["distill/distilled"] = False
            return encoder
        cache = ctx.cache
        key = config_hash(
            "distilled", state_digest(encoder), digest(clean.x), asdict(self.s), ctx.seed, ctx.num.record()
        )
        with cache.building("distilled", key) if cache else nullcontext():
            state = cache.load_state("distilled", key) if cache else None
            if state is not None:
                student = self.student_init(encoder, ctx)
                student.load_state_dict(state)
                self.diagnostics.update((cache.load_meta("distilled", key) or {}).get("diagnostics", {}))
            else:
                student = self.distill(encoder, clean.x, ctx)
                if cache:
                    cache.save_state(
                        "distilled",
                        key,
                        student.state_dict(),
                        {"settings": asdict(self.s), "diagnostics": self.diagnostics},
                    )
        self.diagnostics["distill/distilled"] = True
        return frozen(student, ctx)

    # ------------------------------------------------------------------ the recipe
    def distill(self, encoder: nn.Module, images: Tensor, ctx: RunContext) -> nn.Module:
        """Teacher, student, distillation: the student encoder (trainable, on the device)."""
        s = self.s
        teacher = self.make_teacher(encoder, images, ctx)
        student = self.student_init(encoder, ctx)
        maps = self._check(student, teacher, images[:2], ctx)  # stages whose attention maps compare
        if s.student == "warmup" and s.warmup_steps:
            student, _ = self._ssl(student, images, ctx, s.warmup_steps, salt=2)
        before = attention_distance(student, teacher, images, ctx, maps) if maps else float("nan")
        with torch.random.fork_rng(devices=[]):  # the projection head's draw, whatever ran before
            torch.manual_seed(ctx.seed * 10 + 8)
            method = ctx.num.module(SimCLR(student, temperature=s.temperature))
        history = self.distillation_loop(method, teacher, images, ctx, ctx.generator(salt=22603), s.steps)
        after = attention_distance(student, teacher, images, ctx, maps) if maps else float("nan")
        self.diagnostics.update(
            {
                "distill/n_clean": len(images),
                "distill/loss": s.loss,
                "distill/teacher": s.teacher,
                "distill/student": s.student,
                "distill/at_distance_before": before,
                "distill/at_distance_after": after,
                "distill/loss_first": history[0] if history else float("nan"),
                "distill/loss_last": history[-1] if history else float("nan"),
            }
        )
        log.info("distill: attention distance to the teacher %.4g -> %.4g", before, after)
        return student.eval()

    def make_teacher(self, encoder: nn.Module, images: Tensor, ctx: RunContext) -> Encoder:
        """The received encoder fine-tuned with SimCLR on the clean images (or as is), frozen, in eval mode."""
        teacher = trainable_copy(encoder)
        if self.s.teacher == "finetuned" and self.s.teacher_steps:
            teacher, _ = self._ssl(teacher, images, ctx, self.s.teacher_steps, salt=1)
        return frozen(teacher, ctx)

    def student_init(self, encoder: nn.Module, ctx: RunContext) -> Encoder:
        """The student before training: the received weights, or a fresh draw of the received architecture (or of
        `student_arch` at `student_width`, normalising its input as the received encoder does)."""
        s = self.s
        if s.student == "received":
            return ctx.num.module(trainable_copy(encoder))
        if s.student_arch is None and s.student_width is None:
            return ctx.num.module(reinitialised(encoder, ctx.seed * 10 + 7))
        width = s.student_width or getattr(encoder, "feat_dim", 512) // 8
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed * 10 + 7)
            student = build_encoder(s.student_arch or "cifar_resnet18", width)
        if hasattr(encoder, "mean"):  # the received encoder's input normalisation
            student.mean.copy_(encoder.mean.cpu())
            student.std.copy_(encoder.std.cpu())
        return ctx.num.module(student)

    def _ssl(self, encoder: nn.Module, images: Tensor, ctx: RunContext, steps: int, salt: int):
        """SimCLR on the clean images for `steps` updates: the suite's own SSL trainer (its fresh projection head
        is dropped afterwards, as the received encoder came without one)."""
        s = self.s
        return pretrain(
            encoder, images, ctx, ssl="simclr", epochs=steps_to_epochs(steps, len(images), s.batch_size),
            batch_size=s.batch_size, lr=s.lr, weight_decay=s.weight_decay, seed=ctx.seed * 1000 + salt,
            augment=s.augment, method_kwargs={"temperature": s.temperature},
        )  # fmt: skip

    def step_loss(self, method: SimCLR, teacher: Encoder, v1: Tensor, v2: Tensor) -> Tensor:
        """One distillation step's loss on two views of a batch (the teacher sees view 1, as in MIMIC)."""
        s = self.s
        outs = method.encoder.forward_stages(v1)
        e1, e2 = Encoder.pool(outs[-1]), method.encoder(v2)
        with torch.no_grad():
            touts = teacher.forward_stages(v1)
            et = Encoder.pool(touts[-1])
        pick = s.stages if s.loss in STAGE_LOSSES else []
        hs, ht = [outs[i] for i in pick], [touts[i] for i in pick]
        loss = s.loss_weight * distillation_term(s.loss, hs, ht, e1, et, s.p)
        if s.ssl_weight:
            loss = loss + s.ssl_weight * nt_xent(
                method.head(e1).float(), method.head(e2).float(), s.temperature
            )
        if s.clone_weight and s.loss != "clone":
            loss = loss + s.clone_weight * clone_loss(e1, et)
        return loss

    def distillation_loop(
        self,
        method: SimCLR,
        teacher: Encoder,
        images: Tensor,
        ctx: RunContext,
        g: torch.Generator,
        steps: int,
    ) -> list[float]:
        """`steps` Adam updates of the student (and its projection head) on batches of the clean images (a last
        partial batch is dropped, as the SSL trainer does); returns the mean loss of every stretch of whole epochs
        of at least READ_EVERY steps (the loss is read on the host that rarely, not every step)."""
        s, num = self.s, ctx.num
        aug = SimCLRAugment(**s.augment)
        opt = torch.optim.Adam(method.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        src, n = num.resident(images), len(images)
        per_epoch = max(1, n // s.batch_size)
        g_aug, size = num.generator(g), tuple(images.shape[-2:])
        method.train()
        history: list[float] = []
        total, count, done = torch.zeros((), dtype=torch.float64, device=ctx.device), 0, 0
        bar = tqdm(total=steps, desc="distill", disable=bar_disabled(ctx.progress), leave=False)
        while done < steps:
            perm = num.put(torch.randperm(n, generator=g))
            for b in range(min(per_epoch, steps - done)):
                xb = num.batch(
                    take(src, perm[b * s.batch_size : (b + 1) * s.batch_size])
                )  # src may be pinned host memory
                v1, v2 = aug(xb, g_aug, size), aug(xb, g_aug, size)
                with num.autocast():
                    loss = self.step_loss(method, teacher, v1, v2)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach()
                count, done = count + 1, done + 1
            if count >= READ_EVERY or done >= steps:
                bar.update(count)
                history.append(float(total) / count)
                if not math.isfinite(history[-1]):
                    raise FloatingPointError(f"distillation loss became {history[-1]}; lower defense.lr")
                total.zero_()
                count = 0
        bar.close()
        method.eval()
        return history

    # ------------------------------------------------------------------ checks
    @torch.no_grad()
    def _check(self, student: nn.Module, teacher: nn.Module, x: Tensor, ctx: RunContext) -> list[int]:
        """Refuse, before any training, what the chosen loss cannot compare (one line each); returns the stages
        of `stages` whose attention maps can be compared (for the diagnostics)."""
        s = self.s
        if not hasattr(student, "forward_stages") or not hasattr(teacher, "forward_stages"):
            raise ConfigError("defense=distill needs encoders with stages (securetl.encoders.resnet.Encoder)")
        xb = ctx.num.batch(x)
        hs, ht = student.eval().forward_stages(xb), teacher.forward_stages(xb)
        student.train()
        n_stages = min(len(hs), len(ht))
        if s.loss in STAGE_LOSSES:
            if any(i >= n_stages for i in s.stages):
                raise ConfigError(f"defense.stages={s.stages}: the encoders have stages 0-{n_stages - 1}")
            flat = [i for i in s.stages if hs[i].dim() != 4 or ht[i].dim() != 4]
            if flat:
                raise ConfigError(
                    f"defense.loss={s.loss} compares (N, C, H, W) stage outputs; stages {flat} are flat"
                )
            if s.loss == "hint" and any(hs[i].shape != ht[i].shape for i in s.stages):
                raise ConfigError(
                    "defense.loss=hint compares stage outputs of one shape: the student needs the teacher's width"
                )
            if s.loss == "attention" and any(hs[i].shape[-2:] != ht[i].shape[-2:] for i in s.stages):
                raise ConfigError(
                    "defense.loss=attention: the student's and the teacher's maps differ in size at some stage"
                )
        dims = Encoder.pool(hs[-1]).shape[1], Encoder.pool(ht[-1]).shape[1]
        if (s.loss == "clone" or s.clone_weight) and dims[0] != dims[1]:
            raise ConfigError(
                f"the feature clone compares embeddings: the student's have {dims[0]} dimensions, the teacher's "
                f"{dims[1]} (set defense.clone_weight=0 and a loss other than clone, or the same width)"
            )
        return [
            i for i in s.stages
            if i < n_stages and hs[i].dim() == ht[i].dim() == 4 and hs[i].shape[-2:] == ht[i].shape[-2:]
        ]  # fmt: skip
