"""The embedded default dataset: procedurally drawn shapes, generated in a few seconds, nothing downloaded.

Class = shape (10 of them). Every other factor is a nuisance drawn per image: foreground colour, scale,
rotation, position, background texture (domain-specific), a smaller distractor shape of a random class,
occasional low contrast, and pixel noise. Two domains share the classes but not the background style, so
an encoder pre-trained on domain "pretrain" is transferred to domain "downstream" as in real TL
(pre-train on CIFAR-10, fine-tune on STL-10/GTSRB, ...).

Colours are drawn uniformly (white and black included), so a small black/white patch is not separable
from the objects by colour alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from securetl.interfaces import LabeledSet, Splits, to_uint8

CLASS_NAMES = [
    "circle",
    "square",
    "triangle",
    "plus",
    "ring",
    "diamond",
    "cross",
    "frame",
    "half_disk",
    "star",
]

DOMAINS = ("pretrain", "downstream")


def _shape_sdf(cls: Tensor, u: Tensor, v: Tensor, r: Tensor) -> Tensor:
    """Signed distance-like field (<0 inside) of each image's shape, in its own rotated frame.

    cls: (N,), u/v: (N, H, W) coordinates, r: (N, 1, 1) radius.
    """
    rad = torch.sqrt(u**2 + v**2)
    au, av = u.abs(), v.abs()
    d = torch.empty_like(u)
    fields = {
        0: rad - r,
        1: torch.maximum(au, av) - 0.85 * r,
        2: torch.maximum(au * 0.866 + v * 0.5, -v) - 0.5 * r,
        3: torch.minimum(
            torch.maximum(au - 0.3 * r, av - r), torch.maximum(au - r, av - 0.3 * r)
        ),
        4: (rad - 0.75 * r).abs() - 0.25 * r,
        5: au + av - 1.1 * r,
        6: None,  # the plus rotated by 45 degrees, below
        7: (torch.maximum(au, av) - 0.75 * r).abs() - 0.2 * r,
        8: torch.maximum(rad - r, -v - 0.1 * r),
        9: rad - r * (0.62 + 0.38 * torch.cos(5 * torch.atan2(v, u))),
    }
    s2 = math.sqrt(0.5)
    ru, rv = (u - v) * s2, (u + v) * s2
    fields[6] = torch.minimum(
        torch.maximum(ru.abs() - 0.28 * r, rv.abs() - r),
        torch.maximum(ru.abs() - r, rv.abs() - 0.28 * r),
    )
    for c, f in fields.items():
        m = cls == c
        if m.any():
            d[m] = f[m]
    return d


def _fill_pattern(cls: Tensor, size: int, cx: Tensor, cy: Tensor) -> Tensor:
    """Class-specific fill texture in [0, 1], (N, 1, H, W): stripes of several orientations and periods,
    a checkerboard, dots, rings, or none. Shape and fill are two cues that agree, like parts and texture
    of a real object class."""
    ii, jj = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    ii, jj = ii[None], jj[None]
    two_pi = 2 * math.pi
    pats = {
        0: torch.sin(two_pi * ii / 4),
        1: torch.sin(two_pi * jj / 4),
        2: torch.sin(two_pi * (ii + jj) / 5.6),
        3: torch.sin(two_pi * (ii - jj) / 5.6),
        4: torch.sin(two_pi * ii / 8),
        5: torch.sin(two_pi * jj / 8),
        6: torch.sin(two_pi * ii / 6) * torch.sin(two_pi * jj / 6),
        7: torch.cos(two_pi * ii / 4) + torch.cos(two_pi * jj / 4) - 1,
        8: None,
        9: torch.zeros(1, size, size),
    }
    out = torch.zeros(len(cls), size, size)
    lin = torch.linspace(-1, 1, size)
    for c, pat in pats.items():
        m = cls == c
        if not m.any():
            continue
        if c == 8:  # rings around the object's own centre
            yy, xx = torch.meshgrid(lin, lin, indexing="ij")
            r = torch.sqrt((xx[None] - cx[m]) ** 2 + (yy[None] - cy[m]) ** 2) * size / 2
            out[m] = torch.sin(two_pi * r / 4)
        else:
            out[m] = pat.expand(int(m.sum()), size, size)
    return (out.clamp(-1, 1) * 0.5 + 0.5).unsqueeze(1)


def _draw_shapes(
    cls: Tensor, n: int, size: int, g: torch.Generator, scale: tuple[float, float], spread: float,
    max_rotation: float = 25.0,
) -> Tensor:
    """Soft masks (N, 1, H, W) of shapes with random pose."""
    lin = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    cx = (torch.rand(n, 1, 1, generator=g) * 2 - 1) * spread
    cy = (torch.rand(n, 1, 1, generator=g) * 2 - 1) * spread
    # rotation is limited: a square turned 45 degrees would be a diamond, a plus a cross
    theta = (torch.rand(n, 1, 1, generator=g) * 2 - 1) * math.radians(max_rotation)
    r = scale[0] + torch.rand(n, 1, 1, generator=g) * (scale[1] - scale[0])
    dx, dy = xx[None] - cx, yy[None] - cy
    u = dx * torch.cos(theta) + dy * torch.sin(theta)
    v = -dx * torch.sin(theta) + dy * torch.cos(theta)
    sdf = _shape_sdf(cls, u, v, r)
    # soft edge ~ one pixel wide, so shapes are anti-aliased like natural images
    return torch.sigmoid(-sdf * size / 2.0).unsqueeze(1), cx, cy


def _background(domain: str, n: int, size: int, g: torch.Generator, bg_contrast: float = 0.5) -> Tensor:
    """Domain-specific texture between two random colours, (N, 3, H, W) in [0, 1]."""
    lin = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    c1 = torch.rand(n, 3, 1, 1, generator=g)
    # the texture's second colour is a partial step from the first: visible texture, yet objects stand out
    c2 = c1 + (torch.rand(n, 3, 1, 1, generator=g) - c1) * bg_contrast
    if domain == "pretrain":
        # smooth gradients plus oriented stripes: "outdoor-like" low-frequency backgrounds
        ang = torch.rand(n, 1, 1, generator=g) * math.pi
        freq = 2 + torch.rand(n, 1, 1, generator=g) * 6
        phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
        proj = xx[None] * torch.cos(ang) + yy[None] * torch.sin(ang)
        t = 0.5 + 0.35 * torch.sin(2 * math.pi * freq * proj + phase) + 0.15 * (proj - 0.5)
    elif domain == "downstream":
        # blotchy cloud texture from upsampled noise: a different style from the pre-training domain
        coarse = torch.rand(n, 1, 5, 5, generator=g)
        fine = torch.rand(n, 1, 9, 9, generator=g)
        t = 0.65 * torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
        t = t + 0.35 * torch.nn.functional.interpolate(fine, size=(size, size), mode="bilinear", align_corners=True)
        t = t.squeeze(1)
    else:
        raise ValueError(f"unknown synthetic domain {domain!r}; choose from {DOMAINS}")
    t = t.clamp(0, 1).unsqueeze(1)
    return c1 * (1 - t) + c2 * t


def generate(
    n: int,
    domain: str,
    seed: int,
    size: int = 32,
    num_classes: int = 10,
    noise: float = 0.06,
    distractor_prob: float = 0.6,
    low_contrast_prob: float = 0.15,
    scale: tuple[float, float] = (0.3, 0.6),
    min_contrast: float = 0.35,
    bg_contrast: float = 0.5,
    pattern_strength: float = 0.8,
) -> LabeledSet:
    """`n` labelled images of one domain. Balanced classes (n // num_classes each, remainder spread)."""
    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"synthetic data has at most {len(CLASS_NAMES)} classes, asked for {num_classes}")
    g = torch.Generator().manual_seed(seed * 7919 + DOMAINS.index(domain) * 104729)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]
    img = _background(domain, n, size, g, bg_contrast)

    # distractor first, so the labelled object is drawn on top of it
    dcls = torch.randint(0, len(CLASS_NAMES), (n,), generator=g)
    dmask, _, _ = _draw_shapes(dcls, n, size, g, scale=(0.12, 0.25), spread=0.75)
    dmask = dmask * (torch.rand(n, 1, 1, 1, generator=g) < distractor_prob)
    dcol = torch.rand(n, 3, 1, 1, generator=g)
    img = img * (1 - dmask) + dcol * dmask

    mask, cx, cy = _draw_shapes(y, n, size, g, scale=scale, spread=0.35)
    fg = torch.rand(n, 3, 1, 1, generator=g)
    bg_mean = img.mean(dim=(2, 3), keepdim=True)
    # keep the object visible: push its colour away from the background mean when they are too close
    gap = fg - bg_mean
    dist = gap.norm(dim=1, keepdim=True).clamp_min(1e-3)
    fg = torch.where(dist < min_contrast, (bg_mean + gap / dist * min_contrast).clamp(0, 1), fg)
    # some objects are nearly background-coloured: hard examples keep clean accuracy below 100 %
    low = torch.rand(n, 1, 1, 1, generator=g) < low_contrast_prob
    fg = torch.where(low, bg_mean + (fg - bg_mean) * 0.25, fg)
    # the fill mixes the object colour with a second colour in the class's pattern
    fg2 = fg + (torch.rand(n, 3, 1, 1, generator=g) - fg) * pattern_strength
    fill = fg * (1 - _fill_pattern(y, size, cx, cy)) + fg2 * _fill_pattern(y, size, cx, cy)
    img = img * (1 - mask) + fill * mask

    img = img + noise * torch.randn(img.shape, generator=g)
    return LabeledSet(to_uint8(img), y.long())


