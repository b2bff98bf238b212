"""Shared helpers for data attacks: rate checks and choosing which samples to poison."""

from __future__ import annotations

import torch
from torch import Tensor


def check_rate(name: str, rate: float) -> float:
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"data_attack.{name}={rate} must lie in [0, 1] (a fraction of the whole training set)")
    return rate


def count_for(rate: float, n: int) -> int:
    """Number of samples a rate means: always a fraction of the WHOLE training set."""
    return int(round(rate * n))


def choose(candidates: Tensor, k: int, generator: torch.Generator, what: str = "poison") -> Tensor:
    """`k` indices drawn without replacement from `candidates` (sorted, for stable diagnostics)."""
    if k > len(candidates):
        raise ValueError(f"asked for {k} {what} samples but only {len(candidates)} are eligible")
    pick = candidates[torch.randperm(len(candidates), generator=generator)[:k]]
    return pick.sort().values
