"""SimCLR's standard augmentations, done on a whole batch at once with per-sample random parameters.

torchvision's v2 transforms draw one set of parameters per call, which would give every image in a batch
the same crop; here each image gets its own, with no per-sample Python loop:
RandomResizedCrop(scale=(0.2, 1)) + HorizontalFlip(0.5) + ColorJitter(0.4, 0.4, 0.4, 0.1) w.p. 0.8
+ RandomGrayscale(0.2)  — the CIFAR settings of SimCLR / the BadEncoder code base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from securetl.numerics import rand

_GRAY = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
# RGB <-> YIQ: hue is a rotation of the IQ plane, which makes a per-sample hue jitter one batched matmul
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)
_ON_DEVICE: dict[tuple[int, str], Tensor] = {}


def _const(t: Tensor, device) -> Tensor:
    """A module constant on `device`, copied there once (not once per batch)."""
    key = (id(t), str(device))
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = t.to(device)
    return _ON_DEVICE[key]


def _u(n: int, lo: float, hi: float, g: torch.Generator | None, device) -> Tensor:
    # drawn on the generator's device: a CPU generator draws what it always drew, a CUDA one (the trainer's
    # on a GPU) draws where the batch is
    return rand(n, g, device) * (hi - lo) + lo


def random_resized_crop(
    x: Tensor,
    scale=(0.2, 1.0),
    ratio=(3 / 4, 4 / 3),
    g: torch.Generator | None = None,
    size: tuple[int, int] | None = None,
) -> Tensor:
    """Crop `scale` of each image's area at aspect `ratio` (in pixels, as torchvision does, so a crop of
    a wide image is as square as one of a square image) and resize it to `size` (default: the input's)."""
    n, c, height, width = x.shape
    out_h, out_w = size or (height, width)
    a = width / height
    area = _u(n, scale[0], scale[1], g, x.device)
    logr = _u(n, math.log(ratio[0]), math.log(ratio[1]), g, x.device)
    ar = torch.exp(logr)
    w = torch.sqrt(area * ar / a).clamp(max=1.0)  # fractions of the width and height
    h = torch.sqrt(area * a / ar).clamp(max=1.0)
    cx = (rand(n, g, x.device) * 2 - 1) * (1 - w)
    cy = (rand(n, g, x.device) * 2 - 1) * (1 - h)
    flip = (rand(n, g, x.device) < 0.5).float() * 2 - 1  # horizontal flip folded in
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = w * -flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [n, c, out_h, out_w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(
    x: Tensor, b=0.4, c=0.4, s=0.4, h=0.1, p: float = 0.8, g: torch.Generator | None = None
) -> Tensor:
    n, dev = x.shape[0], x.device
    apply = (rand(n, g, dev) < p).view(n, 1, 1, 1)
    bf = _u(n, 1 - b, 1 + b, g, dev).view(n, 1, 1, 1)
    cf = _u(n, 1 - c, 1 + c, g, dev).view(n, 1, 1, 1)
    sf = _u(n, 1 - s, 1 + s, g, dev).view(n, 1, 1, 1)
    hf = _u(n, -h, h, g, dev) * 2 * math.pi
    y = x * bf
    gray = (y * _const(_GRAY, dev)).sum(1, keepdim=True)
    y = (y - gray.mean(dim=(2, 3), keepdim=True)) * cf + gray.mean(dim=(2, 3), keepdim=True)
    gray = (y * _const(_GRAY, dev)).sum(1, keepdim=True)
    y = (y - gray) * sf + gray
    yiq = torch.einsum("ij,njhw->nihw", _const(_RGB2YIQ, dev), y)
    cos, sin = torch.cos(hf).view(n, 1, 1), torch.sin(hf).view(n, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    y = torch.einsum("ij,njhw->nihw", _const(_YIQ2RGB, dev), yiq).clamp(0, 1)
    return torch.where(apply, y, x)


def random_grayscale(x: Tensor, p: float = 0.2, g: torch.Generator | None = None) -> Tensor:
    n = x.shape[0]
    apply = (rand(n, g, x.device) < p).view(n, 1, 1, 1)
    gray = (x * _const(_GRAY, x.device)).sum(1, keepdim=True).expand_as(x)
    return torch.where(apply, gray, x)


@dataclass
class SimCLRAugment:
    """The SimCLR view generator; every strength is a config key of the encoder's `augment` node."""

    crop_scale_min: float = 0.2
    jitter: float = 0.4
    hue: float = 0.1
    jitter_prob: float = 0.8
    gray_prob: float = 0.2

    def __call__(
        self, x: Tensor, g: torch.Generator | None = None, size: tuple[int, int] | None = None
    ) -> Tensor:
        """Views of `x`, `size` pixels (default: x's); x may have any aspect (see random_resized_crop)."""
        x = random_resized_crop(x, scale=(self.crop_scale_min, 1.0), g=g, size=size)
        x = color_jitter(x, self.jitter, self.jitter, self.jitter, self.hue, self.jitter_prob, g=g)
        return random_grayscale(x, self.gray_prob, g=g)
