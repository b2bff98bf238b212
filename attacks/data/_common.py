"""Shared helpers for data attacks: rate checks and choosing which samples to poison."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from securetl.interfaces import to_float, to_uint8
from securetl.validate import DataSizes


def check_rate(name: str, rate: float) -> float:
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(
            f"data_attack.{name}={rate} must lie in [0, 1] (a fraction of the whole training set)"
        )
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


def need(k: int, available: int, setting: str, what: str) -> None:
    """Refuse, before any training, a draw of `k` images where only `available` are eligible."""
    if k > available:
        raise ValueError(f"{setting} asks for {k} {what}, but only {available} are eligible")


def check_poison_draw(
    attack, sizes: DataSizes, extra: float = 0.0, extra_setting: str = "", extra_what: str = ""
) -> None:
    """The draw most data attacks make, checked against the dataset's class counts: count_for(poison_rate, n)
    poisons from the classes other than the target (every class with exclude_target off), then `extra` (a
    fraction of n: cover or noise-mode samples) from the images left over."""
    n = sizes.n_train
    k = count_for(attack.poison_rate, n)
    pool = n - sizes.train[attack.target] if attack.exclude_target else n
    where = " outside the target class" if attack.exclude_target else ""
    need(k, pool, f"data_attack.poison_rate={attack.poison_rate}", f"poisons of {n} training images{where}")
    if extra:
        need(count_for(extra, n), n - k, extra_setting, f"{extra_what} besides the {k} poisons")


def check_class(name: str, c: int, num_classes: int) -> None:
    if not 0 <= int(c) < num_classes:
        raise ValueError(f"data_attack.{name}={c} but the dataset has {num_classes} classes")


def indices_where(mask: Tensor) -> Tensor:
    return torch.nonzero(mask).squeeze(1)


def outside(n: int, taken: Tensor) -> Tensor:
    """Indices of 0..n-1 that are not in `taken` (cover samples never overlap poisons)."""
    free = torch.ones(n, dtype=torch.bool)
    free[taken] = False
    return indices_where(free)


def transform_uint8(x: Tensor, fn: Callable[[Tensor, slice], Tensor], batch: int = 4096) -> Tensor:
    """Apply `fn(float_batch, rows)` to uint8 images in batches; `rows` tells a per-sample fn which
    samples the batch holds (e.g. to index per-sample masks drawn beforehand)."""
    out = torch.empty_like(x)
    for i in range(0, len(x), batch):
        rows = slice(i, min(i + batch, len(x)))
        out[rows] = to_uint8(fn(to_float(x[rows]), rows))
    return out
