"""The SIG trigger (Barni, Kallas & Tondi, ICIP 2019): a horizontal sinusoidal signal added to the image.

x'[c, i, j] = clip(x[c, i, j] + delta * sin(2 pi j f / m)), with m the number of columns: the same
signal on every row and channel, as in the authors' definition and in BackdoorBench / backdoor-toolbox.
"""

from __future__ import annotations

import math
from copy import copy

import torch
from torch import Tensor

from securetl.interfaces import Trigger


def check_delta(name: str, delta: float) -> float:
    delta = float(delta)
    if not 0.0 < delta <= 1.0:
        raise ValueError(
            f"{name}={delta} must lie in (0, 1] (amplitude on the [0, 1] pixel scale, e.g. 40/255)"
        )
    return delta


class SinusoidTrigger(Trigger):
    """delta: amplitude on the [0, 1] scale (BackdoorBench's sig_delta=40 is 40/255); f: periods per width."""

    def __init__(self, delta: float = 40 / 255, f: float = 6) -> None:
        self.delta = check_delta("trigger.delta", delta)
        self.f = float(f)
        if self.f <= 0:
            raise ValueError(f"trigger.f={f} must be > 0 (periods of the sinusoid across the image width)")

    def signal(self, w: int, device=None, dtype=torch.float32) -> Tensor:
        j = torch.arange(w, device=device, dtype=torch.float64)
        return (self.delta * torch.sin(2 * math.pi * j * self.f / w)).to(dtype)

    def with_delta(self, delta: float) -> SinusoidTrigger:
        other = copy(self)
        other.delta = check_delta("delta", delta)
        return other

    def apply(self, x: Tensor) -> Tensor:
        return (x + self.signal(x.shape[-1], x.device, x.dtype)).clamp_(0, 1)
