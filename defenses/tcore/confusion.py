"""Phase 2 — seed expansion by confusion training (after Qi et al., "Towards a proactive ML approach for
detecting backdoor poison samples", USENIX Security 2023, as T-Core uses it).

A model is trained on all of D with its labels while, in the same steps, it is trained on the trusted set
with randomly re-drawn WRONG labels (weight lambda). The confusion batches destroy the semantic mapping,
so clean samples end with a high loss; a backdoor shortcut does not depend on semantics and stays fitted,
so poisoned samples keep a low loss. The highest-loss samples of each class join the clean subset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from securetl import guard
from securetl.numerics import Numerics


def _mlp(d: int, hidden: int, c: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, c))


def confusion_losses(
    feats: Tensor,
    y: Tensor,
    trusted_idx: Tensor,
    num_classes: int,
    g: torch.Generator,
    lam: float = 20.0,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 256,
    hidden: int = 256,
    num: Numerics | None = None,
) -> Tensor:
    """Per-sample loss of D (on the host) under a model confusion-trained with `trusted_idx` (features
    already standardised). `num`: where and in what precision to train (default: the features' device)."""
    num = num or Numerics.resolve(feats.device)
    model = num.module(_mlp(feats.shape[1], hidden, num_classes))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    watch = guard.Watch("tcore/confusion", model, opt)
    feats, yd, trusted = num.resident(feats), num.put(y), num.put(trusted_idx)
    n = len(y)
    for epoch in range(epochs):
        watch.begin()
        perm = num.put(torch.randperm(n, generator=g))
        for s in range(0, n, batch_size):
            b = perm[s : s + batch_size]
            cb = trusted[num.put(torch.randint(0, len(trusted_idx), (len(b),), generator=g))]
            # a wrong label for every confusion sample: shift the true label by 1..C-1
            wrong = (yd[cb] + num.put(torch.randint(1, num_classes, (len(cb),), generator=g))) % num_classes
            with num.autocast():
                loss = (
                    F.cross_entropy(model(feats[b]), yd[b]) + lam * F.cross_entropy(model(feats[cb]), wrong)
                ) / (1 + lam)
            watch.observe(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if watch.end(epoch + 1) == guard.STOP:
            break
    with torch.no_grad(), num.autocast():
        return F.cross_entropy(model(feats).float(), yd, reduction="none").cpu()


@dataclass
class ExpansionResult:
    subset_idx: Tensor
    rounds: list[Tensor] = field(default_factory=list)  # the subset after each round


def expand_seed(
    feats: Tensor,
    y: Tensor,
    seed_idx: Tensor,
    num_classes: int,
    g: torch.Generator,
    fractions: tuple[float, ...] = (0.15, 0.3, 0.45),
    exclude: Tensor | None = None,
    **kw,
) -> ExpansionResult:
    """Grow the seed in rounds: after round r each class holds its highest-loss samples, as many as
    `fractions[r]` of the MEDIAN class size (plus the seed). Counting from the median keeps the subset
    balanced: a dirty-label attack inflates its target class, and a per-class fraction would draw
    proportionally more from exactly the class that holds the poison. Features are standardised here.
    `exclude`: samples that may not join (TIS's abnormally dense ones), unless a class would have none left."""
    f = (feats - feats.mean(0)) / feats.std(0).clamp_min(1e-6)
    subset = seed_idx.clone()
    rounds = []
    median = float(torch.bincount(y, minlength=num_classes).float().median())
    blocked = torch.zeros(len(y), dtype=torch.bool)
    if exclude is not None:
        blocked[exclude] = True
    for frac in fractions:
        loss = confusion_losses(f, y, subset, num_classes, g, **kw)
        chosen = [subset]
        for c in range(num_classes):
            idx = torch.nonzero(y == c).squeeze(1)
            if len(idx) == 0:
                continue
            allowed = idx[~blocked[idx]]
            idx = allowed if len(allowed) > 0 else idx
            k = min(len(idx), int(round(frac * median)))
            chosen.append(idx[torch.argsort(loss[idx], descending=True)[:k]])
        subset = torch.unique(torch.cat(chosen))
        rounds.append(subset.clone())
    return ExpansionResult(subset, rounds)
