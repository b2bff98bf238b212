"""What the training-time suppression baselines (ABL, DBD, ASD; BASELINES.md 2.7-2.9) share: the probe's trainable
scope as their model, its optimiser groups, their losses, and the Model they hand back.

These methods own training (they override `Defense.train`): they train the part of the downstream model the probe
trains (`Scope`: a head on memoised frozen features, or the encoder's top stages and a head on the memoised
activations entering them), initialised as the probe initialises it, and return encoder + head as `Probe.fit`
does. Loss-based splits live in defenses/_splits.py, the MixMatch step in defenses/_mixmatch.py.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from securetl.interfaces import Model, RunContext
from securetl.probe import LossFn, Probe, _Tail, symmetric_ce

from ._features import Scope


def head_of(module: nn.Module) -> nn.Module:
    """The classification head of a scope module (the module itself under a frozen-encoder probe)."""
    return module.head if isinstance(module, _Tail) else module


def param_groups(module: nn.Module, probe: Probe, scale: float = 1.0) -> list[dict]:
    """The probe's optimiser groups for a scope module: the head at probe.lr, trainable stages at
    probe.encoder_lr (as Probe.fit), both times `scale`."""
    if isinstance(module, _Tail):
        return [
            {"params": list(module.stages.parameters()), "lr": probe.encoder_lr * scale},
            {"params": list(module.head.parameters()), "lr": probe.lr * scale},
        ]
    return [{"params": list(module.parameters()), "lr": probe.lr * scale}]


def to_model(scope: Scope, module: nn.Module) -> Model:
    """Encoder + head for evaluation: under fine-tuning a copy of the received encoder with the trained top stages
    in place (the received encoder is not touched), else the received encoder and the trained head."""
    if not isinstance(module, _Tail):
        return Model(scope.encoder, module).eval()
    encoder = copy.deepcopy(scope.encoder)
    for i, stage in enumerate(module.stages):
        encoder.stages[scope.start + i] = stage
    return Model(encoder, module.head).eval()


@torch.no_grad()
def accuracy(module: nn.Module, inputs: Tensor, y: Tensor, ctx: RunContext) -> float:
    """Share of `inputs` (scope inputs) the module classifies as `y`."""
    if len(y) == 0:
        return float("nan")
    pred = Scope.logits(module, inputs, ctx.device).argmax(1)
    return float((pred == y).float().mean())


# --------------------------------------------------------------------------- losses (train_loop's loss_fn)
def lga_loss(gamma: float) -> LossFn:
    """ABL's local gradient ascent on a batch: sign(CE - gamma) * CE, so the batch loss is held near gamma
    (bboylyg/ABL backdoor_isolation.train_step)."""

    def fn(module: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
        ce = F.cross_entropy(module(xb).float(), yb)
        return torch.sign(ce - gamma) * ce

    return fn


def flooding_loss(level: float) -> LossFn:
    """Flooding (Ishida et al., 2020), both ABL codes' default: |CE - b| + b."""

    def fn(module: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
        ce = F.cross_entropy(module(xb).float(), yb)
        return (ce - level).abs() + level

    return fn


def ascent_loss(module: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
    """Gradient ascent on CE (ABL's unlearning)."""
    return -F.cross_entropy(module(xb).float(), yb)


def sce_loss(alpha: float, beta: float) -> LossFn:
    """Symmetric CE (DBD's warm-up loss)."""

    def fn(module: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
        return symmetric_ce(module(xb), yb, alpha, beta)

    return fn
