"""Channel masks and pruning (BASELINES.md section 3), one implementation for ANP, RNP, Fine-Pruning and T-Core's
channel filter.

`MaskedBN`       a BatchNorm2d whose affine output is scaled per channel by a mask m in [0, 1] (RNP's masked BN, which
                 T-Core's channel filter follows), optionally with ANP's bounded multiplicative noise on weight and bias
`mask_bns`       swap every BatchNorm2d of a module for a MaskedBN, in place; `unmask` folds the masks back
`prune`          zero exactly the channels (slices of parameters) whose score is <= a threshold, or the `number`
                 lowest: ANP and RNP on BN weights, Fine-Pruning on the columns of the head's input
`within`         the holdout rule a pruning sweep is judged by (accuracy on the held-out 20 % of the clean share,
                 never test data: BASELINES.md section 0)
`unlearn`        gradient ascent on the CE until accuracy falls to a threshold: RNP (all parameters, checked per
                 epoch) and T-Core (normalisation parameters only, checked per step)
`recover_masks`  learn the masks alone on clean data (RNP's filter recovering; T-Core's, with an L1 pull)
`MaskPruning`    the shape ANP and RNP share: masks on M0's top stages learned on the clean share, a sweep over the
                 pruning threshold (or number) judged on the holdout, the chosen channels pruned in M0
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from securetl.interfaces import Defense, Knowledge, LabeledSet, Model, RunContext
from securetl.knowledge import split_holdout
from securetl.numerics import Numerics
from securetl.probe import _Tail, memo_forward

from ._features import reference_model

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- masked batch norm
class MaskedBN(nn.BatchNorm2d):
    """BatchNorm2d whose affine output is scaled per channel by `mask` (fixed at 1 unless trained).

    `mask_bias`: the mask scales the bias too (T-Core) or the weight only (ANP's and RNP's codes: bias x 1).
    With noise (ANP), `perturbed` adds bounded noise to the coefficients: weight x (m + delta), bias x (1 + xi)."""

    mask_bias: bool = True
    perturbed: bool = False

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, mask_bias: bool = True, noise: bool = False) -> MaskedBN:
        dev = bn.weight.device  # built where the BN it replaces lives
        m = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=True, track_running_stats=True)
        m.to(dev).load_state_dict(bn.state_dict())
        m.mask = nn.Parameter(torch.ones(bn.num_features, device=dev), requires_grad=False)
        m.mask_bias = mask_bias
        if noise:
            m.noise_weight = nn.Parameter(torch.zeros(bn.num_features, device=dev), requires_grad=False)
            m.noise_bias = nn.Parameter(torch.zeros(bn.num_features, device=dev), requires_grad=False)
        return m

    @property
    def noisy(self) -> bool:
        return hasattr(self, "noise_weight")

    def coefficients(self) -> tuple[Tensor, Tensor | None]:
        """What multiplies the weight and the bias (None: the bias as it is)."""
        w, b = self.mask, (self.mask if self.mask_bias else None)
        if self.perturbed:
            w = w + self.noise_weight
            b = (1.0 if b is None else b) + self.noise_bias
        return w, b

    def forward(self, x: Tensor) -> Tensor:
        cw, cb = self.coefficients()
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight * cw,
            self.bias if cb is None else self.bias * cb,
            self.training,
            self.momentum,
            self.eps,
        )


def mask_bns(module: nn.Module, mask_bias: bool = True, noise: bool = False) -> nn.Module:
    """Every BatchNorm2d of `module` replaced by a MaskedBN (masks at 1), in place; returns `module`."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, MaskedBN):
            setattr(module, name, MaskedBN.from_bn(child, mask_bias, noise))
        else:
            mask_bns(child, mask_bias, noise)
    return module


def masked_bns(module: nn.Module) -> Iterator[tuple[str, MaskedBN]]:
    for name, m in module.named_modules():
        if isinstance(m, MaskedBN):
            yield name, m


def masks(module: nn.Module) -> dict[str, Tensor]:
    """A copy of every mask, by the name of its BN within `module`."""
    return {n: m.mask.detach().clone() for n, m in masked_bns(module)}


