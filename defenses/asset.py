"""ASSET -- Pan, Zeng, Lyu, Lin & Jia, "ASSET: Robust Backdoor Data Detection Across a Multiplicity of Deep
Learning Paradigms", USENIX Security 2023.

Reference code read: ruoxi-jia-group/ASSET ASSET_demo.ipynb (its README: robust "for Self-Supervised Learning and
transfer learning"); SCLBD/BackdoorBench detection_pretrain/asset.py and config/detection/asset/cifar10.yaml.
Needs a clean base set (the reserve). Offset training of a fresh model f, `epochs` passes (one round, as both
codes), for each batch of D:

  clean step     minimise the mean over a base batch of the variance of f's logits (Adam 1e-4)
  discriminator  a fresh MLP V (two hidden layers of 128, sigmoid, MSE) trained 100 steps to output 1 on the
                 poisoned model's penultimate features of the D batch and 0 on those of the base batch (Adam 1e-4,
                 one optimiser per side, alternating, as the codes)
  select         adjusted outlyingness (medcouple-adjusted boxplot) of V's outputs on the D batch > 2 = suspects
  offset step    maximise f's CE on the suspects (Adam 1e-4, a second optimiser)

then the per-sample CE of f on D, a Gaussian fitted to its lower half, and every sample at or above the point
where that Gaussian's density falls to eps = 1e-6 is removed; the probe is retrained. The codes write that point
as (sigma sqrt(-2 ln(eps) sigma sqrt(2 pi)) + mu) / w (`threshold: reference` runs it): sigma sqrt(2 pi) is
outside the logarithm there, which for a tight loss distribution puts t below the median and removes about half
of the clean data (defenses/_scoring.gaussian_tail_threshold); `density` (default) is the expression it stands for.

Transfer learning (BASELINES.md 2.6, ours): f is the probe's trainable part with a fresh head and the top stages
reset to the received encoder's weights (a fresh head only under a frozen-encoder probe); the poisoned model
("o_model") is M0, the probe trained on D, and V reads its penultimate features (in eval mode; the codes leave
o_model in train mode), standardised with the base set's mean and std. The base set is the clean reserve, not the clean versions of training images
(BackdoorBench's choice, which can hold the originals of poisoned samples).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from securetl import guard
from securetl.interfaces import Knowledge

from ._detection import DetectionDefense
from ._features import Scope, require_clean
from ._scoring import adjusted_outlyingness, gaussian_tail_threshold, host_blas

log = logging.getLogger(__name__)

# discriminator steps between two divergence checks (one host read each; securetl.guard)
_V_CHECK_STEPS = 25


def _discriminator(d: int, hidden: int, layers: int) -> nn.Module:
    mods: list[nn.Module] = [nn.Linear(d, hidden), nn.ReLU()]
    for _ in range(layers - 1):
        mods += [nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(hidden, 1), nn.Sigmoid())


class ASSET(DetectionDefense):
    name = "asset"
    knowledge = Knowledge(clean_fraction=0.05, needs_clean=True)

    def __init__(
        self,
        epochs: int = 1,
        batch_size: int = 256,
        lr: float = 1e-4,
        v_steps: int = 100,
        v_hidden: int = 128,
        v_layers: int = 2,
        v_lr: float = 1e-4,
        outlyingness: float = 2.0,
        eps: float = 1e-6,
        threshold: str = "density",
        clean_fraction: float | None = None,
    ) -> None:
        super().__init__(clean_fraction)
        self.epochs, self.batch_size, self.lr = int(epochs), int(batch_size), lr
        self.v_steps, self.v_hidden, self.v_layers, self.v_lr = (
            int(v_steps),
            int(v_hidden),
            int(v_layers),
            v_lr,
        )
        if threshold not in ("density", "reference"):
            raise ValueError(f"defense.threshold={threshold!r}; choose density or reference")
        self.outlyingness, self.eps, self.threshold = outlyingness, eps, threshold

    def detect(self, encoder, model, train, probe, ctx):
        require_clean(ctx, "ASSET")
        dev, k = ctx.device, ctx.num_classes
        g = ctx.generator(salt=6101)
        torch.manual_seed(ctx.seed * 10 + 6)
        # o_model's penultimate features of D and of the base set (M0 is fixed: computed once)
        fd = self.features(model, train, ctx)
        fb = self.features(model, ctx.clean, ctx)
        # standardised with the base set's statistics (ours): the codes' V reads post-ReLU ResNet features of a
        # fixed scale; an encoder's features here have any scale, which the fixed Adam lr cannot follow
        mean, std = fb.mean(0), fb.std(0).clamp_min(1e-6)
        fd, fb = ((fd - mean) / std).to(dev), ((fb - mean) / std).to(dev)
        scope = Scope.of(encoder, probe, train.x, ctx)
        xd, yd = scope.inputs, train.y
        xb = scope.inputs_for(ctx.clean.x, ctx)
        f = scope.module(k, ctx)
        opt_clean = torch.optim.Adam(f.parameters(), lr=self.lr)
        opt_offset = torch.optim.Adam(f.parameters(), lr=self.lr)
        n, nb = len(yd), len(xb)
        n_suspects = 0
        # checked after every batch of D, where the suspects' selection reads the host anyway (securetl.guard)
        watch = guard.Watch("asset/offset", f, (opt_clean, opt_offset), record=self.diagnostics, unit="batch")
        step = 0
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=g)
            base_perm, base_pos = torch.randperm(nb, generator=g), 0
            for s in range(0, n, self.batch_size):
                b = perm[s : s + self.batch_size]
                if base_pos >= nb:
                    base_perm, base_pos = torch.randperm(nb, generator=g), 0
                bb = base_perm[base_pos : base_pos + self.batch_size]
                base_pos += self.batch_size
                step += 1
                watch.begin()
                # clean step: flatten f's outputs on clean data
                f.train()
                loss = f(xb[bb].to(dev)).var(dim=1).mean()
                watch.observe(loss)
                opt_clean.zero_grad(set_to_none=True)
                loss.backward()
                opt_clean.step()
                # discriminator between the D batch and the base batch
                scores = self._discriminate(fd[b.to(dev)], fb[bb.to(dev)])
                with host_blas():
                    ao = adjusted_outlyingness(scores.numpy())
                suspects = b[torch.from_numpy(ao > self.outlyingness)]
                if len(suspects) > 1:  # the codes skip the offset step otherwise
                    n_suspects += len(suspects)
                    loss = -F.cross_entropy(f(xd[suspects].to(dev)), yd[suspects].to(dev))
                    watch.observe(loss)
                    opt_offset.zero_grad(set_to_none=True)
                    loss.backward()
                    opt_offset.step()
                if watch.end(step) == guard.STOP:
                    break
            if watch.stopped:
                break
        f.eval()
        with torch.no_grad():
            logits = Scope.logits(f, xd, dev)
            losses = F.cross_entropy(logits, yd, reduction="none").double().numpy()
        t = gaussian_tail_threshold(losses, self.eps, self.threshold)
        self.diagnostics["asset/threshold"] = float(t)
        self.diagnostics["asset/offset_suspects"] = n_suspects
        return torch.from_numpy(np.asarray(losses >= t))

    def _discriminate(self, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """Train a fresh V (1 on `pos`, 0 on `neg`) and return its CPU outputs on `pos`."""
        v = _discriminator(pos.shape[1], self.v_hidden, self.v_layers).to(pos.device)
        opt_pos = torch.optim.Adam(v.parameters(), lr=self.v_lr)
        opt_neg = torch.optim.Adam(v.parameters(), lr=self.v_lr)
        watch = guard.Watch(
            "asset/discriminator", v, (opt_pos, opt_neg), record=self.diagnostics, unit="step"
        )
        ones = torch.ones(len(pos), device=pos.device)
        zeros = torch.zeros(len(neg), device=neg.device)
        for step in range(self.v_steps):
            if step % _V_CHECK_STEPS == 0:
                watch.begin()
            loss = F.mse_loss(v(pos).view(-1), ones)
            watch.observe(loss)
            v.zero_grad(set_to_none=True)
            loss.backward()
            opt_pos.step()
            loss = F.mse_loss(v(neg).view(-1), zeros)
            watch.observe(loss)
            v.zero_grad(set_to_none=True)
            loss.backward()
            opt_neg.step()
            if (step + 1) % _V_CHECK_STEPS == 0 and watch.end(step + 1) == guard.STOP:
                break
        if watch.pending:
            watch.end(self.v_steps)
        with torch.no_grad():
            return v(pos).view(-1).float().cpu()
