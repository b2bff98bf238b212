"""ACC on the clean test set, and ASR for every distinct trigger that is in play; the same two for the
received encoder alone through a weighted kNN, as CTRL measures an encoder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from securetl.interfaces import LabeledSet, RunContext
from securetl.probe import batched_forward, memo_forward, predict

# CTRL's kNN monitor (meet-cjli/CTRL utils/knn.py, after Wu et al. 2018)
KNN_K, KNN_T = 200, 0.1


@dataclass
class TriggerEval:
    """One trigger to measure: how to apply it at test time, its target, and which samples count."""

    source: str  # "data", "encoder", "shared" (Threat-3) or "reference" (clean run, for a baseline ASR)
    apply: Callable[[Tensor], Tensor]
    target: int
    mask: Callable[[Tensor], Tensor]
    definition: str


def accuracy(pred: Tensor, y: Tensor) -> float:
    return float((pred == y).float().mean()) if len(y) else float("nan")


def counted(test: LabeledSet, t: TriggerEval) -> Tensor:
    """The test images that count for `t`'s ASR."""
    keep = t.mask(test.y)
    if not keep.any():
        raise ValueError(f"no test sample counts for the {t.source} ASR ({t.definition})")
    return test.x[keep]


def attack_success_rate(model: nn.Module, test: LabeledSet, t: TriggerEval, ctx: RunContext) -> float:
    pred = predict(model, counted(test, t), ctx, transform=t.apply)
    return float((pred == t.target).float().mean())


def evaluate(
    model: nn.Module, test: LabeledSet, triggers: list[TriggerEval], ctx: RunContext
) -> dict[str, float | str]:
    """`acc`, `asr` (the first trigger's: the data attack's when there is one) and `asr/<source>` for each."""
    out: dict[str, float | str] = {"acc": accuracy(predict(model, test.x, ctx), test.y)}
    for i, t in enumerate(triggers):
        asr = attack_success_rate(model, test, t, ctx)
        out[f"asr/{t.source}"] = asr
        if i == 0:
            out["asr"] = asr
            out["asr_definition"] = t.definition
            out["asr_source"] = t.source
    return out


def knn_predict(
    query: Tensor, bank: Tensor, bank_y: Tensor, num_classes: int, k: int = KNN_K, t: float = KNN_T
) -> Tensor:
    """Weighted kNN on cosine similarity: each of the k bank samples most similar to a query votes for its
    label with weight exp(similarity / t)."""
    q, b = F.normalize(query, dim=1), F.normalize(bank, dim=1)
    out = []
    for i in range(0, len(q), 1024):
        sim, idx = (q[i : i + 1024] @ b.T).topk(min(k, len(b)), dim=1)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        out.append(votes.scatter_add_(1, bank_y[idx], (sim / t).exp()).argmax(1))
    return torch.cat(out).cpu() if out else torch.empty(0, dtype=torch.long)


def knn_evaluate(
    encoder: nn.Module, bank: LabeledSet, test: LabeledSet, triggers: list[TriggerEval], ctx: RunContext
) -> dict[str, float]:
    """`knn_acc` and `knn_asr` (+ `knn_asr/<source>`) of an encoder with no probe: test embeddings are
    labelled by their neighbours among the clean downstream training set's. This is how CTRL scores an
    encoder (SSL-Backdoor's code has a plain-vote kNN too), and it tells whether a trigger moved embeddings
    to the target at all, whatever a probe makes of them."""
    put = ctx.num.put  # the similarity search runs where the features are computed
    ctx.num.module(encoder.eval())
    bank_f, bank_y = put(memo_forward(encoder, bank.x, ctx, on_device=True)), put(bank.y)
    test_f = put(memo_forward(encoder, test.x, ctx, on_device=True))
    out = {"knn_acc": accuracy(knn_predict(test_f, bank_f, bank_y, ctx.num_classes), test.y)}
    for i, t in enumerate(triggers):
        f = batched_forward(encoder, counted(test, t), ctx, keep_on_device=True, transform=t.apply)
        asr = float((knn_predict(f, bank_f, bank_y, ctx.num_classes) == t.target).float().mean())
        out[f"knn_asr/{t.source}"] = asr
        if i == 0:
            out["knn_asr"] = asr
    return out


def targets_of(y: Tensor) -> Tensor:
    return torch.unique(y)
