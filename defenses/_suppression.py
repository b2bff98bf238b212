"""The losses of the training-time suppression baselines (ABL, DBD, ASD; BASELINES.md 2.7-2.9), as
securetl.probe.train_loop's `loss_fn`.

These methods own training (they override `Defense.train`): they train the part of the downstream model the probe
trains (defenses/_features.Scope: a head on memoised frozen features, or the encoder's top stages and a head on the
memoised activations entering them), initialised as the probe initialises it, and return encoder + head as
`Probe.fit` does. Loss-based splits live in defenses/_splits.py, the MixMatch step in defenses/_mixmatch.py,
gradient ascent (ABL's unlearning) in defenses/_pruning.unlearn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from securetl.probe import LossFn, symmetric_ce


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


def sce_loss(alpha: float, beta: float) -> LossFn:
    """Symmetric CE (DBD's warm-up loss)."""

    def fn(module: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
        return symmetric_ce(module(xb), yb, alpha, beta)

    return fn
