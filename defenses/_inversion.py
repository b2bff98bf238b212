"""Shared machinery (BASELINES.md section 3): trigger inversion with a tanh-parameterised mask and pattern and an
adaptive weight on the mask's L1 norm, the optimisation of Neural Cleanse (section 2.14) and of DECREE (2.15).

  x' = (1 - m) x + m p        m = tanh(w_m) / (2 + eps) + 0.5  (H x W),  p = tanh(w_p) / (2 + eps) + 0.5  (C x H x W)
  loss = objective(x') + lambda |m|_1

The objective is passed in: NC's is the cross-entropy of the model's logits towards a class t (its score: the
share of stamped images classified as t); DECREE's is minus the mean pairwise cosine similarity of a batch's
embeddings (its score: that similarity). A check succeeds when the score reaches `success`.

  best      the smallest-L1 mask among successful checks is kept (with its pattern); when no check succeeds the
            last mask is returned, as both reference codes do, and `found` says so
  lambda    `LambdaSchedule`: up after `patience` successes in a row, down after `patience` failures
  stop      `EarlyStop`: after `patience` checks in a row without the best L1 improving by 1 - threshold

Read in bolunwang/backdoor visualizer.py (the authors' Keras code: Adam lr 0.1, betas (0.5, 0.9), init cost 1e-3,
cost x2 up and / 2^1.5 down after 5, early stop at threshold 0.99 with patience 25 once the cost has gone both up
and down; random initial mask and pattern; its cost starts at 0 and is set to init_cost after 5 successes);
SCLBD/BackdoorBench defense/nc.py (the same state machine, one check per epoch on epoch means, the cost starting at
init_cost, as here); GiantSeaweed/DECREE main.py (one check per batch, x5 and
/ 5 counted with > patience, a floor 1e-5 below which lambda is reset to its initial value after 2 x patience
successes, no growth at or above 1e5, early stop on threshold 1.0 with patience 10 at the end of an epoch whose
mean succeeded, the L1 counted over the mask repeated on 3 channels). Those three readings are the options here:
`per_step`, `LambdaSchedule(strict, floor, cap)`, `EarlyStop(strict, after_lambda_moves, on_success)`, `l1_channels`.

The stamp is applied to images in [0, 1]. The codes blend raw pixels (Keras, DECREE) or normalised ones
(BackdoorBench); per-channel normalisation is affine, so the two are the same blend of the same images. Every
encoder here normalises its own input, so the model sees exactly what it would see for that stamped image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from securetl import guard
from securetl.interfaces import RunContext
from securetl.numerics import take

EPS = 1e-7  # keeps tanh / (2 + eps) + 0.5 strictly inside (0, 1) (BackdoorBench's EPSILON)

# objective(stamped float images on the device) -> (loss to minimise, score: higher = more successful), 0-d tensors
Objective = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class LambdaSchedule:
    """The weight of the L1 term: `init`, multiplied by `up` after `patience` successes in a row and divided by
    `down` after `patience` failures in a row (NC; `strict`: after MORE than `patience`, DECREE). `floor`
    (DECREE's lambda_min): no division below it, and below it `reset_patience` + 1 successes in a row reset it to
    `init`; `cap`: no multiplication at or above it."""

    init: float = 1e-3
    up: float = 2.0
    down: float = 2.0**1.5
    patience: int = 5
    strict: bool = False
    floor: float | None = None
    reset_patience: int = 10
    cap: float | None = None


@dataclass(frozen=True)
class EarlyStop:
    """Stop once `patience` checks in a row (more than, with `strict`) left the best L1 at or above `threshold`
    times the best before them; NC also waits until lambda has gone both up and down (`after_lambda_moves`),
    DECREE until an epoch's mean score succeeds (`on_success`). `patience` None: never stop early."""

    threshold: float = 0.99
    patience: int | None = 25
    strict: bool = False
    after_lambda_moves: bool = True
    on_success: bool = False


@dataclass
class Inverted:
    """The result of one inversion: the best (or, if `found` is False, the last) mask and pattern, on the host."""

    mask: Tensor  # (H, W) in [0, 1]
    pattern: Tensor  # (C, H, W) in [0, 1]
    l1: float  # |mask|_1 x l1_channels
    score: float  # the score at the check that kept it (the last check's when not found)
    found: bool  # some check succeeded
    epochs: int  # epochs run (early stop included)
    lam: float  # lambda at the end


def stamp(x: Tensor, mask: Tensor, pattern: Tensor) -> Tensor:
    """(1 - m) x + m p for a batch x in [0, 1] (N, C, H, W), a mask (H, W) and a pattern (C, H, W)."""
    return (1 - mask) * x + mask * pattern


def to_tanh_space(v: Tensor) -> Tensor:
    """The parameter whose squashed value is v in [0, 1] (the codes' arctanh((v - 0.5)(2 - eps)))."""
    return torch.atanh((v.clamp(0, 1) - 0.5) * (2 - EPS))


def squash(w: Tensor) -> Tensor:
    return torch.tanh(w) / (2 + EPS) + 0.5


class _Lambda:
    """LambdaSchedule's state: the current value, the counters, and whether it has moved up / down."""

    def __init__(self, s: LambdaSchedule) -> None:
        self.s, self.value = s, s.init
        self.ups = self.downs = self.resets = 0
        self.went_up = self.went_down = False

    def _due(self, count: int) -> bool:
        return count > self.s.patience if self.s.strict else count >= self.s.patience

    def update(self, success: bool) -> None:
        s = self.s
        if s.floor is not None:
            self.resets = self.resets + 1 if (self.value < s.floor and success) else 0
            if self.resets > s.reset_patience:
                self.value, self.ups, self.downs, self.resets = s.init, 0, 0, 0
                self.went_up = self.went_down = False
        self.ups, self.downs = (self.ups + 1, 0) if success else (0, self.downs + 1)
        if self._due(self.ups):
            self.ups = 0
            if s.cap is None or self.value < s.cap:
                self.value *= s.up
            self.went_up = True
        elif self._due(self.downs):
            self.downs = 0
            if s.floor is None or self.value >= s.floor:
                self.value /= s.down
            self.went_down = True


class _Best:
    """Best-L1 bookkeeping and the early-stop counter."""

    def __init__(self, success: float, stop: EarlyStop) -> None:
        self.success, self.stop = success, stop
        self.l1 = float("inf")
        self.mask = self.pattern = None
        self.score = float("nan")
        self.stale, self.stop_ref = 0, float("inf")

    def record(self, score: float, l1: float, mask: Tensor, pattern: Tensor) -> None:
        if score >= self.success and l1 < self.l1:
            self.mask, self.pattern, self.l1, self.score = (
                mask.detach().clone(),
                pattern.detach().clone(),
                l1,
                score,
            )
        if self.l1 < float("inf"):  # counting starts once a successful trigger exists
            self.stale = self.stale + 1 if self.l1 >= self.stop.threshold * self.stop_ref else 0
        self.stop_ref = min(self.stop_ref, self.l1)

    def should_stop(self, lam: _Lambda, epoch_score: float) -> bool:
        st = self.stop
        if st.patience is None:
            return False
        if st.after_lambda_moves and not (lam.went_up and lam.went_down):
            return False
        if st.on_success and not epoch_score >= self.success:
            return False
        return self.stale > st.patience if st.strict else self.stale >= st.patience


def invert_trigger(
    objective: Objective,
    images: Tensor,
    ctx: RunContext,
    g: torch.Generator,
    *,
    epochs: int,
    batch_size: int,
    success: float,
    lr: float = 0.1,
    betas: tuple[float, float] = (0.5, 0.9),
    lam: LambdaSchedule = LambdaSchedule(),
    stop: EarlyStop = EarlyStop(),
    per_step: bool = False,
    l1_channels: int = 1,
    mask_init: Tensor | None = None,
    lr_at: Callable[[int], float] | None = None,
    desc: str = "invert",
) -> Inverted:
    """Optimise a mask and a pattern on `images` (uint8 or float in [0, 1], (N, C, H, W)) against `objective`.

    One check (best-L1 bookkeeping, early-stop count, lambda update) per epoch on the epoch's mean score and mean
    L1 (NC as BackdoorBench runs it), or per batch (`per_step`, DECREE). Batches are drawn from `g`; the mask and
    pattern start uniform at random from `g` (both codes), or the mask at `mask_init` (DECREE's fixed square).
    `lr_at(epoch)` replaces the learning rate at the start of an epoch (DECREE's step schedule)."""
    num = ctx.num
    n, c, h, w = images.shape
    m0 = torch.rand(h, w, generator=g) if mask_init is None else mask_init.float().cpu()
    p0 = torch.rand(c, h, w, generator=g)
    w_mask = num.put(to_tanh_space(m0)).requires_grad_(True)
    w_pattern = num.put(to_tanh_space(p0)).requires_grad_(True)
    opt = torch.optim.Adam([w_mask, w_pattern], lr=lr, betas=betas)
    src = num.resident(images)
    schedule, best = _Lambda(lam), _Best(success, stop)
    epoch_score = float("nan")
    ran = 0
    quiet = not ctx.progress or epochs * n < 200_000  # the caller's own bar covers short inversions
    # a check per epoch: a non-finite mask or pattern would make every later L1 and score meaningless
    watch = guard.Watch(desc, None, opt, record=ctx.diagnostics)
    for epoch in tqdm(range(epochs), desc=desc, disable=quiet, leave=False):
        ran = epoch + 1
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch) * watch.shrink**watch.triggers
        watch.begin()
        scores, l1s = [], []
        perm = num.put(torch.randperm(n, generator=g))
        for s in range(0, n, batch_size):
            mask, pattern = squash(w_mask), squash(w_pattern)
            # take: `src` may be pinned host memory (num.resident: the images did not fit), `perm` is on the device
            xb = num.batch(take(src, perm[s : s + batch_size]))
            l1 = mask.abs().sum() * l1_channels
            with num.autocast():
                loss, score = objective(stamp(xb, mask, pattern))
            loss = loss.float() + schedule.value * l1
            watch.observe(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if per_step:  # a host read per batch: lambda decides on each one
                sc, l1v = float(score.detach()), float(l1.detach())
                best.record(sc, l1v, mask, pattern)
                schedule.update(sc >= success)
            scores.append(score.detach().float())
            l1s.append(l1.detach())
        verdict = watch.end(epoch + 1)
        if verdict == guard.STOP:
            break
        if verdict == guard.RETRY:  # back at the last finite mask and pattern; this epoch's numbers are void
            continue
        epoch_score, epoch_l1 = torch.stack([torch.stack(scores).mean(), torch.stack(l1s).mean()]).tolist()
        if not per_step:
            with torch.no_grad():
                best.record(epoch_score, epoch_l1, squash(w_mask), squash(w_pattern))
        if best.should_stop(schedule, epoch_score):
            break
        if not per_step:
            schedule.update(epoch_score >= success)
    found = best.mask is not None
    with torch.no_grad():
        mask = best.mask if found else squash(w_mask)
        pattern = best.pattern if found else squash(w_pattern)
    mask, pattern = mask.float().cpu(), pattern.float().cpu()
    return Inverted(
        mask=mask,
        pattern=pattern,
        l1=float(mask.abs().sum()) * l1_channels,
        score=best.score if found else epoch_score,
        found=found,
        epochs=ran,
        lam=schedule.value,
    )
