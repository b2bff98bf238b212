"""The embedded default dataset: procedurally drawn shapes, generated in a few seconds, nothing downloaded.

Class = shape + a class-specific fill texture (10 classes). Every other factor is a nuisance drawn per image: foreground colour, scale,
rotation, position, background texture (domain-specific), a smaller distractor shape of a random class,
occasional low contrast, and pixel noise. Two domains share the classes but not the background style, so
an encoder pre-trained on domain "pretrain" is transferred to domain "downstream" as in real TL
(pre-train on CIFAR-10, fine-tune on STL-10/GTSRB, ...).

Colours come from a small seeded palette that always holds black and white, so a black/white patch is not
separable from the objects by colour alone, and colour does not identify an image (which would let
contrastive pre-training learn colour histograms instead of objects).
"""

from __future__ import annotations

import functools
import math
from typing import Any

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


def make_palette(k: int, seed: int) -> Tensor:
    """`k` colours shared by both domains (black and white always among them). A small palette keeps colour
    from identifying an image: contrastive SSL would otherwise learn colour histograms, not objects."""
    g = torch.Generator().manual_seed(10_007 + seed)
    base = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    return torch.cat([base, torch.rand(max(0, k - 2), 3, generator=g)])[:k]


def _pick(palette: Tensor, n: int, g: torch.Generator, jitter: float = 0.06) -> Tensor:
    c = palette[torch.randint(0, len(palette), (n,), generator=g)]
    return (c + jitter * (torch.rand(n, 3, generator=g) * 2 - 1)).clamp(0, 1).view(n, 3, 1, 1)


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
        3: torch.minimum(torch.maximum(au - 0.3 * r, av - r), torch.maximum(au - r, av - 0.3 * r)),
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
    """Class-specific fill texture in [0, 1], (N, 1, H, W). The patterns differ in kind and orientation,
    not in period, so that the crops and rescaling of SSL augmentation do not turn one into another.
    Shape and fill are two cues that agree, like the parts and texture of a real object class."""
    lin = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    px = 2 * math.pi * size / 2 / 5.0  # ~5-pixel period
    out = torch.zeros(len(cls), size, size)
    for c in range(len(CLASS_NAMES)):
        m = cls == c
        if not m.any():
            continue
        u, v = xx[None] - cx[m], yy[None] - cy[m]
        pats = {
            0: torch.sin(px * v),  # horizontal stripes
            1: torch.sin(px * u),  # vertical stripes
            2: torch.sin(px * (u + v) / math.sqrt(2)),  # diagonal stripes
            3: torch.sin(px * (u - v) / math.sqrt(2)),  # anti-diagonal stripes
            4: torch.sign(torch.sin(px * u) * torch.sin(px * v)),  # checkerboard
            5: (torch.cos(px * u) + torch.cos(px * v)) - 1.0,  # dots
            6: torch.sin(px * torch.sqrt(u**2 + v**2)),  # concentric rings
            7: torch.ones_like(u) * -1.0,  # plain
            8: torch.sin(6 * torch.atan2(v, u)),  # radial spokes
            9: torch.maximum(torch.cos(px * u), torch.cos(px * v)) * 2 - 1,  # grid lines
        }
        out[m] = pats[c]
    return (out.clamp(-1, 1) * 0.5 + 0.5).unsqueeze(1)


