"""A set of patch triggers (Adap-Patch, Qi et al. ICLR 2023): k patches at different places.

`apply` stamps all of them (the test-time trigger); `apply_subset` stamps, per sample, only the
patches chosen for it, each with its own opacity (Adap-Patch's training poisons carry one patch at a
low opacity, backdoor-toolbox's poison_tool_box/adaptive_patch.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from securetl.interfaces import Trigger
from securetl.triggers.blend import check_alpha
from securetl.triggers.patch import PatchTrigger


class PatchSetTrigger(Trigger):
    """size: side of every patch; patterns/locations: one entry per patch (see PatchTrigger);
    margin: pixels from the border; alpha: opacity of the full (test-time) trigger; seed: seeds
    `random` patterns (patch j uses seed + j)."""

    def __init__(
        self,
        size: int = 4,
        patterns: Sequence[str] = ("random", "checkerboard", "random", "random"),
        locations: Sequence[str] = ("top_left", "top_right", "bottom_left", "bottom_right"),
        margin: int = 1,
        alpha: float = 1.0,
        seed: int = 0,
    ) -> None:
        patterns, locations = list(patterns), list(locations)
        if not patterns or len(patterns) != len(locations):
            raise ValueError(
                f"trigger.patterns ({len(patterns)}) and trigger.locations ({len(locations)}) "
                "must list one entry per patch"
            )
        if len(set(locations)) != len(locations):
            raise ValueError(f"trigger.locations={locations} must be distinct (patches would overlap)")
        self.patches = [
            PatchTrigger(size=size, pattern=p, location=loc, margin=margin, seed=int(seed) + j)
            for j, (p, loc) in enumerate(zip(patterns, locations))
        ]
        self.size = int(size)
        self.alpha = check_alpha("trigger.alpha", alpha)

    @property
    def k(self) -> int:
        return len(self.patches)

    def apply_subset(
        self, x: Tensor, chosen: Tensor | None = None, alphas: Sequence[float] | None = None
    ) -> Tensor:
        """Stamp patch j on the rows where `chosen[:, j]` (all rows if None) with opacity `alphas[j]`
        (the trigger's `alpha` if None)."""
        if chosen is not None and tuple(chosen.shape) != (len(x), self.k):
            raise ValueError(f"chosen must be (N, {self.k}), got {tuple(chosen.shape)}")
        out = x.clone()
        h, w = x.shape[-2:]
        s = self.size
        for j, p in enumerate(self.patches):
            r, c = p._box(h, w)
            a = self.alpha if alphas is None else float(alphas[j])
            rows = slice(None) if chosen is None else chosen[:, j].to(x.device)
            region = out[rows, :, r : r + s, c : c + s]
            mark = p.pattern.to(x.device, x.dtype)[: x.shape[-3]]
            out[rows, :, r : r + s, c : c + s] = region + a * (mark - region)
        return out.clamp_(0, 1)

    def apply(self, x: Tensor) -> Tensor:
        return self.apply_subset(x)