def unmask(module: nn.Module) -> nn.Module:
    """Turn MaskedBN layers back into plain BatchNorm2d with the mask folded into weight (and bias), in place."""
    for name, child in module.named_children():
        if isinstance(child, MaskedBN):
            bn = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum)
            bn.to(child.weight.device)
            with torch.no_grad():
                bn.weight.copy_(child.weight * child.mask)
                bn.bias.copy_(child.bias * child.mask if child.mask_bias else child.bias)
                bn.running_mean.copy_(child.running_mean)
                bn.running_var.copy_(child.running_var)
            bn.train(child.training)
            setattr(module, name, bn)
        else:
            unmask(child)
    return module


def bn_weights(module: nn.Module) -> dict[str, nn.Parameter]:
    """The weight (gamma) of every BN of `module` by name: what ANP and RNP prune. The names are those `masks`
    gives for a masked copy of the same module."""
    return {n: m.weight for n, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)}


# --------------------------------------------------------------------------- pruning
def select(
    scores: Mapping[str, Tensor], threshold: float | None = None, number: int | None = None
) -> dict[str, Tensor]:
    """Per layer, which channels are pruned (bool, host): score <= `threshold` (both codes' rule), or the `number`
    lowest scores over all layers together (ties in layer order). Exactly one of the two is given."""
    if (threshold is None) == (number is None):
        raise ValueError("select: give a threshold or a number, not both")
    names = list(scores)
    flat = torch.cat([scores[n].detach().float().flatten().cpu() for n in names]) if names else torch.empty(0)
    if threshold is not None:
        chosen = flat <= threshold
    else:
        chosen = torch.zeros(len(flat), dtype=torch.bool)
        chosen[torch.argsort(flat, stable=True)[: max(0, int(number))]] = True
    return dict(zip(names, torch.split(chosen, [scores[n].numel() for n in names])))


@torch.no_grad()
def prune(
    params: Mapping[str, Tensor],
    scores: Mapping[str, Tensor],
    *,
    threshold: float | None = None,
    number: int | None = None,
    dim: int = 0,
) -> dict[str, Tensor]:
    """Zero, in place, the slices along `dim` of `params[name]` that `select` picks from `scores[name]`; nothing
    else changes. Returns the selections (bool per layer, host)."""
    chosen = select(scores, threshold, number)
    for name, sel in chosen.items():
        if sel.any():
            p = params[name]
            p.index_fill_(dim, torch.nonzero(sel).squeeze(1).to(p.device), 0.0)
    return chosen


def within(acc: float, base: float, tolerance: float) -> bool:
    """The holdout rule: accuracy fell by less than `tolerance` x the unpruned accuracy (relative, as the codes'
    `acc_ratio`; a rise always passes)."""
    return acc >= base or base - acc < tolerance * base


def sweep(
    points: Sequence[Any],
    acc_of: Callable[[Any], float],
    base: float,
    tolerance: float,
    stop_at_failure: bool,
) -> tuple[Any | None, list[float]]:
    """The point with the most pruning (the last of `points`, in increasing order) whose holdout accuracy passes
    `within`, and every accuracy measured. `stop_at_failure`: stop at the first failing point (Fine-Pruning's
    rule: pruning stops there); else the whole sweep is measured and the last passing point wins. None: no point
    passed (prune nothing)."""
    chosen, accs = None, []
    for p in points:
        acc = acc_of(p)
        accs.append(acc)
        if within(acc, base, tolerance):
            chosen = p
        elif stop_at_failure:
            break
    return chosen, accs


# --------------------------------------------------------------------------- training pieces
@torch.no_grad()
def accuracy(
    module: nn.Module, inputs: Tensor, y: Tensor, batch: int = 1024, num: Numerics | None = None
) -> float:
    """Accuracy of `module` (eval mode) on memoised inputs; one host read."""
    num = num or Numerics.resolve(inputs.device)
    module.eval()
    y = num.put(y)
    with num.autocast():
        correct = sum(
            (module(num.put(inputs[i : i + batch])).argmax(1) == y[i : i + batch]).sum()
            for i in range(0, len(y), batch)
        )
    return int(correct) / max(1, len(y))