def _draw_shapes(
    cls: Tensor,
    n: int,
    size: int,
    g: torch.Generator,
    scale: tuple[float, float],
    spread: float,
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


def _background(
    domain: str, n: int, size: int, g: torch.Generator, palette: Tensor, bg_contrast: float
) -> Tensor:
    """Domain-specific background between two palette colours, (N, 3, H, W) in [0, 1]."""
    lin = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    c1 = _pick(palette, n, g)
    # the second colour is a partial step from the first: visible texture, yet objects stand out
    c2 = c1 + (_pick(palette, n, g) - c1) * bg_contrast
    if domain == "pretrain":
        # a smooth linear gradient in a random direction ("sky-like" backgrounds)
        ang = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
        t = 0.5 + 0.5 * ((xx[None] - 0.5) * torch.cos(ang) + (yy[None] - 0.5) * torch.sin(ang)) * 1.4
    elif domain == "downstream":
        # blotchy cloud texture from upsampled noise: a different style from the pre-training domain
        coarse = torch.rand(n, 1, 4, 4, generator=g)
        fine = torch.rand(n, 1, 8, 8, generator=g)
        t = 0.7 * torch.nn.functional.interpolate(
            coarse, size=(size, size), mode="bicubic", align_corners=True
        )
        t = t + 0.3 * torch.nn.functional.interpolate(
            fine, size=(size, size), mode="bilinear", align_corners=True
        )
        t = t.squeeze(1)
    else:
        raise ValueError(f"unknown synthetic domain {domain!r}; choose from {DOMAINS}")
    t = t.clamp(0, 1).unsqueeze(1)
    return c1 * (1 - t) + c2 * t


def domain_generator(domain: str, seed: int) -> torch.Generator:
    """The random stream of one domain's images for a seed (domains never share one)."""
    return torch.Generator().manual_seed(seed * 7919 + DOMAINS.index(domain) * 104729)


def backgrounds(
    n: int,
    domain: str,
    seed: int,
    size: int = 32,
    noise: float = 0.06,
    bg_contrast: float = 0.5,
    palette_size: int = 12,
    palette_seed: int = 0,
    **_: object,
) -> Tensor:
    """`n` object-free images of one domain (its background style and pixel noise), uint8: the scenes an
    attacker composes poisons on. As many as one class of the pre-training set; no config key, so adding
    them left every run's config (and run_id) as it was."""
    g = domain_generator(domain, seed)
    img = _background(domain, n, size, g, make_palette(palette_size, palette_seed), bg_contrast)
    return to_uint8(img + noise * torch.randn(img.shape, generator=g))


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
    palette_size: int = 12,
    palette_seed: int = 0,
) -> LabeledSet:
    """`n` labelled images of one domain. Balanced classes (n // num_classes each, remainder spread)."""
    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"synthetic data has at most {len(CLASS_NAMES)} classes, asked for {num_classes}")
    g = domain_generator(domain, seed)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]
    palette = make_palette(palette_size, palette_seed)
    img = _background(domain, n, size, g, palette, bg_contrast)

    # distractor first, so the labelled object is drawn on top of it
    dcls = torch.randint(0, len(CLASS_NAMES), (n,), generator=g)
    dmask, _, _ = _draw_shapes(dcls, n, size, g, scale=(0.12, 0.25), spread=0.75)
    dmask = dmask * (torch.rand(n, 1, 1, 1, generator=g) < distractor_prob)
    dcol = _pick(palette, n, g)
    img = img * (1 - dmask) + dcol * dmask

    mask, cx, cy = _draw_shapes(y, n, size, g, scale=scale, spread=0.35)
    fg = _pick(palette, n, g)
    bg_mean = img.mean(dim=(2, 3), keepdim=True)
    # keep the object visible: push its colour away from the background mean when they are too close
    gap = fg - bg_mean
    dist = gap.norm(dim=1, keepdim=True).clamp_min(1e-3)
    fg = torch.where(dist < min_contrast, (bg_mean + gap / dist * min_contrast).clamp(0, 1), fg)
    # some objects are nearly background-coloured: hard examples keep clean accuracy below 100 %
    low = torch.rand(n, 1, 1, 1, generator=g) < low_contrast_prob
    fg = torch.where(low, bg_mean + (fg - bg_mean) * 0.25, fg)
    # the fill mixes the object colour with a second colour in the class's pattern
    fg2 = fg + (_pick(palette, n, g) - fg) * pattern_strength
    pat = _fill_pattern(y, size, cx, cy)
    fill = fg * (1 - pat) + fg2 * pat
    img = img * (1 - mask) + fill * mask

    img = img + noise * torch.randn(img.shape, generator=g)
    return LabeledSet(to_uint8(img), y.long())


# the settings generate() draws images with besides `size`; `downstream` may change them and the seed
GENERATION_KEYS = ("num_classes", "noise", "distractor_prob", "low_contrast_prob", "scale", "min_contrast")
GENERATION_KEYS += ("bg_contrast", "pattern_strength", "palette_size")
DOWNSTREAM_KEYS = ("seed", *GENERATION_KEYS)


