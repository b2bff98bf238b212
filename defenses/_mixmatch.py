"""The MixMatch step DBD and ASD train with (BASELINES.md section 3, `mixmatch_step`), written once.

MixMatch (Berthelot et al., NeurIPS 2019) as both reference codes run it (SCLBD/DBD and KuofengGao/ASD
utils/trainer/semi.py, model/loss.py MixMatchLoss; "modified from YU1ut/MixMatch-pytorch"), per iteration:

  guess    two augmented views of an unlabelled batch; the average of their softmax outputs, sharpened with
           temperature T (p^(1/T), renormalised), is their target (no gradient; the model in train mode)
  mix      the labelled batch (one-hot targets) and both unlabelled views are stacked, paired with a random
           permutation of the stack, and mixed with lambda' = max(lambda, 1 - lambda), lambda ~ Beta(alpha, alpha)
  loss     Lx = CE of the mixed labelled part against its mixed targets; Lu = mean squared error between the
           softmax of the mixed unlabelled part and its mixed targets (mean over samples and classes);
           loss = Lx + lambda_u(t) Lu with lambda_u ramped linearly from 0 over `rampup` epochs (t counts epochs
           in fractions of an epoch)

Transfer learning: the model is the probe's trainable scope (a head on the frozen encoder, or the top stages and a
head). Augmentation and mixing happen on images, as in the references; the frozen part of the encoder then maps
the mixed images to the scope's input, without gradient (`Views`). So even under a frozen encoder MixMatch runs
the encoder forward on every batch (BASELINES.md 2.8). The references forward the three parts of the stack one
by one, interleaved so that each batch-norm batch mixes labelled and unlabelled samples; this forwards the stack
once, which gives batch norm the same mixture.

Pools: the labelled and unlabelled index sets must be disjoint (`semi_pools` makes them so; `mixmatch_epoch`
refuses overlapping ones). Batches are drawn without replacement and reshuffled when a pool is used up, dropping
the last partial batch (the references' DataLoader(shuffle=True, drop_last=True)); a pool smaller than the batch
gives batches of its size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from securetl.interfaces import RunContext
from securetl.numerics import take
from securetl.probe import flip_crop


class Views:
    """The scope's inputs for images: a batch of images (crop with reflect padding 4 and horizontal flip, the
    references' train transform, when `augment`), then the frozen part of the encoder (all of it under a
    frozen-encoder probe, the stages below `start` under fine-tuning), without gradient."""

    def __init__(
        self, encoder: nn.Module, start: int | None, images: Tensor, ctx: RunContext, augment: bool = True
    ):
        self.num = ctx.num
        self.encoder = self.num.module(encoder.eval()) if encoder is not None else None
        self.start, self.augment = start, augment
        self.images = self.num.resident(images)

    def batch(self, idx: Tensor, g: torch.Generator) -> Tensor:
        """Float images in [0, 1] on the device for host indices `idx`, augmented when `augment`."""
        x = self.num.batch(take(self.images, idx))
        return flip_crop(x, g=g) if self.augment else x

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """What the trainable scope reads for the float images `x`."""
        with self.num.autocast():
            h = self.encoder(x) if self.start is None else self.encoder.forward_until(x, self.start)
        return h.float()


def semi_pools(labelled: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(labelled, unlabelled): the sorted unique `labelled` positions of range(n), and all the others."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[labelled] = True
    return torch.nonzero(mask).squeeze(1), torch.nonzero(~mask).squeeze(1)


class _Batches:
    """Batches of a pool, without replacement, reshuffled when fewer than a batch are left (drop_last)."""

    def __init__(self, pool: Tensor, batch: int, g: torch.Generator) -> None:
        self.pool, self.batch, self.g = pool, max(1, min(batch, len(pool))), g
        self._shuffle()

    def _shuffle(self) -> None:
        self.perm, self.pos = self.pool[torch.randperm(len(self.pool), generator=self.g)], 0

    def next(self) -> Tensor:
        if self.pos + self.batch > len(self.perm):
            self._shuffle()
        b = self.perm[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return b


def sharpen(p: Tensor, temperature: float) -> Tensor:
    pt = p ** (1.0 / temperature)
    return pt / pt.sum(dim=1, keepdim=True)


def rampup(t: float, length: float) -> float:
    """MixMatch's linear ramp of lambda_u: t / length clipped to [0, 1] (1 when length is 0)."""
    return 1.0 if length <= 0 else float(np.clip(t / length, 0.0, 1.0))


