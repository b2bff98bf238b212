"""Shared machinery (BASELINES.md section 3): the model trained on D and its representations, the part of the
downstream model a probe trains, and the clean share -- one implementation for every defense that trains or repairs
that part itself (CT, ASSET, ABL, DBD, ASD, FT/FP, ANP, RNP, NAD, NC; T-Core's accuracy check).

`reference_model`  M0: the probe trained on all of D (what `defense=none` would deploy), cached per sweep cell.
`features`         M0's representation of images, memoised: the encoder's output (the penultimate layer:
                   the frozen encoder under a linear/MLP probe, the fine-tuned encoder under probe=finetune),
                   or the logits. Extends securetl.probe.memo_forward (keyed on the encoder's weights).
`Scope`            what a probe trains and what enters it: a head on frozen features, or the encoder's top
                   stages + a head on the memoised activations that enter them. `Scope.of` is that part of the
                   received encoder with a fresh head (methods that train from the probe's initialisation);
                   `Scope.of_model` is that part of M0, as trained (methods that repair M0). Either gives the
                   trainable module, its optimiser groups, and the Model that evaluates it.
`accuracy`         a module's accuracy on memoised scope inputs (one host read).
`require_clean`    the defense's clean share, or the one-line error of a method that needs it and has none;
`clean_split`      its (fit, holdout) split for selection rules (securetl.knowledge.split_holdout).
`epochs_for`       how many epochs make a number of optimiser steps (schedules given in steps).

Every forward pass runs on `ctx.device`; what comes back is a CPU float tensor (or a Python number), so that
selections (sorting, thresholds) happen on the host and are reproducible.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from securetl.cache import config_hash, plain
from securetl.encoders.obtain import digest
from securetl.interfaces import LabeledSet, Model, RunContext
from securetl.knowledge import split_holdout
from securetl.numerics import Numerics
from securetl.probe import (
    LossFn,
    Probe,
    _Tail,
    as_numerics,
    batched_forward,
    cross_entropy_loss,
    make_head,
    memo_forward,
    train_loop,
    trainable_copy,
)


def reference_model(encoder: nn.Module, train: LabeledSet, probe: Probe, ctx: RunContext) -> Model:
    """M0: the probe trained on all of D, from the same initialisation as the final model.

    Cached (kind `m0`): eleven defenses start from M0, and in a sweep they all train the same one for a cell (same
    encoder weights, training set, probe, seed and numerics). The artifact also holds the global RNG state the
    training left behind, restored on a hit, so that what a defense draws afterwards is what it would have drawn
    after training M0 itself: a hit and a miss give the same run, bit for bit."""
    key = config_hash(
        "m0",
        _weights_digest(encoder),
        digest(train.x),
        digest(train.y),
        plain(vars(probe)),
        ctx.seed,
        ctx.num_classes,
        ctx.num.record(),
    )
    cache = ctx.cache
    with cache.building("m0", key):
        state = cache.load_state("m0", key)
        if state is not None:
            rng = {k: state.pop(k) for k in [k for k in state if k.startswith(_RNG)]}
            model = _m0_skeleton(encoder, probe, state, ctx)
            model.load_state_dict(state, strict=True)
            _set_rng(rng)
            _record_m0(ctx, True, (cache.load_meta("m0", key) or {}).get("seconds"))
            return ctx.num.module(model.eval())
        start = time.perf_counter()
        model = probe.fit(encoder, train, ctx)
        seconds = round(time.perf_counter() - start, 3)
        meta = {"probe": plain(vars(probe)), "seconds": seconds}
        cache.save_state("m0", key, {**model.state_dict(), **_get_rng()}, meta)
        _record_m0(ctx, False, seconds)
        return model


def _record_m0(ctx: RunContext, cached: bool, seconds: float | None) -> None:
    """Whether M0 came from the cache and what training it cost (when that run trained it), so that a method's
    cost can be charged the same whichever method of a sweep trained the shared M0 first: `time:defense`
    includes M0's training only in the run that trained it."""
    ctx.diagnostics["m0/cached"] = cached
    if seconds is not None:
        ctx.diagnostics["m0/seconds"] = seconds


_RNG = "_rng/"


