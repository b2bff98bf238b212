"""One SSL training loop for every method: two augmented views per image, the method's loss, Adam.

Methods with a momentum network (MoCo v2, BYOL) are told the run's length once (`method.begin`) and
update that network after every optimiser step (`method.after_step`). A method may also shape the
optimiser (`method.param_groups`, `method.lr_factor`: BYOL's weight-decay exclusions and learning-rate
schedule); SimCLR and MoCo v2 keep one group and a constant rate.

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

from securetl.interfaces import RunContext
from securetl.numerics import take
from securetl.progress import bar_disabled
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
    num = ctx.num
    groups = [images] if isinstance(images, torch.Tensor) else list(images)
    size = tuple(groups[0].shape[-2:])
    starts = torch.tensor([0] + [len(gr) for gr in groups]).cumsum(0)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)  # the batch order, drawn on the host
    g_aug = num.generator(g)  # the views' random parameters, drawn where the batch is
    method = num.module(build_method(ssl, encoder, **(method_kwargs or {})))
    aug = SimCLRAugment(**(augment or {}))
    # the method's groups: BYOL keeps weight decay off biases and normalisation parameters
    opt = torch.optim.Adam(method.param_groups(weight_decay), lr=lr, weight_decay=weight_decay)
    # uint8 images on the device once (or pinned), not copied from pageable memory every step
    resident = [num.resident(gr) for gr in groups]
    n = int(starts[-1])
    steps = max(1, n // batch_size)  # drop the last partial batch: BatchNorm and NT-Xent want full batches
    history = []
    method.train()
    method.begin(epochs * steps)
    bar = tqdm(range(epochs), desc=f"{ssl} pre-training", disable=bar_disabled(ctx.progress), leave=False)
    for epoch in bar:
        perm = torch.randperm(n, generator=g)
        order = num.put(perm) if len(groups) == 1 else perm
        # summed on the device and read once per epoch: a per-step .item() would stall the GPU every step
        total = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for s in range(steps):
            if (factor := method.lr_factor(epoch * steps + s)) is not None:  # BYOL's warm-up, cosine decay
                for group in opt.param_groups:
                    group["lr"] = lr * factor
            idx = order[s * batch_size : (s + 1) * batch_size]
            if len(groups) == 1:
                parts = [num.batch(take(resident[0], idx))]  # take: resident may be pinned host memory
            else:
                parts = [
                    num.batch(take(res, idx[(idx >= lo) & (idx < hi)] - lo))
                    for res, lo, hi in zip(resident, starts[:-1], starts[1:])
                    if ((idx >= lo) & (idx < hi)).any()
                ]
            v1 = torch.cat([aug(p, g_aug, size) for p in parts])
            v2 = torch.cat([aug(p, g_aug, size) for p in parts])
            with num.autocast():
                loss = method.loss(v1, v2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            method.after_step()
            total += loss.detach()
        history.append(float(total) / steps)
        if not math.isfinite(history[-1]):
            raise FloatingPointError(f"{ssl} loss became {history[-1]}; lower encoder.lr")
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    if history:  # encoder.epochs=0 is allowed: the encoder as initialised
        log.info("%s pre-training: loss %.3f -> %.3f over %d epochs", ssl, history[0], history[-1], epochs)
    return encoder.eval(), history