def mixmatch_loss(
    module: nn.Module,
    views: Views,
    xl: Tensor,
    yl: Tensor,
    u1: Tensor | None,
    u2: Tensor | None,
    *,
    num_classes: int,
    temperature: float,
    alpha: float,
    lambda_u: float,
    g: torch.Generator,
    rng: np.random.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, Lx, Lu) of one MixMatch step on a labelled image batch (xl, yl) and two views u1, u2 of an unlabelled
    batch (None: no unlabelled samples, Lu = 0). `module` is in train mode; images are float on the device."""
    num = views.num
    targets = [F.one_hot(yl, num_classes).float()]
    images = [xl]
    if u1 is not None:
        with torch.no_grad(), num.autocast():
            p = module(views.encode(u1)).float().softmax(1) + module(views.encode(u2)).float().softmax(1)
        q = sharpen(p / 2, temperature)
        targets += [q, q]
        images += [u1, u2]
    images_all, targets_all = torch.cat(images), torch.cat(targets)
    lam = float(rng.beta(alpha, alpha))
    lam = max(lam, 1.0 - lam)
    perm = num.put(torch.randperm(len(images_all), generator=g))
    mixed = lam * images_all + (1.0 - lam) * images_all[perm]
    mixed_t = lam * targets_all + (1.0 - lam) * targets_all[perm]
    with num.autocast():
        logits = module(views.encode(mixed)).float()
    b = len(xl)
    lx = -(F.log_softmax(logits[:b], dim=1) * mixed_t[:b]).sum(1).mean()
    if u1 is None:
        lu = torch.zeros((), device=logits.device)
    else:
        lu = ((logits[b:].softmax(1) - mixed_t[b:]) ** 2).mean()
    return lx + lambda_u * lu, lx, lu


def mixmatch_epoch(
    module: nn.Module,
    opt: torch.optim.Optimizer,
    views: Views,
    y: Tensor,
    labelled: Tensor,
    unlabelled: Tensor,
    *,
    epoch: int,
    iterations: int,
    batch_size: int,
    num_classes: int,
    temperature: float,
    alpha: float,
    lambda_u: float,
    rampup_epochs: float,
    g: torch.Generator,
    rng: np.random.Generator,
) -> dict:
    """`iterations` MixMatch steps of `module` with `opt`: labelled batches of `labelled` (labels from `y`, host
    indices into the views' images), unlabelled batches of `unlabelled`. Returns the epoch's mean loss, Lx, Lu and
    the positions it drew from each pool. Leaves `module` in eval mode."""
    if len(labelled) == 0:
        raise ValueError("MixMatch needs at least one labelled sample")
    if torch.isin(labelled, unlabelled).any():
        raise ValueError("MixMatch: the labelled and unlabelled pools overlap")
    num = views.num
    ys = num.put(y)
    xb, ub = (
        _Batches(labelled, batch_size, g),
        (_Batches(unlabelled, batch_size, g) if len(unlabelled) else None),
    )
    g_aug = num.generator(g)
    sums = torch.zeros(3, device=num.device)
    drawn_l, drawn_u = [], []
    module.train()
    for it in range(iterations):
        bl = xb.next()
        drawn_l.append(bl)
        u1 = u2 = None
        if ub is not None:
            bu = ub.next()
            drawn_u.append(bu)
            u1, u2 = views.batch(bu, g_aug), views.batch(bu, g_aug)
        lam_u = lambda_u * rampup(epoch + it / iterations, rampup_epochs)
        loss, lx, lu = mixmatch_loss(
            module,
            views,
            views.batch(bl, g_aug),
            take(ys, bl),
            u1,
            u2,
            num_classes=num_classes,
            temperature=temperature,
            alpha=alpha,
            lambda_u=lam_u,
            g=g,
            rng=rng,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums += torch.stack([loss.detach(), lx.detach(), lu.detach()])
    module.eval()
    mean = (sums / max(1, iterations)).tolist()  # one host read per epoch
    return {
        "loss": mean[0],
        "lx": mean[1],
        "lu": mean[2],
        "drawn_labelled": torch.unique(torch.cat(drawn_l)) if drawn_l else labelled[:0],
        "drawn_unlabelled": torch.unique(torch.cat(drawn_u)) if drawn_u else unlabelled[:0],
    }
