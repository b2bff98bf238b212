"""The WaNet trigger (Nguyen & Tran, ICLR 2021): a fixed, smooth, random warping field.

As in the authors' release (VinAIResearch/Warping-based_Backdoor_Attack-release, train.py):
a k x k field of uniform noise in [-1, 1], normalised by its mean absolute value, upsampled bicubically
to the image size; the sampling grid is  clamp((identity + s * noise / size) * grid_rescale, -1, 1)
and the image is resampled with `grid_sample(..., align_corners=True)`.
"Noise mode" (cross) samples use that grid plus per-sample uniform noise in [-1, 1] / size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from securetl.interfaces import Trigger


class WarpTrigger(Trigger):
    """k: control-grid side; s: warping strength; grid_rescale: shrink the grid (<= 1) to stay inside
    the image; seed: draws the control grid."""

    def __init__(self, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0, seed: int = 0) -> None:
        if int(k) < 2:
            raise ValueError(f"trigger.k={k} must be >= 2 (side of the random control grid)")
        if float(s) <= 0:
            raise ValueError(f"trigger.s={s} must be > 0 (warping strength)")
        if not 0 < float(grid_rescale) <= 1:
            raise ValueError(f"trigger.grid_rescale={grid_rescale} must lie in (0, 1]")
        self.k, self.s, self.grid_rescale, self.seed = int(k), float(s), float(grid_rescale), int(seed)
        g = torch.Generator().manual_seed(self.seed)
        ins = torch.rand(1, 2, self.k, self.k, generator=g) * 2 - 1
        self._control = ins / ins.abs().mean()
        self._grids: dict[tuple[int, int], Tensor] = {}

    def grid(self, h: int, w: int) -> Tensor:
        """The (1, h, w, 2) sampling grid (x, y in [-1, 1]) for images of this size, cached on the CPU."""
        if (h, w) not in self._grids:
            noise = F.interpolate(self._control, size=(h, w), mode="bicubic", align_corners=True)
            noise = noise.permute(0, 2, 3, 1)  # (1, h, w, 2): channel 0 moves x, channel 1 moves y
            gy, gx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
            identity = torch.stack((gx, gy), dim=-1)[None]
            size = torch.tensor([w, h], dtype=torch.float32)
            grid = (identity + self.s * noise / size) * self.grid_rescale
            self._grids[(h, w)] = grid.clamp(-1, 1)
        return self._grids[(h, w)]

    def _sample(self, x: Tensor, grid: Tensor) -> Tensor:
        out = F.grid_sample(
            x, grid.to(x.device, x.dtype), mode="bilinear", padding_mode="zeros", align_corners=True
        )
        return out.clamp_(0, 1)

    def apply(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        return self._sample(x, self.grid(h, w).expand(len(x), -1, -1, -1))

    def apply_noisy(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """WaNet's noise mode: the trigger grid plus per-sample uniform noise of one pixel at most."""
        h, w = x.shape[-2:]
        size = torch.tensor([w, h], dtype=torch.float32)
        ins = (torch.rand(len(x), h, w, 2, generator=generator) * 2 - 1) / size
        return self._sample(x, (self.grid(h, w) + ins).clamp(-1, 1))
