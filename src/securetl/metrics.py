"""ACC on the clean test set, and ASR for every distinct trigger that is in play."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from securetl.interfaces import LabeledSet, RunContext
from securetl.probe import predict


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


def attack_success_rate(model: nn.Module, test: LabeledSet, t: TriggerEval, ctx: RunContext) -> float:
    keep = t.mask(test.y)
    if not keep.any():
        raise ValueError(f"no test sample counts for the {t.source} ASR ({t.definition})")
    pred = predict(model, test.x[keep], ctx, transform=t.apply)
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


def targets_of(y: Tensor) -> Tensor:
    return torch.unique(y)
