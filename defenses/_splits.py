"""Loss-based splits (BASELINES.md section 3, `split_by_loss`): which samples a method trusts, ranked by a score
where lower means "more likely clean". One implementation for DBD, ASD and T-Core's bootstrapping.

`lowest`             the k lowest scores (ASD's and DBD's class-agnostic split with k = int(epsilon |D|))
`global_split`       the lowest `ratio` of all samples, whatever their class (SCLBD/DBD data/utils.get_semi_idx,
                     KuofengGao/ASD ASD.class_agnostic_loss_guided_split)
`class_aware_split`  the k_c lowest of every class c (ASD.class_aware_loss_guided_split; T-Core's balanced quota)
`capped_split`       the k lowest of all samples, no class beyond its cap (T-Core's top-up step)
`meta_scores`        the loss reduction after a virtual training step, lowest first (ASD.meta_split; T-Core's
                     meta-guided expansion), or T-Core's rank sum
`meta_split`         the lowest `ratio` of the meta score

Every function returns positions into `score` (host tensors): callers map them to dataset indices.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lowest(score: Tensor, k: int) -> Tensor:
    """Positions of the k lowest scores, lowest first."""
    return torch.argsort(score)[: max(0, int(k))]


def global_split(score: Tensor, ratio: float) -> Tensor:
    """The lowest int(ratio * n) scores (the originals' `int(len(loss) * ratio)`)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"split ratio={ratio} must lie in [0, 1]")
    return lowest(score, int(len(score) * ratio))


def class_aware_split(score: Tensor, y: Tensor, per_class: int | Tensor) -> Tensor:
    """Positions of the `per_class[c]` lowest scores of every class c (an int: the same count for every class;
    a class with fewer samples gives all it has), concatenated in class order."""
    n_classes = int(y.max()) + 1 if len(y) else 0
    counts = torch.as_tensor(per_class, dtype=torch.long)
    if counts.dim() == 0:
        counts = counts.repeat(n_classes)
    chosen = []
    for c in range(len(counts)):
        if int(counts[c]) <= 0:
            continue
        in_c = torch.nonzero(y == c).squeeze(1)
        chosen.append(in_c[lowest(score[in_c], int(counts[c]))])
    return torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.long)


def capped_split(score: Tensor, y: Tensor, caps: Tensor, k: int) -> Tensor:
    """Positions of the k lowest scores whatever their class, except that class c gives at most caps[c]
    (a class already at its cap gives nothing), lowest first."""
    order = torch.argsort(score, stable=True)
    cls = y[order]
    # rank of each sample inside its class, in score order: 0 for its class's lowest
    rank = torch.zeros(len(order), dtype=torch.long)
    for c in torch.unique(cls):
        at = torch.nonzero(cls == c).squeeze(1)
        rank[at] = torch.arange(len(at))
    caps = torch.as_tensor(caps, dtype=torch.long)
    return order[rank < caps[cls]][: max(0, int(k))]


def _ranks(x: Tensor) -> Tensor:
    """0 for the smallest value, len - 1 for the largest."""
    r = torch.empty(len(x), dtype=torch.long)
    r[torch.argsort(x, stable=True)] = torch.arange(len(x))
    return r


def meta_scores(loss1: Tensor, loss2: Tensor, mode: str = "reduction") -> Tensor:
    """The meta split's score, lowest first: the loss reduction loss1 - loss2 after a virtual model trained briefly
    on all of D (poison, learned fast, falls most: the smallest reduction is the most trusted), or (T-Core's
    rank_sum) the reduction's rank plus loss1's rank."""
    if mode not in ("reduction", "rank_sum"):
        raise ValueError(f"meta score mode={mode!r}; choose reduction or rank_sum")
    reduction = loss1 - loss2
    return reduction if mode == "reduction" else _ranks(reduction) + _ranks(loss1)


def meta_split(loss_before: Tensor, loss_after: Tensor, ratio: float) -> Tensor:
    """ASD's meta split: the lowest `ratio` of the loss reduction (KuofengGao/ASD ASD.meta_split)."""
    return global_split(meta_scores(loss_before, loss_after), ratio)
