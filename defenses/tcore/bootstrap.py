"""Phase 4 — bootstrapping learning: grow a clean pool from the clean subset and train on it only.

  min_{phi, psi}  E_{(x, y) in D_clean}  l(f(phi) o g(x; psi u chi), y)      chi frozen, psi re-initialised

loss-guided expansion  move the lowest-loss samples of D \\ D_clean into the pool;
meta-guided expansion  Loss1 = current model's loss on D \\ D_clean, Loss2 = loss of a temporary copy after a
                       short training on all of D; poison is learned fast, so its loss drops most: move the
                       samples with the SMALLEST reduction Loss1 - Loss2 into the pool.
                       meta_score="rank_sum" (ours): rank by reduction plus rank by Loss1. By the second
                       meta step the samples left are mostly the high-loss ones, and a poison that the short
                       training does not pick up (low-rate, cover-protected: Adap-Blend, TaCT) keeps a high
                       loss that barely moves, i.e. the smallest reduction: the paper's rule alone moved it in
                       first. It still has the highest Loss1 under the clean-pool model, which the sum sees.
stop at |D_clean| = rho |D|, then train the final model on D_clean.

quota  "global" (the paper's text): the pool takes the best-scored samples of D \\ D_clean whatever their
       class, up to rho |D|. "balanced" (ours): each class grows to rho * min(its size, the median class size),
       picking its own best-scored samples. A dirty-label attack inflates its target class (10 % poison into
       one of 10 classes doubles it), and when the encoder carries the same backdoor (Threat-3) the poisons'
       loss is low under both scores: the global rule then filled the last step with them (132 of 380 added
       samples on Threat-3, seed 2). Capping each class at the median size keeps an inflated class from
       growing past what a clean class would.
       "topup" (ours): the balanced quota at `class_rho` over every step but the last; the last (meta-guided) step
       then ranks what is left across all classes and fills the pool to rho * the sum of min(class size, median
       class size), no class beyond min(its size, the median). A balanced quota at the paper's rho = 0.9 forces
       a clean-label attack in: SIG's 80 poisons are 20 % of its target class, so a 90 % quota of that class took
       40 of them (ASR 97 %); at 0.8 it took none, but the pool then holds only the easiest 78 % of the clean
       samples and the model loses the hard ones (Blended, seed 0: ACC 83.9 at 0.8, 90.2 at 0.9, 90.9 with a
       random 78 % of the clean samples). The global last step lets a class leave out more than a tenth of itself
       when its remaining samples rank worst, as a fast-learned poison does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from securetl import guard
from securetl.numerics import Numerics, take
from securetl.probe import per_sample_loss as _per_sample_loss

from .._splits import capped_split, class_aware_split, lowest, meta_scores
from .channels import MaskedBN, Tail

QUOTAS = ("global", "balanced", "topup")  # pool_quota's choices (module docstring)


@dataclass
class BootstrapResult:
    pool_idx: Tensor
    steps: list[dict] = field(default_factory=list)  # {"kind", "pool": Tensor}


class Trainer:
    """Trains a Tail on memoised activations; gradient masks keep trusted channels (chi) frozen."""

    def __init__(
        self,
        grad_masks: dict[str, Tensor] | None,
        lr: float,
        batch_size: int,
        weight_decay: float = 5e-4,
        chi_lr_scale: float = 0.0,
        num: Numerics | None = None,
        phase: str = "tcore/bootstrap",
    ):
        """chi_lr_scale: how far trusted channels move per step relative to psi (0 = frozen, as in the paper).
        num: device and precision (default: the policy of the activations' device). phase: the name divergence
        triggers are recorded under (securetl.guard; checked once an epoch)."""
        self.num, self.phase = num, phase
        self.grad_masks, self.lr, self.batch_size, self.weight_decay = (
            grad_masks,
            lr,
            batch_size,
            weight_decay,
        )
        self.chi_lr_scale = chi_lr_scale

    def train(
        self,
        tail: Tail,
        acts: Tensor,
        y: Tensor,
        epochs: int,
        g: torch.Generator,
        train_stages: bool = True,
        cosine: bool = False,
    ) -> None:
        """`cosine`: the learning rate decays to 0 over the epochs (the final training settles the weights)."""
        num = self.num or Numerics.resolve(acts.device)
        y = num.put(y)
        frozen_stats = self._trusted_stats(tail)
        params = list(tail.head.parameters())
        if train_stages:
            params += [p for n, p in tail.stages.named_parameters() if not n.endswith(".mask")]
        opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs)) if cosine else None
        stage_params = dict(tail.stages.named_parameters())
        n = len(y)
        watch = guard.Watch(self.phase, tail, opt)
        tail.train()
        for epoch in range(epochs):
            watch.begin()
            perm = num.put(torch.randperm(n, generator=g))
            for s in range(0, n, self.batch_size):
                b = perm[s : s + self.batch_size]
                if len(b) < 2:
                    continue
                with num.autocast():
                    loss = F.cross_entropy(tail(acts[b]), y[b])
                watch.observe(loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                # chi_lr_scale >= 1: trusted channels move like the rest, nothing to freeze or damp
                masked = train_stages and self.grad_masks is not None and self.chi_lr_scale < 1
                if masked and self.chi_lr_scale == 0:
                    for name, mask in self.grad_masks.items():
                        p = stage_params.get(name)
                        if p is not None and p.grad is not None:
                            p.grad.mul_(mask)
                if masked and self.chi_lr_scale > 0:
                    before = {n: p.detach().clone() for n, p in stage_params.items() if n in self.grad_masks}
                opt.step()
                if masked and self.chi_lr_scale == 0:
                    self._restore(tail, frozen_stats)
                elif masked:
                    self._damp(stage_params, before)
            if watch.end(epoch + 1) == guard.STOP:
                break
            if sched is not None:
                sched.step()
        tail.eval()

    def _trusted_stats(self, tail: Tail) -> dict[str, tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
        """Snapshot of trusted channels' BN parameters/statistics. Adam's weight decay and running-stat
        updates would otherwise move chi even with zero gradients."""
        if self.grad_masks is None or self.chi_lr_scale > 0:
            return {}
        out = {}
        for name, bn in tail.bns():
            trainable = self.grad_masks.get(f"{name}.weight")
            keep = (
                (trainable == 0)
                if trainable is not None
                else torch.ones(bn.num_features, dtype=torch.bool, device=bn.weight.device)
            )
            out[name] = (
                keep,
                bn.weight.detach().clone(),
                bn.bias.detach().clone(),
                bn.running_mean.clone(),
                bn.running_var.clone(),
            )
        self._conv_snap = {
            n: p.detach().clone()
            for n, p in tail.stages.named_parameters()
            if n in self.grad_masks and not n.endswith(".mask")
        }
        return out

    @torch.no_grad()
    def _damp(self, params: dict[str, Tensor], before: dict[str, Tensor]) -> None:
        """Trusted entries move chi_lr_scale of the step psi entries take (Adam ignores gradient scale)."""
        for n, old in before.items():
            keep = 1.0 - self.grad_masks[n]  # 1 where trusted
            p = params[n]
            p.sub_((p - old) * keep * (1.0 - self.chi_lr_scale))

    @torch.no_grad()
    def _restore(self, tail: Tail, snap) -> None:
        for name, bn in tail.bns():
            keep, w, b, rm, rv = snap[name]
            bn.weight[keep] = w[keep]
            bn.bias[keep] = b[keep]
            bn.running_mean[keep] = rm[keep]
            bn.running_var[keep] = rv[keep]
        params = dict(tail.stages.named_parameters())
        for n, old in self._conv_snap.items():
            frozen = self.grad_masks[n] == 0
            params[n][frozen] = old[frozen]


def per_sample_loss(
    model: nn.Module, acts: Tensor, y: Tensor, batch: int = 1024, num: Numerics | None = None
) -> Tensor:
    """Cross-entropy of every sample, on the host (selection happens there): securetl.probe.per_sample_loss on
    memoised activations."""
    return _per_sample_loss(model, (acts, y), num or Numerics.resolve(acts.device), batch=batch)


def balanced_quotas(y: Tensor, rho: float) -> Tensor:
    """Per-class pool sizes for quota="balanced": rho * min(class size, the median class size)."""
    return torch.round(rho * class_caps(y).double()).long()


def class_caps(y: Tensor) -> Tensor:
    """min(class size, the median class size): what a class of a clean, balanced dataset would hold."""
    counts = torch.bincount(y)
    return torch.minimum(counts, counts[counts > 0].median())


def _pick(
    score: Tensor, rest: Tensor, y: Tensor, pool: Tensor, add: int, quotas: Tensor | None, left: int
) -> Tensor:
    """Indices (into D) to move into the pool: lowest score first, globally or per class within its quota."""
    if quotas is None:
        return rest[lowest(score, add)]
    takes = torch.zeros(len(quotas), dtype=torch.long)
    for c in range(len(quotas)):
        need = int(quotas[c]) - int((pool & (y == c)).sum())
        if need > 0:
            takes[c] = (need + left - 1) // left  # spread what this class still needs over the steps left
    return rest[class_aware_split(score, y[rest], takes)]


def bootstrap(
    tail: Tail,
    acts: Tensor,
    y: Tensor,
    start_idx: Tensor,
    trainer: Trainer,
    g: torch.Generator,
    rho: float = 0.8,
    loss_guided_steps: int = 2,
    meta_guided_steps: int = 2,
    epochs_per_step: int = 5,
    meta_epochs: int = 1,
    final_epochs: int = 10,
    train_stages: bool = True,
    quota: str = "global",
    final_cosine: bool = False,
    meta_score: str = "reduction",
    class_rho: float = 0.8,
    exclude: Tensor | None = None,
    exclude_in_topup_only: bool = False,
) -> BootstrapResult:
    """Grow the pool from `start_idx` to rho*N in loss-guided then meta-guided steps; train on it. The samples
    `exclude` indexes never join (a class short of them takes what it has); with `exclude_in_topup_only`, only
    the top-up step passes them over (the quota steps may take them)."""
    if quota not in QUOTAS:
        raise ValueError(f"bootstrap quota={quota!r}; choose one of {', '.join(QUOTAS)}")
    if meta_score not in ("reduction", "rank_sum"):
        raise ValueError(f"bootstrap meta_score={meta_score!r}; choose reduction or rank_sum")
    n = len(y)
    kinds = ["loss"] * loss_guided_steps + ["meta"] * meta_guided_steps
    n_quota_steps = len(kinds) - 1 if quota == "topup" else len(kinds)  # the top-up is the last step
    quotas = None if quota == "global" else balanced_quotas(y, class_rho if quota == "topup" else rho)
    if quotas is None:
        target = int(round(rho * n))
    else:  # a class whose start already exceeds its quota keeps what it has (the pool never shrinks)
        start_counts = torch.bincount(y[start_idx], minlength=len(quotas))
        target = int(torch.maximum(quotas, start_counts).sum())
    caps = class_caps(y) if quota == "topup" else None
    final_target = max(target, int(round(rho * int(caps.sum())))) if caps is not None else target
    pool = torch.zeros(n, dtype=torch.bool)
    pool[start_idx] = True
    barred = torch.zeros(n, dtype=torch.bool)
    if exclude is not None:
        barred[exclude] = True
    steps: list[dict] = []
    for i, kind in enumerate(kinds):
        have = int(pool.sum())
        topup = i >= n_quota_steps
        goal = final_target if topup else target
        if have >= goal:
            if topup or caps is None:
                break
            continue  # the quota steps are done early: on to the top-up
        passed_over = barred if topup or not exclude_in_topup_only else torch.zeros_like(barred)
        rest = torch.nonzero(~pool & ~passed_over).squeeze(1)
        if len(rest) == 0:
            break  # every sample left is barred: the pool stays short of its goal
        # train on the pool before each expansion (its scores need the model): after the last expansion the
        # final training follows at once, so the last pool is trained once, not 5 + final_epochs epochs.
        # The pools, and the random stream until the final training, are what they were
        trainer.train(tail, take(acts, pool), y[pool], epochs_per_step, g, train_stages)
        left = 1 if topup else n_quota_steps - i
        add = (goal - have + left - 1) // left  # spread what is left evenly
        loss1 = per_sample_loss(tail, take(acts, rest), y[rest], num=trainer.num)
        if kind == "loss":
            score = loss1  # lowest loss first
        else:
            temp = copy.deepcopy(tail)
            trainer.train(temp, acts, y, meta_epochs, g, train_stages)
            loss2 = per_sample_loss(temp, take(acts, rest), y[rest], num=trainer.num)
            score = meta_scores(loss1, loss2, meta_score)
        if topup:
            room = (caps - torch.bincount(y[pool], minlength=len(caps))).clamp_min(0)
            pool[rest[capped_split(score, y[rest], room, add)]] = True
        else:
            pool[_pick(score, rest, y, pool, add, quotas, left)] = True
        steps.append({"kind": kind, "pool": torch.nonzero(pool).squeeze(1)})
    trainer.train(tail, take(acts, pool), y[pool], final_epochs, g, train_stages, cosine=final_cosine)
    return BootstrapResult(torch.nonzero(pool).squeeze(1), steps)


__all__ = ["BootstrapResult", "Trainer", "bootstrap", "meta_scores", "per_sample_loss", "MaskedBN"]