def unlearn(
    module: nn.Module,
    inputs: Tensor,
    y: Tensor,
    g: torch.Generator,
    params: Sequence[nn.Parameter],
    *,
    threshold: float = 0.2,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 128,
    max_steps: int = 500,
    check_every: int = 1,
    epochs: int | None = None,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    num: Numerics | None = None,
) -> dict[str, float]:
    """Gradient ascent on the CE of `module` over (inputs, y), SGD on `params` only, until accuracy falls to
    `threshold`. Two stopping schemes:

    per step (epochs=None; T-Core)   batches drawn with replacement, eval-mode BN; after every `check_every` steps
                                     the accuracy on a fixed sample of up to 512 inputs; stop once it is < threshold
                                     or after `max_steps`
    per epoch (epochs=E; RNP)        shuffled epochs in train mode (both RNP codes); the epoch's running training
                                     accuracy; stop once it is <= threshold or after E epochs; lr x gamma after
                                     each epoch in `milestones` (MultiStepLR)

    Every parameter's requires_grad is restored afterwards."""
    num = num or Numerics.resolve(inputs.device)
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    try:
        if epochs is None:
            return _unlearn_per_step(
                module, inputs, y, g, opt, threshold, batch_size, max_steps, check_every, num
            )
        return _unlearn_per_epoch(
            module, inputs, y, g, opt, threshold, batch_size, epochs, milestones, gamma, num
        )
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _unlearn_per_step(module, acts, y, g, opt, threshold, batch_size, max_steps, check_every, num) -> dict:
    n, steps = len(y), 0
    y = num.put(y)
    probe_idx = num.put(torch.randperm(n, generator=g)[:512])
    acc = accuracy(module, acts[probe_idx], y[probe_idx], num=num)
    module.eval()  # running statistics stay those of the model being analysed
    while acc >= threshold and steps < max_steps:
        b = num.put(torch.randint(0, n, (batch_size,), generator=g))
        with num.autocast():
            loss = -F.cross_entropy(module(acts[b]), y[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        if steps % check_every == 0:
            acc = accuracy(module, acts[probe_idx], y[probe_idx], num=num)
    return {"steps": steps, "acc": acc}


def _unlearn_per_epoch(
    module, inputs, y, g, opt, threshold, batch_size, epochs, milestones, gamma, num
) -> dict:
    n = len(y)
    src, ys = num.resident(inputs), num.put(y)
    module.train()
    acc, epoch, steps = float("nan"), 0, 0
    for epoch in range(1, epochs + 1):
        perm = num.put(torch.randperm(n, generator=g))
        correct = torch.zeros((), dtype=torch.long, device=num.device)
        for s in range(0, n, batch_size):
            b = perm[s : s + batch_size]
            with num.autocast():
                out = module(src[b])
                loss = -F.cross_entropy(out, ys[b])
            correct += (out.argmax(1) == ys[b]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        acc = int(correct) / max(1, n)  # one host read per epoch
        if epoch in milestones:
            for group in opt.param_groups:
                group["lr"] *= gamma
        if acc <= threshold:
            break
    module.eval()
    return {"epochs": epoch, "steps": steps, "acc": acc}


def recover_masks(
    module: nn.Module,
    inputs: Tensor,
    y: Tensor,
    g: torch.Generator,
    *,
    epochs: int = 10,
    lr: float = 0.1,
    alpha: float = 1.0,
    l1: float = 0.0,
    batch_size: int = 128,
    train_mode: bool = False,
    num: Numerics | None = None,
) -> dict[str, Tensor]:
    """Learn the masks of `module`'s MaskedBNs alone (everything else frozen) on clean data: SGD, momentum 0.9, loss
    alpha x CE (+ l1 x sum|m|), masks clipped to [0, 1] after each step. `train_mode`: BN on batch statistics
    (RNP's codes) or on the model's running statistics (T-Core). Returns the masks by BN name."""
    num = num or Numerics.resolve(inputs.device)
    src, y = num.resident(inputs), num.put(y)
    for p in module.parameters():
        p.requires_grad_(False)
    ms = []
    for _, m in masked_bns(module):
        m.mask.requires_grad_(True)
        ms.append(m.mask)
    opt = torch.optim.SGD(ms, lr=lr, momentum=0.9)
    module.train(train_mode)
    n = len(y)
    for _ in range(epochs):
        perm = num.put(torch.randperm(n, generator=g))
        for s in range(0, n, batch_size):
            b = perm[s : s + batch_size]
            with num.autocast():
                loss = F.cross_entropy(module(src[b]), y[b])
                if alpha != 1.0:
                    loss = alpha * loss
                if l1:
                    loss = loss + l1 * sum(m.abs().sum() for m in ms)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for m in ms:
                    m.clamp_(0.0, 1.0)
    for m in ms:
        m.requires_grad_(False)
    module.eval()
    return masks(module)


# --------------------------------------------------------------------------- the clean share
def clean_split(
    ctx: RunContext, fraction: float, g: torch.Generator, name: str
) -> tuple[LabeledSet, LabeledSet]:
    """(fit, holdout) of the defense's clean share; a clear error without one, or when it is too small to hold
    anything out (the holdout is where every selection rule is made)."""
    clean = require_clean(ctx, name)
    fit, held = split_holdout(clean, fraction, g)
    if len(held) == 0:
        raise ValueError(
            f"{name}: the clean share ({len(clean)} images) leaves nothing for the holdout its selection rule needs "
            "(at least 2 images per class); raise defense.clean_fraction"
        )
    return fit, held


def require_clean(ctx: RunContext, name: str) -> LabeledSet:
    if ctx.clean is None or len(ctx.clean) == 0:
        raise ValueError(f"{name} needs the clean reserve (defense.clean_fraction > 0)")
    return ctx.clean


# --------------------------------------------------------------------------- ANP and RNP
def top_tail(model: Model, n_stages: int) -> tuple[int, _Tail]:
    """The first of the encoder's top `n_stages` stages and a module of those stages + the head, sharing `model`'s
    modules (no copy)."""
    start = max(0, len(model.encoder.stages) - int(n_stages))
    return start, _Tail(model.encoder, start, model.head)


class MaskPruning(Defense):
    """ANP and RNP: learn a mask per BN channel of M0's top `stages` stages on the fit part of the clean share
    (`learn_masks`), sweep the pruning threshold (or number) on M0, judge each point by its accuracy on the held-out
    part, and prune the chosen channels' BN weight (gamma) in M0. The head of M0 stays as trained.

    The codes' sweeps print test ACC/ASR and BackdoorBench keeps the lowest test ASR within its accuracy ratio
    (issue #35); here the point with the most pruning whose holdout accuracy passes `within` wins, or a fixed
    `pruning_number` (BackdoorBench's answer to issue #35) is pruned without a sweep."""

    knowledge = Knowledge(clean_fraction=0.05, needs_clean=True)
    salt: ClassVar[int] = 0
    noise: ClassVar[bool] = False  # the masked copy carries ANP's noise

    def __init__(
        self,
        stages: int = 2,
        pruning_by: str = "threshold",
        pruning_max: float = 0.9,
        pruning_step: float = 0.05,
        pruning_number: float | None = None,
        acc_ratio: float = 0.1,
        holdout: float = 0.2,
        clean_fraction: float | None = None,
    ) -> None:
        super().__init__(clean_fraction)
        if pruning_by not in ("threshold", "number"):
            raise ValueError(f"defense.pruning_by={pruning_by!r}; choose threshold or number")
        if int(stages) < 1:
            raise ValueError(f"defense.stages={stages} must be >= 1")
        if not pruning_step > 0:
            raise ValueError(f"defense.pruning_step={pruning_step} must be > 0")
        self.stages, self.pruning_by = int(stages), pruning_by
        self.pruning_max, self.pruning_step, self.pruning_number = pruning_max, pruning_step, pruning_number
        self.acc_ratio, self.holdout = acc_ratio, holdout

    def learn_masks(
        self, work: nn.Module, inputs: Tensor, y: Tensor, g: torch.Generator, ctx: RunContext
    ) -> dict[str, Tensor]:
        """Masks of `work` (a masked copy of M0's top stages + head) learned on the fit part of the clean share."""
        raise NotImplementedError

    def train(self, encoder: nn.Module, train: LabeledSet, probe: Any, ctx: RunContext) -> Model:
        g = ctx.generator(salt=self.salt)
        fit, held = clean_split(ctx, self.holdout, g, self.name)
        m0 = reference_model(encoder, train, probe, ctx)
        start, tail = top_tail(m0, self.stages)
        # what enters the top stages, under M0's own encoder (stages below a fine-tuning probe's are untouched)
        x_fit = memo_forward(m0.encoder, fit.x, ctx, stop=start, on_device=True)
        x_held = memo_forward(m0.encoder, held.x, ctx, stop=start, on_device=True)
        work = ctx.num.module(mask_bns(copy.deepcopy(tail), mask_bias=False, noise=self.noise))
        if not any(True for _ in masked_bns(work)):
            raise ValueError(
                f"{self.name}: the encoder's top {self.stages} stage(s) hold no BatchNorm2d to mask"
            )
        scores = {k: v.float().cpu() for k, v in self.learn_masks(work, x_fit, fit.y, g, ctx).items()}
        del work

        def pruned(by: dict) -> _Tail:
            cand = copy.deepcopy(tail)
            prune(bn_weights(cand), scores, **by)
            return cand

        base = accuracy(tail, x_held, held.y, num=ctx.num)
        by, accs = self._choose(scores, lambda by: accuracy(pruned(by), x_held, held.y, num=ctx.num), base)
        final = copy.deepcopy(m0)
        _, final_tail = top_tail(final, self.stages)
        chosen = prune(bn_weights(final_tail), scores, **by) if by else {}
        end = len(final.encoder.stages)
        self._report(
            start, end, scores, chosen, by, base, accs, accuracy(final_tail, x_held, held.y, num=ctx.num)
        )
        return final.eval()

    def _choose(self, scores: dict[str, Tensor], acc_of, base: float) -> tuple[dict, list[float]]:
        """{threshold: t} or {number: k} to prune ({} = nothing), and the holdout accuracy of every sweep point."""
        if self.pruning_number is not None:  # fixed, no sweep
            key = "threshold" if self.pruning_by == "threshold" else "number"
            value = float(self.pruning_number) if key == "threshold" else int(self.pruning_number)
            return {key: value}, []
        if self.pruning_by == "threshold":
            n_pts = int(round(self.pruning_max / self.pruning_step)) + 1
            points = [{"threshold": round(i * self.pruning_step, 10)} for i in range(n_pts)]
        else:
            total = sum(s.numel() for s in scores.values())
            top = min(int(self.pruning_max), total)
            points = [{"number": k} for k in range(0, top + 1, max(1, int(self.pruning_step)))]
        chosen, accs = sweep(points, acc_of, base, self.acc_ratio, stop_at_failure=False)
        return chosen or {}, accs

    def _report(self, start, end, scores, chosen, by, base, accs, acc) -> None:
        n = self.name
        flat = torch.cat(list(scores.values()))
        per_stage: dict[int, int] = {}
        for name, sel in chosen.items():
            stage = start + int(name.split(".")[1])  # "stages.<i>...." within the tail
            per_stage[stage] = per_stage.get(stage, 0) + int(sel.sum())
        self.decisions["pruned_channels"] = {
            k: torch.nonzero(v).squeeze(1).tolist() for k, v in chosen.items()
        }
        self.diagnostics.update(
            {
                f"{n}/channels": len(flat),
                f"{n}/pruned": int(sum(int(s.sum()) for s in chosen.values())),
                f"{n}/pruned_per_stage": [per_stage.get(i, 0) for i in range(start, end)],
                f"{n}/first_stage": start,
                f"{n}/{self.pruning_by}": next(iter(by.values())) if by else None,
                f"{n}/mask_mean": float(flat.mean()),
                f"{n}/mask_le_0.2": int((flat <= 0.2).sum()),
                f"{n}/holdout_acc_m0": base,
                f"{n}/holdout_acc": acc,
                f"{n}/sweep_holdout_acc": [round(a, 4) for a in accs],
            }
        )
        log.info(
            "%s: %d of %d channels pruned (%s), holdout acc %.3f -> %.3f",
            n,
            self.diagnostics[f"{n}/pruned"],
            len(flat),
            by or "none passed the holdout rule",
            base,
            acc,
        )
