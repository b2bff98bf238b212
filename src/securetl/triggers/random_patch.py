"""A patch pasted at a random place per image (SSL-Backdoor, Saha et al. CVPR 2022; CorruptEncoder's
test-time trigger): the location of each image's patch is drawn from its own seeded generator, so the
trigger stays a deterministic function of the batch, as every Trigger must be.
"""

from __future__ import annotations

import torch
from torch import Tensor

from securetl.interfaces import Trigger
from securetl.triggers.patch import patch_pattern


def paste_at(x: Tensor, patch: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Paste `patch` into every image of `x` (N, C, H, W) with its top-left corner at (rows[i], cols[i]);
    one gather, no per-image loop. `patch` is one (C, s, s) pattern for all, or (N, C, s, s): one each."""
    n, _, h, w = x.shape
    s = patch.shape[-1]
    ii = torch.arange(h, device=x.device).view(1, h, 1) - rows.to(x.device).view(n, 1, 1)
    jj = torch.arange(w, device=x.device).view(1, 1, w) - cols.to(x.device).view(n, 1, 1)
    inside = ((ii >= 0) & (ii < s) & (jj >= 0) & (jj < s)).unsqueeze(1)  # (N, 1, H, W)
    patch = patch.to(x.device, x.dtype)
    ii, jj = ii.clamp(0, s - 1), jj.clamp(0, s - 1)
    if patch.dim() == 3:
        src = patch[:, ii, jj].transpose(0, 1)  # (C, N, H, W) -> (N, C, H, W)
    else:
        src = patch[torch.arange(n, device=x.device).view(n, 1, 1), :, ii, jj].permute(0, 3, 1, 2)
    return torch.where(inside, src, x)


def random_corners(
    n: int, h: int, w: int, size: int, lo: float, hi: float, g: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Top-left corners so that the whole patch lies in the [lo, hi] fraction of each side (SSL-Backdoor's
    location_min / location_max); falls back to the nearest fitting place on small images."""

    def draw(side: int) -> Tensor:
        first = int(lo * side)
        last = max(first, min(int(hi * side) - size, side - size))
        first = min(first, side - size)
        return torch.randint(first, last + 1, (n,), generator=g)

    return draw(h), draw(w)


class RandomPatchTrigger(Trigger):
    """size: patch side in pixels; pattern: white | black | checkerboard | random | htba (see PatchTrigger);
    location_min / location_max: the patch lies inside this fraction of each side; seed: draws the
    random pattern and the locations (image i of every call gets the same place)."""

    def __init__(
        self,
        size: int = 8,
        pattern: str = "random",
        location_min: float = 0.1,
        location_max: float = 0.9,
        seed: int = 0,
    ) -> None:
        if size < 1:
            raise ValueError(f"trigger.size must be >= 1, got {size}")
        if not 0.0 <= location_min < location_max <= 1.0:
            raise ValueError(
                f"need 0 <= trigger.location_min < trigger.location_max <= 1, got {location_min}, {location_max}"
            )
        self.size, self.seed = int(size), int(seed)
        self.location_min, self.location_max = float(location_min), float(location_max)
        self.pattern = patch_pattern(pattern, self.size, seed=self.seed)

    def paste_random(
        self,
        x: Tensor,
        g: torch.Generator,
        location_min: float | None = None,
        location_max: float | None = None,
    ) -> Tensor:
        """Paste at places drawn from `g` within [location_min, location_max] (default: the trigger's)."""
        h, w = x.shape[-2:]
        if self.size > min(h, w):
            raise ValueError(f"a {self.size}px patch does not fit a {h}x{w} image")
        lo = self.location_min if location_min is None else location_min
        hi = self.location_max if location_max is None else location_max
        rows, cols = random_corners(len(x), h, w, self.size, lo, hi, g)
        return paste_at(x, self.pattern[: x.shape[-3]], rows, cols)

    def apply(self, x: Tensor) -> Tensor:
        return self.paste_random(x, torch.Generator().manual_seed(self.seed))
