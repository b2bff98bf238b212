"""Phase 3 — encoder channel filtering on the trainable part of the encoder (its last stage(s)).

  selective unlearning  maximise the loss on all of D, updating ONLY normalisation parameters, until the
                        accuracy on D falls below a threshold (cheap; breaks clean and backdoor behaviour);
  filter recovering     on the clean subset only, learn a mask m in [0, 1] per channel (init 1, clipped
                        after each step, L1 pull towards 0) that restores clean accuracy;
  channel filtering     channels with m >= sigma are trusted (chi); the rest (psi) were not needed for clean
                        recovery, which is where a backdoor lives.

A channel is a BatchNorm channel: the mask scales that BN's affine weight and bias (as in RNP's masked BN). The
masked BN, unlearning and mask recovery are the shared ones of defenses/_pruning.py (RNP and ANP use them too), the
accuracy check defenses/_features.accuracy (every baseline's).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from securetl.numerics import Numerics

from .._features import accuracy
from .._pruning import MaskedBN, mask_bns, masked_bns, unlearn_per_step, unmask
from .._pruning import recover_masks as _recover_masks

__all__ = [
    "MaskedBN",
    "Tail",
    "accuracy",
    "recover_masks",
    "reinit_untrusted",
    "unlearn",
    "unmask",
    "untrusted_from_masks",
]


class Tail(nn.Module):
    """The encoder's last stage(s) + a linear head, run on activations memoised at the stage boundary."""

    def __init__(self, stages: list[nn.Module], feat_dim: int, num_classes: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(copy.deepcopy(stages))
        for stage in self.stages:
            mask_bns(stage)
        for name, p in self.stages.named_parameters():
            p.requires_grad_(not name.endswith(".mask"))  # the encoder arrives frozen
        self.head = nn.Linear(feat_dim, num_classes)

    def features(self, h: Tensor) -> Tensor:
        for s in self.stages:
            h = s(h)
        return h.mean(dim=(2, 3)) if h.dim() == 4 else h

    def forward(self, h: Tensor) -> Tensor:
        return self.head(self.features(h))

    def bns(self) -> Iterator[tuple[str, MaskedBN]]:
        return masked_bns(self.stages)

    def masks(self) -> dict[str, Tensor]:
        return {n: m.mask.detach().clone() for n, m in self.bns()}

    def n_channels(self) -> int:
        return sum(m.num_features for _, m in self.bns())


def unlearn(
    tail: Tail,
    acts: Tensor,
    y: Tensor,
    g: torch.Generator,
    threshold: float = 0.2,
    lr: float = 0.01,
    batch_size: int = 128,
    max_steps: int = 500,
    check_every: int = 1,
    num: Numerics | None = None,
    majority_stop: bool = False,
) -> dict:
    """Gradient ascent on the CE loss over D, normalisation parameters only, until acc(D) < threshold (or, with
    `majority_stop`, no better than predicting D's most frequent label).

    Accuracy is checked after every step: with momentum, ten steps can carry it from above the threshold to
    half of it, and how far unlearning overshoots decides how many masks recovery pulls down."""
    params = [p for _, m in tail.bns() for p in (m.weight, m.bias)]
    info = unlearn_per_step(
        tail,
        acts,
        y,
        g,
        params,
        threshold=threshold,
        lr=lr,
        batch_size=batch_size,
        max_steps=max_steps,
        check_every=check_every,
        num=num or Numerics.resolve(acts.device),
        phase="tcore/unlearn",
        majority_stop=majority_stop,
    )
    for name, p in tail.named_parameters():
        p.requires_grad_(not name.endswith(".mask"))
    return {"unlearn_steps": info["steps"], "unlearn_acc": info["acc"]}


def recover_masks(
    tail: Tail,
    acts: Tensor,
    y: Tensor,
    g: torch.Generator,
    epochs: int = 10,
    lr: float = 0.1,
    l1: float = 1e-3,
    batch_size: int = 128,
    num: Numerics | None = None,
) -> dict[str, Tensor]:
    """Learn per-channel masks (everything else frozen) that restore accuracy on the clean subset, with an L1 pull
    towards 0; BN on the analysed model's running statistics."""
    _recover_masks(
        tail,
        acts,
        y,
        g,
        epochs=epochs,
        lr=lr,
        l1=l1,
        batch_size=batch_size,
        train_mode=False,
        num=num or Numerics.resolve(acts.device),
        phase="tcore/recover_masks",
    )
    return tail.masks()


def _producer_convs(stage_root: nn.Module) -> dict[str, nn.Conv2d]:
    """For each BN (by name), the conv whose output channels it normalises (the module just before it)."""
    out, prev_conv = {}, None
    for name, m in stage_root.named_modules():
        if isinstance(m, nn.Conv2d):
            prev_conv = m
        elif isinstance(m, MaskedBN) and prev_conv is not None and prev_conv.out_channels == m.num_features:
            out[name] = prev_conv
    return out


def reinit_untrusted(tail: Tail, untrusted: dict[str, Tensor], g: torch.Generator) -> dict[str, Tensor]:
    """Re-initialise psi: for each untrusted BN channel, its producing conv filter (Kaiming) and its BN
    parameters/statistics. Returns per-parameter gradient masks (1 = trainable psi, 0 = frozen chi)."""
    convs = _producer_convs(tail.stages)
    grad_masks: dict[str, Tensor] = {}
    named_params = dict(tail.stages.named_parameters())
    with torch.no_grad():
        for name, bn in tail.bns():
            bad = untrusted[name]
            bn.mask.fill_(1.0)
            conv = convs.get(name)
            if conv is not None and bad.any():
                # drawn on the host generator in NCHW order (the same draws on every device), then moved
                fresh = torch.empty(conv.weight.shape, dtype=conv.weight.dtype)
                fan_out = fresh.shape[0] * fresh[0, 0].numel()
                fresh.normal_(0, (2.0 / fan_out) ** 0.5, generator=g)
                conv.weight[bad] = fresh.to(conv.weight.device)[bad]
            bn.weight[bad] = 1.0
            bn.bias[bad] = 0.0
            bn.running_mean[bad] = 0.0
            bn.running_var[bad] = 1.0
            grad_masks[f"{name}.weight"] = bad.float()
            grad_masks[f"{name}.bias"] = bad.float()
            if conv is not None:
                cname = next(n for n, p in named_params.items() if p is conv.weight)
                grad_masks[cname] = (
                    bad.float().view(-1, *([1] * (conv.weight.dim() - 1))).expand_as(conv.weight).clone()
                )
    # every other stage parameter (none in a ResNet stage, but be safe) is frozen
    for pname in named_params:
        if pname.endswith(".mask"):
            continue
        grad_masks.setdefault(pname, torch.zeros_like(named_params[pname]))
    return grad_masks


def untrusted_from_masks(
    masks: dict[str, Tensor], sigma: float, max_fraction: float = 1.0
) -> dict[str, Tensor]:
    """Channels with mask < sigma are untrusted; at most `max_fraction` of all channels, the lowest masks first.

    The cap matters when recovery fails as a whole (every mask under sigma): re-initialising everything
    throws away what the pre-trained encoder knows; the lowest masks are still the least needed ones.
    A non-finite mask (a diverged recovery; the driver records it, securetl.guard.require_finite) counts as the
    lowest of all: read as-is, NaN >= sigma is False as well as NaN < sigma, and NaN masks became "0 untrusted"."""
    flat = torch.nan_to_num(torch.cat(list(masks.values())), nan=-1.0, posinf=-1.0, neginf=-1.0)
    below = flat < sigma
    limit = int(max_fraction * len(flat))
    if int(below.sum()) > limit:  # then the `limit` lowest masks are all under sigma
        below = torch.zeros_like(below)
        below[torch.argsort(flat, stable=True)[:limit]] = True
    return dict(zip(masks, torch.split(below, [len(m) for m in masks.values()])))
