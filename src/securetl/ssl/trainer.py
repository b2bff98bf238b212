"""One SSL training loop for every method: two augmented views per image, the method's loss, Adam.

Methods with a momentum network (MoCo v2, BYOL) are told the run's length once (`method.begin`) and
update that network after every optimiser step (`method.after_step`); nothing else differs per method.

The images may come in groups of different sizes (CorruptEncoder's poisons are twice as wide as tall, as
an attacker's uploads may be): batches are drawn from all of them, each group is cropped at its own
aspect, and every view is resized to the first group's size, as a data loader that crops raw images does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from securetl.interfaces import RunContext, to_float
from securetl.ssl.augment import SimCLRAugment
from securetl.ssl.methods import build_method

log = logging.getLogger(__name__)


def pretrain(
    encoder: torch.nn.Module,
    images: torch.Tensor | Sequence[torch.Tensor],
    ctx: RunContext,
    *,
    ssl: str = "simclr",
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 1e-6,
    seed: int = 0,
    augment: dict | None = None,
    method_kwargs: dict | None = None,
) -> tuple[torch.nn.Module, list[float]]:
    """Self-supervised pre-training of `encoder` on uint8 `images` (one tensor, or groups of tensors of
    different sizes); returns it and the per-epoch loss."""
    groups = [images] if isinstance(images, torch.Tensor) else list(images)
    size = tuple(groups[0].shape[-2:])
    starts = torch.tensor([0] + [len(gr) for gr in groups]).cumsum(0)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    method = build_method(ssl, encoder, **(method_kwargs or {})).to(ctx.device)
    aug = SimCLRAugment(**(augment or {}))
    opt = torch.optim.Adam(
        [p for p in method.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )
    n = int(starts[-1])
    steps = max(1, n // batch_size)  # drop the last partial batch: BatchNorm and NT-Xent want full batches
    history = []
    method.train()
    method.begin(epochs * steps)
    bar = tqdm(range(epochs), desc=f"{ssl} pre-training", disable=not ctx.progress, leave=False)
    for _ in bar:
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for s in range(steps):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            parts = [
                to_float(gr[idx[(idx >= lo) & (idx < hi)] - lo]).to(ctx.device)
                for gr, lo, hi in zip(groups, starts[:-1], starts[1:])
            ]
            parts = [p for p in parts if len(p)]
            v1 = torch.cat([aug(p, g, size) for p in parts])
            v2 = torch.cat([aug(p, g, size) for p in parts])
            loss = method.loss(v1, v2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            method.after_step()
            total += loss.item()
        history.append(total / steps)
        if not math.isfinite(history[-1]):
            raise FloatingPointError(f"{ssl} loss became {history[-1]}; lower encoder.lr")
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    log.info("%s pre-training: loss %.3f -> %.3f over %d epochs", ssl, history[0], history[-1], epochs)
    return encoder.eval(), history
