"""Channel masks and pruning (BASELINES.md section 3), one implementation for ANP, RNP, Fine-Pruning and T-Core's
channel filter.

`MaskedBN`       a BatchNorm2d whose affine output is scaled per channel by a mask m in [0, 1] (RNP's masked BN, which
                 T-Core's channel filter follows), optionally with ANP's bounded multiplicative noise on weight and bias
`mask_bns`       swap every BatchNorm2d of a module for a MaskedBN, in place; `unmask` folds the masks back
`prune`          zero exactly the channels (slices of parameters) whose score is <= a threshold, or the `number`
                 lowest: ANP and RNP on BN weights, Fine-Pruning on the columns of the head's input
`within`         the holdout rule a pruning sweep is judged by (accuracy on the held-out 20 % of the clean share,
                 never test data: BASELINES.md section 0)
`unlearn`        gradient ascent on the CE over whole epochs (securetl.probe.train_loop), until the running accuracy
                 falls to a threshold: RNP (all parameters) and ABL (a fixed number of epochs, no threshold)
`unlearn_per_step`  the same ascent checked after every step on a fixed sample: T-Core (normalisation parameters)
`recover_masks`  learn the masks alone on clean data (RNP's filter recovering; T-Core's, with an L1 pull)
`MaskPruning`    the shape ANP and RNP share: masks on M0's top stages learned on the clean share, a sweep over the
                 pruning threshold (or number) judged on the holdout, the chosen channels pruned in M0
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import Tensor, nn

from securetl import guard
from securetl.interfaces import Defense, Knowledge, LabeledSet, Model, RunContext
from securetl.numerics import Numerics, take
from securetl.probe import train_loop

from ._features import Scope, accuracy, clean_split, reference_model, steps_per_epoch

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
        """A MaskedBN computing what `bn` computes (masks at 1). timm's BatchNormAct2d keeps its dropout and
        activation, applied after the masked normalisation as it applies them; any other BN subclass is refused,
        since its forward is unknown here and swapping it would silently change the model."""
        if not bn.affine or not bn.track_running_stats:
            # the mask scales gamma (no gamma: nothing to mask or prune), and the masked forward reads the running
            # statistics; building it anyway would invent a gamma of 1 / fail on the missing buffers
            raise ValueError(
                f"cannot mask {type(bn).__name__}({bn.num_features}) with affine={bn.affine}, "
                f"track_running_stats={bn.track_running_stats}: masks need an affine BN with running statistics"
            )
        carried = type(bn) is BatchNormAct2d
        if type(bn) is not nn.BatchNorm2d and not carried:
            raise ValueError(
                f"cannot mask {type(bn).__name__}: only nn.BatchNorm2d and timm's BatchNormAct2d are supported "
                "(a BN subclass may compute more than the normalisation, which the masked copy would drop)"
            )
        dev = bn.weight.device  # built where the BN it replaces lives
        m = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=True, track_running_stats=True)
        if carried:  # before loading: an activation with parameters (PReLU) is part of the state dict
            m.drop, m.act = bn.drop, bn.act
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

    @property
    def carries_act(self) -> bool:
        """Whether this replaces a timm BatchNormAct2d (its dropout and activation follow the normalisation)."""
        return "act" in self._modules

    def forward(self, x: Tensor) -> Tensor:
        cw, cb = self.coefficients()
        x = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight * cw,
            self.bias if cb is None else self.bias * cb,
            self.training,
            self.momentum,
            self.eps,
        )
        return self.act(self.drop(x)) if self.carries_act else x  # BatchNormAct2d's order: drop, then act


def mask_bns(module: nn.Module, mask_bias: bool = True, noise: bool = False) -> nn.Module:
    """Every BatchNorm2d of `module` replaced by a MaskedBN (masks at 1), in place; returns `module`. timm's
    BatchNormAct2d keeps its activation and dropout; a BN the mask cannot reproduce (affine=False, no running
    statistics, another subclass) raises (MaskedBN.from_bn) rather than being swapped for something else."""
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
    """Turn MaskedBN layers back into plain BatchNorm2d (BatchNormAct2d where they replaced one) with the mask folded
    into weight (and bias), in place."""
    for name, child in module.named_children():
        if isinstance(child, MaskedBN):
            if child.carries_act:  # back to what was masked: a BatchNormAct2d, its dropout and activation
                bn = BatchNormAct2d(
                    child.num_features, eps=child.eps, momentum=child.momentum, apply_act=False
                )
                bn.drop, bn.act = child.drop, child.act
            else:
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
@contextmanager
def _training_only(module: nn.Module, params: Sequence[nn.Parameter]):
    """Within the block only `params` of `module` take gradients; every requires_grad is restored afterwards."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _Ascent:
    """train_loop's loss for gradient ascent: -CE, counting the epoch's correct predictions on the device (the
    running training accuracy RNP's stopping rule reads; one host read an epoch)."""

    def __init__(self, device: torch.device) -> None:
        self.correct = torch.zeros((), dtype=torch.long, device=device)

    def __call__(self, module: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
        out = module(xb)
        self.correct += (out.argmax(1) == yb).sum()
        return -F.cross_entropy(out, yb)


def unlearn(
    module: nn.Module,
    inputs: Tensor,
    y: Tensor,
    ctx: RunContext,
    g: torch.Generator,
    params: Sequence[nn.Parameter],
    *,
    epochs: int,
    threshold: float | None = 0.2,
    lr: float = 0.01,
    weight_decay: float = 0.0,
    batch_size: int = 128,
    milestones: Sequence[int] = (),
    desc: str = "unlearn",
) -> dict[str, float]:
    """Gradient ascent on the CE of `module` over (inputs, y): shuffled epochs in train mode, SGD (momentum 0.9) on
    `params` only (both RNP codes; ABL's unlearning). Stops after the first epoch whose running training accuracy
    is <= `threshold` (None: never), or after `epochs`; lr x 0.1 after each epoch in `milestones` (MultiStepLR).
    Every parameter's requires_grad is restored afterwards."""
    n = len(y)
    ascent = _Ascent(ctx.device)
    state = {"epochs": 0, "acc": float("nan")}

    def epoch_end(done: int) -> bool:
        state["epochs"], state["acc"] = done, int(ascent.correct) / max(1, n)
        ascent.correct.zero_()
        return threshold is not None and state["acc"] <= threshold

    with _training_only(module, params):
        train_loop(
            module,
            inputs,
            y,
            ctx,
            [{"params": list(params), "lr": lr}],
            epochs=epochs,
            batch_size=batch_size,
            g=g,
            optimizer="sgd",
            weight_decay=weight_decay,
            loss_fn=ascent,
            desc=desc,
            schedule=list(milestones) or None,
            on_epoch_end=epoch_end,
        )
    steps = state["epochs"] * steps_per_epoch(n, batch_size)
    return {"epochs": state["epochs"], "steps": steps, "acc": state["acc"]}


def unlearn_per_step(
    module: nn.Module,
    acts: Tensor,
    y: Tensor,
    g: torch.Generator,
    params: Sequence[nn.Parameter],
    *,
    threshold: float = 0.2,
    lr: float = 0.01,
    batch_size: int = 128,
    max_steps: int = 500,
    check_every: int = 1,
    num: Numerics | None = None,
    phase: str = "unlearn",
    majority_stop: bool = False,
) -> dict[str, float]:
    """Gradient ascent on the CE of `module`, SGD (momentum 0.9) on `params` only, checked per step (T-Core): batches
    drawn with replacement, eval-mode BN (the running statistics stay those of the model being analysed); after
    every `check_every` steps the accuracy on a fixed sample of up to 512 inputs; stop once it is < threshold or
    after `max_steps`. Every parameter's requires_grad is restored afterwards.

    Divergence (securetl.guard, `phase` names it): checked with the accuracy, which reads the host anyway. Ascent
    is unbounded: once the logits are NaN every sample is predicted as one class, whose share of D can hold the
    accuracy above the threshold for all `max_steps`. Under `recover` the last finite parameters come back with
    a lower lr (momentum cleared) and the ascent goes on; `retries` triggers later it stops there.
    `majority_stop` (T-Core's): stop also once the accuracy is no better than predicting the sample's most frequent
    label: the model has collapsed onto one class, and under dirty-label poison that class can hold more than
    `threshold` of D, so the ascent would only go on until it diverges."""
    num = num or Numerics.resolve(acts.device)
    with _training_only(module, params):
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
        watch = guard.Watch(phase, module, opt, unit="step")
        n, steps = len(y), 0
        y = num.put(y)
        probe_idx = num.put(torch.randperm(n, generator=g)[:512])
        acc = accuracy(module, take(acts, probe_idx), y[probe_idx], num)  # take: acts may be on the host
        floor = float(torch.bincount(y[probe_idx].cpu()).max()) / len(probe_idx) if majority_stop else -1.0
        module.eval()
        watch.begin()
        while acc >= threshold and acc > floor and steps < max_steps:
            b = num.put(torch.randint(0, n, (batch_size,), generator=g))
            with num.autocast():
                loss = -F.cross_entropy(module(num.put(take(acts, b))), y[b])
            watch.observe(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if steps % check_every == 0:
                verdict = watch.end(steps)
                acc = accuracy(module, take(acts, probe_idx), y[probe_idx], num)
                if verdict == guard.STOP:
                    break
                watch.begin()
        if watch.pending and watch.end(steps) != guard.OK:  # max_steps inside a check window
            acc = accuracy(module, take(acts, probe_idx), y[probe_idx], num)
    return {"steps": steps, "acc": acc}


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
    phase: str = "recover_masks",
) -> dict[str, Tensor]:
    """Learn the masks of `module`'s MaskedBNs alone (everything else frozen) on clean data: SGD, momentum 0.9, loss
    alpha x CE (+ l1 x sum|m|), masks clipped to [0, 1] after each step. `train_mode`: BN on batch statistics
    (RNP's codes) or on the model's running statistics (T-Core). Returns the masks by BN name. Divergence is
    checked once an epoch (securetl.guard, `phase` names it): a NaN mask survives the clipping."""
    num = num or Numerics.resolve(inputs.device)
    src, y = num.resident(inputs), num.put(y)
    for p in module.parameters():
        p.requires_grad_(False)
    ms = []
    for _, m in masked_bns(module):
        m.mask.requires_grad_(True)
        ms.append(m.mask)
    opt = torch.optim.SGD(ms, lr=lr, momentum=0.9)
    watch = guard.Watch(phase, module, opt)
    module.train(train_mode)
    n = len(y)
    for epoch in range(epochs):
        watch.begin()
        perm = num.put(torch.randperm(n, generator=g))
        for s in range(0, n, batch_size):
            b = perm[s : s + batch_size]
            with num.autocast():  # take: `src` may be pinned host memory (num.resident), `b` is on the device
                loss = F.cross_entropy(module(num.put(take(src, b))), y[b])
                if alpha != 1.0:
                    loss = alpha * loss
                if l1:
                    loss = loss + l1 * sum(m.abs().sum() for m in ms)
            watch.observe(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for m in ms:
                    m.clamp_(0.0, 1.0)
        if watch.end(epoch + 1) == guard.STOP:
            break
    for m in ms:
        m.requires_grad_(False)
    module.eval()
    return masks(module)


# --------------------------------------------------------------------------- ANP and RNP
def _check_sweep(by: str, top: float, step: float, fixed: float | None) -> None:
    """Refuse, at construction, values that do not fit `pruning_by` (the sweep's, or the fixed `pruning_number`,
    which replaces the sweep): masks lie in [0, 1], so a threshold above 1 prunes every channel; a number is a count
    of channels, so the threshold defaults (0.9, 0.05) would sweep range(0, int(0.9) + 1) = [0] and prune nothing.
    The ANP recipe's number sweep: pruning_max 1000, pruning_step 20 (of ResNet-18's 4 800 BN channels, about 21 %
    in steps of 0.4 %)."""
    swept = (("pruning_max", top), ("pruning_step", step)) if fixed is None else ()
    if by == "threshold":
        bad = [f"{k}={v}" for k, v in swept if not 0 < v <= 1]
        if fixed is not None and not 0 <= fixed <= 1:
            bad.append(f"pruning_number={fixed}")
        if bad:
            raise ValueError(
                f"defense.pruning_by=threshold sweeps mask values in [0, 1]: {', '.join(bad)} must lie in (0, 1] "
                "(pruning_number in [0, 1]); use pruning_by=number for counts of channels"
            )
        return
    bad = [f"{k}={v}" for k, v in swept if v < 1 or v != int(v)]
    if fixed is not None and (fixed < 0 or fixed != int(fixed)):
        bad.append(f"pruning_number={fixed}")
    if bad:
        raise ValueError(
            f"defense.pruning_by=number counts channels: {', '.join(bad)} must be whole numbers >= 1 "
            "(pruning_number >= 0), e.g. pruning_max=1000 pruning_step=20 as the ANP recipe"
        )


class MaskPruning(Defense):
    """ANP and RNP: learn a mask per BN channel of M0's encoder (every stage, as both codes mask every BN; or its top
    `stages` stages) on the fit part of the clean share (`learn_masks`), sweep the pruning threshold (or number) on
    M0, judge each point by its accuracy on the held-out part, and prune the chosen channels' BN weight (gamma) in
    M0. The head of M0 stays as trained.

    The codes' sweeps print test ACC/ASR and BackdoorBench keeps the lowest test ASR within its accuracy ratio
    (issue #35); here the point with the most pruning whose holdout accuracy passes `within` wins, or a fixed
    `pruning_number` (BackdoorBench's answer to issue #35) is pruned without a sweep."""

    knowledge = Knowledge(clean_fraction=0.05, needs_clean=True)
    uses_reference_model = True
    salt: ClassVar[int] = 0
    noise: ClassVar[bool] = False  # the masked copy carries ANP's noise

    def __init__(
        self,
        stages: int | None = None,
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
        if stages is not None and int(stages) < 1:
            raise ValueError(f"defense.stages={stages} must be >= 1 (null: every stage)")
        if not pruning_step > 0:
            raise ValueError(f"defense.pruning_step={pruning_step} must be > 0")
        _check_sweep(pruning_by, pruning_max, pruning_step, pruning_number)
        self.stages, self.pruning_by = (None if stages is None else int(stages)), pruning_by
        self.pruning_max, self.pruning_step, self.pruning_number = pruning_max, pruning_step, pruning_number
        self.acc_ratio, self.holdout = acc_ratio, holdout

    def learn_masks(
        self, work: nn.Module, inputs: Tensor, y: Tensor, g: torch.Generator, ctx: RunContext
    ) -> dict[str, Tensor]:
        """Masks of `work` (a masked copy of M0's top stages + head) learned on the fit part of the clean share."""
        raise NotImplementedError

    def train(self, encoder: nn.Module, train: LabeledSet, probe: Any, ctx: RunContext) -> Model:
        with guard.session(record=self.diagnostics):  # the mask loops' divergence triggers go into the row
            return self._train(encoder, train, probe, ctx)

    def _train(self, encoder: nn.Module, train: LabeledSet, probe: Any, ctx: RunContext) -> Model:
        g = ctx.generator(salt=self.salt)
        fit, held = clean_split(ctx, self.name, self.holdout, g)
        m0 = reference_model(encoder, train, probe, ctx)
        # M0's stages (all, or the top `stages`) + head, on what enters them (stages below are untouched)
        n_stages = len(m0.encoder.stages) if self.stages is None else self.stages
        scope = Scope.of_model(m0, probe, fit.x, ctx, stages=n_stages)
        x_fit, x_held = scope.inputs, scope.inputs_for(held.x, ctx)
        work = mask_bns(scope.module(ctx.num_classes, ctx), mask_bias=False, noise=self.noise)
        if not any(True for _ in masked_bns(work)):
            where = "stages" if self.stages is None else f"top {self.stages} stage(s)"
            raise ValueError(f"{self.name}: the encoder's {where} hold no BatchNorm2d to mask")
        scores = {k: v.float().cpu() for k, v in self.learn_masks(work, x_fit, fit.y, g, ctx).items()}
        del work

        def pruned(by: dict) -> tuple[nn.Module, dict[str, Tensor]]:
            """A copy of M0's part with the channels `by` selects pruned ({}: none), and that selection."""
            cand = scope.module(ctx.num_classes, ctx)
            return cand, (prune(bn_weights(cand), scores, **by) if by else {})

        base = accuracy(pruned({})[0], x_held, held.y, ctx)
        by, accs = self._choose(scores, lambda by: accuracy(pruned(by)[0], x_held, held.y, ctx), base)
        final, chosen = pruned(by)
        end = len(m0.encoder.stages)
        self._report(scope.start, end, scores, chosen, by, base, accs, accuracy(final, x_held, held.y, ctx))
        return scope.model(final)

    def _choose(self, scores: dict[str, Tensor], acc_of, base: float) -> tuple[dict, list[float]]:
        """{threshold: t} or {number: k} to prune ({} = nothing), and the holdout accuracy of every sweep point."""
        if self.pruning_number is not None:  # fixed, no sweep
            key = "threshold" if self.pruning_by == "threshold" else "number"
            value = float(self.pruning_number) if key == "threshold" else int(self.pruning_number)
            return {key: value}, []
        if self.pruning_by == "threshold":
            n_pts = int(round(self.pruning_max / self.pruning_step)) + 1
            points = [{"threshold": round(i * self.pruning_step, 10)} for i in range(n_pts)]
        else:  # counts (whole numbers >= 1: _check_sweep), capped at the channels there are
            total = sum(s.numel() for s in scores.values())
            top = min(int(self.pruning_max), total)
            points = [{"number": k} for k in range(0, top + 1, int(self.pruning_step))]
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