def _weights_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _get_rng() -> dict[str, Tensor]:
    out = {f"{_RNG}cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out |= {f"{_RNG}cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return out


def _set_rng(rng: dict[str, Tensor]) -> None:
    torch.set_rng_state(rng[f"{_RNG}cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith(f"{_RNG}cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _m0_skeleton(encoder: nn.Module, probe: Probe, state: dict[str, Tensor], ctx: RunContext) -> Model:
    """A Model shaped as `probe.fit` returns it, for `state` to be loaded into: the received encoder itself under a
    frozen probe (fit trains only the head), a trainable copy under fine-tuning."""
    d = state["head.0.mean"].shape[0]  # every head starts with its Standardize (probe.make_head)
    head = make_head(
        probe.kind if probe.frozen else probe.head, torch.zeros(2, d), ctx.num_classes, probe.hidden
    )
    return Model(encoder if probe.frozen else trainable_copy(encoder), head)


def features(model: Model, images: Tensor, ctx: RunContext, layer: str = "encoder") -> Tensor:
    """(N, D) CPU features of `images` under `model`: `encoder` (the head's input) or `logits`."""
    if layer == "encoder":
        return memo_forward(model.encoder, images, ctx)
    if layer == "logits":
        model.eval().to(ctx.device)
        return batched_forward(model, images, ctx.device)
    raise ValueError(f"layer={layer!r}; choose encoder or logits")


@dataclass
class Scope:
    """The trainable part of the downstream model under a probe: `start` is the first trainable encoder stage
    (None: a head on frozen features). `inputs` are what enters it, memoised on the host. `head`: M0's trained head
    for a scope `of_model` (the module is then a copy of M0's part), None for a fresh head of `head_kind`."""

    encoder: nn.Module
    start: int | None
    inputs: Tensor
    head_kind: str
    hidden: int
    head: nn.Module | None = None

    @classmethod
    def of(cls, encoder: nn.Module, probe: Probe, x: Tensor, ctx: RunContext) -> Scope:
        """The scope `probe` trains. finetune with trainable=all is treated as every stage trained on the
        normalised images (no augmentation: the memoised-input loop of the other modes)."""
        if probe.frozen:
            return cls(encoder, None, memo_forward(encoder, x, ctx), probe.kind, probe.hidden)
        n_top = {"last_stage": 1, "last2": 2}.get(probe.trainable)
        n = len(encoder.stages)
        start = n - n_top if n_top is not None and n > n_top else 0
        return cls(encoder, start, memo_forward(encoder, x, ctx, stop=start), probe.head, probe.hidden)

    @classmethod
    def of_model(
        cls, m0: Model, probe: Probe, x: Tensor, ctx: RunContext, stages: int | None = None
    ) -> Scope:
        """M0's scope, as trained: the part of M0 its probe trained (`stages` None), or M0's top `stages` encoder
        stages + head whatever the probe (ANP's and RNP's masks, which prune a frozen encoder too). The stages
        below are M0's own (the received encoder's: no probe trains them), so `inputs` are theirs."""
        if stages is None:
            scope = cls.of(m0.encoder, probe, x, ctx)
        else:
            start = max(0, len(m0.encoder.stages) - int(stages))
            inputs = memo_forward(m0.encoder, x, ctx, stop=start)
            scope = cls(m0.encoder, start, inputs, probe.head, probe.hidden)
        scope.head = m0.head
        return scope

    def inputs_for(self, x: Tensor, ctx: RunContext) -> Tensor:
        """What enters the scope for other images (e.g. the clean reserve), memoised the same way."""
        return memo_forward(self.encoder, x, ctx, stop=self.start)

    def module(self, num_classes: int, ctx: RunContext) -> nn.Module:
        """A trainable module on `ctx.device` (the scope's encoder and M0 are not touched): for a scope `of_model`
        a copy of M0's trained part (its top stages + head, a `_Tail`, or its head); else a fresh head
        (standardised on the training features; `num_classes` outputs) on a copy of the encoder's top stages."""
        if self.head is not None:
            part = self.head if self.start is None else _Tail(self.encoder, self.start, self.head)
            return ctx.num.module(trainable_copy(part))  # copies only the part, not the whole encoder
        if self.start is None:
            return make_head(self.head_kind, self.inputs, num_classes, self.hidden).to(ctx.device)
        enc = trainable_copy(self.encoder)
        with torch.no_grad():
            enc.eval().to(ctx.device)
            f = batched_forward(lambda h: enc.forward_from(h, self.start), self.inputs, ctx.device)
        head = make_head(self.head_kind, f, num_classes, self.hidden)
        return _Tail(enc, self.start, head).to(ctx.device)

    def model(self, module: nn.Module) -> Model:
        """Encoder + head for evaluation: under a frozen encoder the scope's encoder and the trained head; else a
        copy of the scope's encoder with the trained stages in place, frozen as the pipeline hands encoders out
        (the scope's encoder is not touched)."""
        if not isinstance(module, _Tail):
            return Model(self.encoder, module).eval()
        encoder = copy.deepcopy(self.encoder)
        for i, stage in enumerate(module.stages):
            encoder.stages[self.start + i] = stage
        encoder.requires_grad_(False)
        return Model(encoder, module.head).eval()

    @staticmethod
    def head_of(module: nn.Module) -> nn.Module:
        """The classification head of a scope module (the module itself under a frozen encoder)."""
        return module.head if isinstance(module, _Tail) else module

    @staticmethod
    def groups(module: nn.Module, probe: Probe, scale: float = 1.0) -> list[dict]:
        """The probe's optimiser groups for a scope module (as Probe.fit): the trainable stages at
        probe.encoder_lr, the head at probe.lr, both times `scale`."""
        if isinstance(module, _Tail):
            return [
                {"params": list(module.stages.parameters()), "lr": probe.encoder_lr * scale},
                {"params": list(module.head.parameters()), "lr": probe.lr * scale},
            ]
        return [{"params": list(module.parameters()), "lr": probe.lr * scale}]

    @staticmethod
    @torch.no_grad()
    def penultimate(module: nn.Module, inputs: Tensor, device: torch.device, batch: int = 512) -> Tensor:
        """The head's input under `module` (the pooled output of the last stage, or the frozen features), CPU."""
        module.eval().to(device)
        if isinstance(module, _Tail):
            return batched_forward(module.features, inputs, device, batch=batch)
        return inputs.float().clone()

    @staticmethod
    @torch.no_grad()
    def logits(module: nn.Module, inputs: Tensor, device: torch.device, batch: int = 512) -> Tensor:
        module.eval().to(device)
        return batched_forward(module, inputs, device, batch=batch)


@torch.no_grad()
def accuracy(
    module: nn.Module,
    inputs: Tensor,
    y: Tensor,
    where: RunContext | Numerics | torch.device | None = None,
    batch: int = 1024,
) -> float:
    """Share of `inputs` (memoised scope inputs) that `module`, in eval mode, classifies as `y`; NaN for none.
    `where`: the run's context or numerics (default: the policy of the inputs' device). One host read."""
    if len(y) == 0:
        return float("nan")
    num = Numerics.resolve(inputs.device) if where is None else as_numerics(where)
    module.eval()
    y = num.put(y)
    with num.autocast():
        correct = sum(
            (module(num.put(inputs[i : i + batch])).argmax(1) == y[i : i + batch]).sum()
            for i in range(0, len(y), batch)
        )
    return int(correct) / len(y)


def epochs_for(steps: int, n: int, batch_size: int) -> int:
    """Epochs over n samples that make at least `steps` optimiser steps (at least one epoch)."""
    return max(1, math.ceil(steps / steps_per_epoch(n, batch_size)))


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def train_steps(
    module: nn.Module,
    inputs: Tensor,
    y: Tensor,
    ctx: RunContext,
    g: torch.Generator,
    probe: Probe,
    *,
    steps: int,
    batch_size: int,
    lr_scale: float,
    weight_decay: float,
    loss_fn: LossFn = cross_entropy_loss,
    on_epoch_end: Callable[[int], bool | None] | None = None,
    schedule: str | None = None,
    desc: str = "finetune",
) -> int:
    """SGD (momentum 0.9) on a scope module at the probe's learning rates x `lr_scale` (constant, or `schedule`:
    train_loop's cosine), for the whole epochs that make `steps` updates (a schedule given in the reference's
    optimiser steps, on a smaller clean share); returns the epochs run."""
    epochs = epochs_for(steps, len(y), batch_size)
    train_loop(
        module,
        inputs,
        y,
        ctx,
        Scope.groups(module, probe, lr_scale),
        epochs=epochs,
        batch_size=batch_size,
        g=g,
        optimizer="sgd",
        weight_decay=weight_decay,
        loss_fn=loss_fn,
        on_epoch_end=on_epoch_end,
        schedule=schedule,
        desc=desc,
    )
    return epochs


# --------------------------------------------------------------------------- the clean share
def require_clean(ctx: RunContext, method: str, why: str = "") -> LabeledSet:
    """The defense's clean share (ctx.clean); a one-line ValueError, before any work, when it has none (the pipeline
    refuses clean_fraction=0 earlier with a ConfigError; this guards a direct call). `why` ends the message."""
    if ctx.clean is None or len(ctx.clean) == 0:
        raise ValueError(f"{method} needs the clean reserve (defense.clean_fraction > 0){why}")
    return ctx.clean


def clean_split(
    ctx: RunContext, method: str, holdout: float, g: torch.Generator, strict: bool = True
) -> tuple[LabeledSet, LabeledSet]:
    """(fit, holdout) of the defense's clean share: a class-balanced `holdout` fraction kept for its selection rules
    (thresholds, stopping, best epoch; BASELINES.md section 0: never test data), drawn from `g`. With one image of
    a class nothing of it can be held out: `strict` refuses a holdout left empty (a rule that needs one), else the
    empty holdout is returned and the caller falls back to a rule that needs none."""
    clean = require_clean(ctx, method)
    fit, held = split_holdout(clean, holdout, g)
    if strict and len(held) == 0:
        raise ValueError(
            f"{method}: the clean share ({len(clean)} images) leaves nothing for the holdout its selection rule needs "
            "(at least 2 images per class); raise defense.clean_fraction"
        )
    return fit, held
