"""CTRL's frequency-domain trigger (Li et al., ICCV 2023): a fixed perturbation of chosen DCT coefficients
of the chroma channels, invisible in pixel space and robust to SSL's augmentations.

    RGB (0-255) -> YUV -> block DCT (window x window, orthonormal) of the chroma channels
      -> + magnitude at fixed (u, v) positions of every block -> inverse DCT -> RGB -> clamp to [0, 1]

As the authors' code does it (meet-cjli/CTRL utils/frequency.py, PoisonFre.Poison_Frequency_Diff, called
with rgb2yuv=True from main_train.py): kornia's rgb_to_yuv there and kornia's yuv_to_rgb back. kornia's
two matrices are rounded to three decimals and are not exact inverses, so the authors' round trip also
moves every pixel of a poisoned image by up to ~0.2 grey levels; color_space="yuv" reproduces that pair.
Defaults follow the authors' CIFAR-10 command (README): window 32 (one block per 32x32 image), channels 1
and 2 (U and V), positions (15, 15) and (31, 31) (one mid and one high frequency), magnitude 100 on the
0-255 scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from securetl.interfaces import Trigger

# full-range BT.601 (JPEG) YCbCr, the space the paper's text names; offsets (128 for Cb/Cr) only move the DC
# coefficient and cancel on the way back, so the exact inverse is used.
_RGB2YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
# kornia.color.rgb_to_yuv and yuv_to_rgb (kornia/color/yuv.py, the same in the 0.6.5 the authors pin): the
# pair the authors' code runs, kept as a pair (the second is not the first's exact inverse)
_RGB2YUV = torch.tensor([[0.299, 0.587, 0.114], [-0.147, -0.289, 0.436], [0.615, -0.515, -0.100]])
_YUV2RGB_KORNIA = torch.tensor([[1.0, 0.0, 1.14], [1.0, -0.396, -0.581], [1.0, 2.029, 0.0]])
# colour space -> (forward, backward) matrices
COLOR_SPACES = {
    "ycbcr": (_RGB2YCBCR, torch.linalg.inv(_RGB2YCBCR)),
    "yuv": (_RGB2YUV, _YUV2RGB_KORNIA),
}


def dct_matrix(n: int, dtype=torch.float32) -> Tensor:
    """Orthonormal DCT-II matrix D (n x n): X = D x for a length-n signal, x = D^T X."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(dtype)


def block_dct(x: Tensor, window: int, inverse: bool = False) -> Tensor:
    """2-D orthonormal DCT (or its inverse) of every non-overlapping window x window block of (..., H, W)."""
    *lead, h, w = x.shape
    d = dct_matrix(window, x.dtype).to(x.device)
    blocks = x.reshape(*lead, h // window, window, w // window, window).transpose(-3, -2)
    m = d.t() if inverse else d
    out = m @ blocks @ m.t()
    return out.transpose(-3, -2).reshape(*lead, h, w)


class FrequencyTrigger(Trigger):
    """window: DCT block size (image sides must be multiples of it); channels: which channels of the
    colour space get the trigger (0 = luma, 1, 2 = chroma); positions: (u, v) coefficients inside each
    block; magnitude: value added to each of them, on the 0-255 pixel scale; color_space: yuv (kornia's
    pair, as the authors' code runs it) | ycbcr (JPEG's, inverted exactly)."""

    def __init__(
        self,
        window: int = 32,
        channels: Sequence[int] = (1, 2),
        positions: Sequence[Sequence[int]] = ((15, 15), (31, 31)),
        magnitude: float = 100.0,
        color_space: str = "yuv",
    ) -> None:
        if window < 1:
            raise ValueError(f"trigger.window must be >= 1, got {window}")
        if color_space not in COLOR_SPACES:
            raise ValueError(f"trigger.color_space={color_space!r}; choose from {sorted(COLOR_SPACES)}")
        channels = [int(c) for c in channels]
        if not channels or any(c not in (0, 1, 2) for c in channels):
            raise ValueError(f"trigger.channels={channels} must be a non-empty subset of 0, 1, 2")
        positions = [tuple(int(a) for a in p) for p in positions]
        if not positions or any(
            len(p) != 2 or not (0 <= p[0] < window and 0 <= p[1] < window) for p in positions
        ):
            raise ValueError(
                f"trigger.positions={positions} must be (u, v) pairs inside a {window}x{window} block"
            )
        self.window, self.channels, self.positions = int(window), channels, positions
        self.magnitude, self.color_space = float(magnitude), color_space
        self.rgb2c, self.c2rgb = COLOR_SPACES[color_space]
        # the spectral offset that is added to every block of every chosen channel
        spec = torch.zeros(3, self.window, self.window)
        for u, v in positions:
            spec[channels, u, v] += self.magnitude
        self.spectrum = spec

    def apply(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % self.window or w % self.window:
            raise ValueError(f"a {h}x{w} image is not tiled by trigger.window={self.window}")
        if x.shape[-3] != 3:
            raise ValueError("the frequency trigger needs RGB images")
        m, minv = self.rgb2c.to(x.device, x.dtype), self.c2rgb.to(x.device, x.dtype)
        c = torch.einsum("ij,njhw->nihw", m, x * 255.0)
        spec = block_dct(c, self.window)
        tile = self.spectrum.to(x.device, x.dtype).repeat(1, h // self.window, w // self.window)
        c = block_dct(spec + tile, self.window, inverse=True)
        return (torch.einsum("ij,njhw->nihw", minv, c) / 255.0).clamp(0.0, 1.0)