def build_synthetic(
    n_train: int = 4000,
    n_test: int = 2000,
    n_pretrain: int = 6000,
    n_reference: int = 100,
    num_classes: int = 10,
    size: int = 32,
    seed: int = 0,
    noise: float = 0.06,
    distractor_prob: float = 0.6,
    low_contrast_prob: float = 0.15,
    scale: tuple[float, float] = (0.3, 0.6),
    min_contrast: float = 0.35,
    bg_contrast: float = 0.5,
    pattern_strength: float = 0.8,
    pretrain_domain: str = "pretrain",
    downstream_domain: str = "downstream",
) -> Splits:
    """Build the synthetic splits. All sizes and difficulty knobs are config keys (conf/dataset/synthetic.yaml)."""
    kw = dict(
        size=size,
        num_classes=num_classes,
        noise=noise,
        distractor_prob=distractor_prob,
        low_contrast_prob=low_contrast_prob,
        scale=tuple(scale),
        min_contrast=min_contrast,
        bg_contrast=bg_contrast,
        pattern_strength=pattern_strength,
    )
    # train and test of the same domain use disjoint seeds so they never share an image
    train = generate(n_train, downstream_domain, seed * 3 + 0, **kw)
    test = generate(n_test, downstream_domain, seed * 3 + 1, **kw)
    pretrain = generate(n_pretrain, pretrain_domain, seed * 3 + 2, **kw)
    reference = generate(n_reference, downstream_domain, seed * 3 + 1_000_003, **kw)
    return Splits(
        name="synthetic",
        train=train,
        test=test,
        num_classes=num_classes,
        class_names=CLASS_NAMES[:num_classes],
        pretrain=pretrain,
        reference=reference,
    )