def build_synthetic(
    n_train: int = 4000,
    n_test: int = 2000,
    n_pretrain: int = 4000,
    n_reference: int = 100,
    num_classes: int = 10,
    size: int = 32,
    seed: int = 0,
    noise: float = 0.03,
    distractor_prob: float = 0.3,
    low_contrast_prob: float = 0.1,
    scale: tuple[float, float] = (0.45, 0.8),
    min_contrast: float = 0.35,
    bg_contrast: float = 0.5,
    pattern_strength: float = 0.8,
    palette_size: int = 12,
    pretrain_domain: str = "pretrain",
    downstream_domain: str = "downstream",
    n_clean: int | None = None,
    downstream: dict[str, Any] | None = None,
) -> Splits:
    """Build the synthetic splits. All sizes and difficulty knobs are config keys (conf/dataset/synthetic.yaml);
    the defaults here are that YAML's values (tests/test_usability.py checks it), so a call from code builds
    the dataset a run builds.

    `n_clean`: size of the clean reserve (Splits.clean), generated from a stream of its own (train, test and
    pre-training images are the same with or without it); class-balanced. None = a tenth of `n_train`, rounded
    down to whole classes (enough for `defense.clean_fraction` up to 0.1). Not in the YAML on purpose: a new
    key would change the run_id of every synthetic row; `+dataset.n_clean=N` sets it.

    `downstream`: generation settings (`DOWNSTREAM_KEYS`: seed, num_classes, palette, shapes, texture, noise)
    that the downstream splits (train, test, reference, clean) take instead of the top-level ones. The
    pre-training split and the backgrounds keep the top-level settings, so a dataset variant
    (conf/variant/, docs/validation.md) keeps the default's pre-training images, and with them the cached
    encoder (its key hashes those images). None (or {}) builds exactly what it built before the key
    existed; not in the YAML, for the same reason as `n_clean`: `+dataset.downstream.seed=1` sets it.

    Memoised per process on the arguments: a multirun's jobs share one build (~2 s each otherwise). Callers
    never modify splits in place (attacks clone before poisoning), so sharing the tensors is safe.
    """
    return _build_splits(**{**locals(), "scale": tuple(scale), "downstream": _hashable(downstream)})


def _hashable(downstream: dict[str, Any] | None) -> tuple:
    """`downstream` as sorted (key, value) pairs (lists as tuples: Hydra hands lists over), for the memo."""
    unknown = sorted(set(downstream or {}) - set(DOWNSTREAM_KEYS))
    if unknown:
        raise ValueError(f"dataset.downstream: unknown {unknown}; it may set {', '.join(DOWNSTREAM_KEYS)}")
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in (downstream or {}).items()))


@functools.lru_cache(maxsize=1)  # one configuration at a time: a sweep over dataset sizes keeps no old copies
def _build_splits(**a) -> Splits:
    d = a | dict(a["downstream"])  # the downstream splits' settings; `a` alone makes the pre-training split

    def kw(s: dict) -> dict:
        return {k: s[k] for k in ("size", *GENERATION_KEYS)} | {"palette_seed": s["seed"]}

    # train and test of the same domain use disjoint seeds so they never share an image
    down, pre = a["downstream_domain"], a["pretrain_domain"]
    train = generate(a["n_train"], down, d["seed"] * 3 + 0, **kw(d))
    test = generate(a["n_test"], down, d["seed"] * 3 + 1, **kw(d))
    pretrain = generate(a["n_pretrain"], pre, a["seed"] * 3 + 2, **kw(a))
    reference = generate(a["n_reference"], down, d["seed"] * 3 + 1_000_003, **kw(d))
    background = backgrounds(a["n_pretrain"] // a["num_classes"], pre, a["seed"] * 3 + 2_000_003, **kw(a))
    num_classes, n_clean = d["num_classes"], a["n_clean"]
    if n_clean is None:
        n_clean = a["n_train"] // 10 // num_classes * num_classes
    if n_clean < 0:
        raise ValueError(f"dataset.n_clean={n_clean} must be >= 0")
    # the clean reserve: the downstream domain, its own seed (disjoint from train/test/reference streams);
    # generate() balances classes exactly when n_clean is a multiple of num_classes
    clean = generate(n_clean, down, d["seed"] * 3 + 3_000_003, **kw(d)) if n_clean else None
    return Splits(
        name="synthetic",
        train=train,
        test=test,
        num_classes=num_classes,
        class_names=CLASS_NAMES[:num_classes],
        pretrain=pretrain,
        reference=reference,
        background=background,
        clean=clean,
    )
