"""Patch triggers (BadNets, BadEncoder, SSL-Backdoor): a small image pasted at a fixed place."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from securetl.interfaces import Trigger

LOCATIONS = ("bottom_right", "bottom_left", "top_right", "top_left", "center")


def patch_pattern(pattern: str, size: int, channels: int = 3, seed: int = 0) -> Tensor:
    """A (C, size, size) pattern in [0, 1]."""
    if pattern == "white":
        return torch.ones(channels, size, size)
    if pattern == "black":
        return torch.zeros(channels, size, size)
    if pattern == "checkerboard":
        # BadNets-style: alternating black/white pixels, bottom-right pixel white
        ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        board = ((ii + jj + size + size) % 2 == 0).float()
        return board.expand(channels, size, size).clone()
    if pattern == "random":
        return torch.rand(channels, size, size, generator=torch.Generator().manual_seed(seed))
    if pattern == "htba":
        # a random 4 x 4 colour matrix resized bilinearly: colour blobs like the HTBA trigger images
        # (Saha et al., AAAI 2020) that SSL-Backdoor pastes, not pixel noise
        cells = torch.rand(1, channels, 4, 4, generator=torch.Generator().manual_seed(seed))
        return F.interpolate(cells, size=(size, size), mode="bilinear", align_corners=False)[0]
    raise ValueError(f"unknown patch pattern {pattern!r}; choose white, black, checkerboard, random or htba")


class PatchTrigger(Trigger):
    """Paste a `size`x`size` `pattern` at `location`, `margin` pixels from the border.

    size: side in pixels; pattern: white | black | checkerboard | random | htba (the last two seeded by
    `seed`).
    """

    def __init__(
        self,
        size: int = 3,
        pattern: str = "checkerboard",
        location: str = "bottom_right",
        margin: int = 0,
        seed: int = 0,
    ) -> None:
        if size < 1:
            raise ValueError(f"trigger.size must be >= 1, got {size}")
        if location not in LOCATIONS:
            raise ValueError(f"trigger.location={location!r}; choose from {LOCATIONS}")
        self.size, self.location, self.margin = size, location, margin
        self.pattern = patch_pattern(pattern, size, seed=seed)

    def _box(self, h: int, w: int) -> tuple[int, int]:
        s, m = self.size, self.margin
        if s + m > min(h, w):
            raise ValueError(f"a {s}px patch with margin {m} does not fit a {h}x{w} image")
        rows = {"top": m, "bottom": h - s - m, "center": (h - s) // 2}
        cols = {"left": m, "right": w - s - m, "center": (w - s) // 2}
        if self.location == "center":
            return rows["center"], cols["center"]
        r, c = self.location.split("_")
        return rows[r], cols[c]

    def apply(self, x: Tensor) -> Tensor:
        r, c = self._box(x.shape[-2], x.shape[-1])
        out = x.clone()
        out[..., r : r + self.size, c : c + self.size] = self.pattern.to(x.device, x.dtype)[: x.shape[-3]]
        return out
