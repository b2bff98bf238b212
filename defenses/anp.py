"""ANP: Adversarial Neuron Pruning -- Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models",
NeurIPS 2021.

Reference code read: csdongxian/ANP_backdoor optimize_mask_cifar.py, prune_neuron_cifar.py, models/anp_batchnorm.py
(as ported in BackdoorBench), recipe.md; SCLBD/BackdoorBench defense/anp.py, config/defense/anp/config.yaml, and its
issue #35 (the threshold picked with test ASR). Needs clean labelled data (1 % of CIFAR-10 in the paper).

  masks     every BN channel of M0's encoder (every stage, as both codes: `stages: null`) gets a mask m in [0, 1]
            (init 1) on its weight, and noise on its weight and bias coefficients: gamma x (m + delta), beta x (1 + xi)
  optimise  each iteration, on a batch of 128 clean samples drawn with replacement:
              delta, xi ~ U[-eps, eps]; `anp_steps` signed-gradient steps (lr eps / steps) that raise the CE
              masks: SGD (lr 0.2, momentum 0.9) on alpha CE(clean) + (1 - alpha) CE(perturbed); clip to [0, 1]
  prune     zero the BN weight (gamma) of every channel of M0 whose mask is <= the threshold

The threshold (or number) is chosen on the held-out part of the clean share (defenses/_pruning.MaskPruning), not by
test ASR. Deviations: the noise is projected back to [-eps, eps] after each signed step (the paper's box
constraint; the code's step can take it to 2 eps); the clean samples are memoised activations, so there is no
crop/flip augmentation. `stages: k` (ours) restricts the masks to M0's top k stages (k = 2: the probe's trainable part
under probe=finetune), a cheaper variant that cannot prune a backdoor living in the lower stages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from securetl.interfaces import RunContext
from securetl.numerics import Numerics, take

from ._pruning import MaskPruning, masked_bns, masks


def set_perturbed(module: nn.Module, on: bool) -> None:
    for _, m in masked_bns(module):
        m.perturbed = on


def optimize_masks(
    module: nn.Module,
    inputs: Tensor,
    y: Tensor,
    g: torch.Generator,
    *,
    eps: float = 0.4,
    steps: int = 1,
    alpha: float = 0.2,
    lr: float = 0.2,
    iterations: int = 2000,
    batch_size: int = 128,
    num: Numerics | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """ANP's mask optimisation on `module`, whose MaskedBNs carry noise; BN in train mode, as the code. Returns the
    largest |noise| used (bounded by eps) and the last loss."""
    num = num or Numerics.resolve(inputs.device)
    bns = [m for _, m in masked_bns(module)]
    ms = [m.mask for m in bns]
    noise = [p for m in bns for p in (m.noise_weight, m.noise_bias)]
    for p in module.parameters():
        p.requires_grad_(False)
    for p in ms:
        p.requires_grad_(True)
    opt = torch.optim.SGD(ms, lr=lr, momentum=0.9)
    src, ys = num.resident(inputs), num.put(y)
    n = len(y)
    g_noise = num.generator(g)  # `g` itself on CPU; on CUDA a device generator, so no host copy per step
    largest = torch.zeros((), device=num.device)
    loss = torch.zeros((), device=num.device)
    module.train()
    for _ in tqdm(range(iterations), desc="anp masks", disable=not progress, leave=False):
        b = num.put(torch.randint(0, n, (batch_size,), generator=g))
        # take: `src` may be pinned host memory (num.resident: the activations did not fit), `b` is on the device
        xb, yb = num.put(take(src, b)), ys[b]
        if eps > 0:
            _adversarial_noise(module, noise, xb, yb, g_noise, eps, steps, num)
            largest = torch.maximum(largest, torch.stack([p.detach().abs().max() for p in noise]).max())
        with num.autocast():
            if eps > 0:
                set_perturbed(module, True)
                loss_rob = F.cross_entropy(module(xb), yb)
            else:
                loss_rob = 0.0
            set_perturbed(module, False)
            loss = alpha * F.cross_entropy(module(xb), yb) + (1 - alpha) * loss_rob
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for m in ms:
                m.clamp_(0.0, 1.0)
    for p in ms:
        p.requires_grad_(False)
    module.eval()
    return {"max_noise": float(largest), "loss": float(loss.detach())}


def _adversarial_noise(module, noise, xb, yb, g, eps, steps, num) -> None:
    """Random start in [-eps, eps], then `steps` signed ascent steps on the CE, each projected back to the box."""
    with torch.no_grad():
        for p in noise:
            p.copy_(torch.rand(p.shape, generator=g, device=g.device).mul_(2).sub_(1).mul_(eps))
    set_perturbed(module, True)
    for p in noise:
        p.requires_grad_(True)
    for _ in range(steps):
        with num.autocast():
            loss = F.cross_entropy(module(xb), yb)
        grads = torch.autograd.grad(loss, noise)
        with torch.no_grad():
            for p, gr in zip(noise, grads):
                p.add_(gr.sign(), alpha=eps / steps).clamp_(-eps, eps)
    for p in noise:
        p.requires_grad_(False)
    set_perturbed(module, False)


class ANP(MaskPruning):
    name = "anp"
    salt = 21101
    noise = True

    def __init__(
        self,
        anp_eps: float = 0.4,
        anp_steps: int = 1,
        anp_alpha: float = 0.2,
        lr: float = 0.2,
        nb_iter: int = 2000,
        batch_size: int = 128,
        stages: int | None = None,
        pruning_by: str = "threshold",
        pruning_max: float = 0.9,
        pruning_step: float = 0.05,
        pruning_number: float | None = None,
        acc_ratio: float = 0.1,
        holdout: float = 0.2,
        clean_fraction: float | None = None,
    ) -> None:
        super().__init__(
            stages, pruning_by, pruning_max, pruning_step, pruning_number, acc_ratio, holdout, clean_fraction
        )
        if anp_eps < 0 or int(anp_steps) < 1 or not 0.0 <= anp_alpha <= 1.0:
            raise ValueError("defense: anp_eps >= 0, anp_steps >= 1 and anp_alpha in [0, 1] are required")
        self.eps, self.steps, self.alpha = anp_eps, int(anp_steps), anp_alpha
        self.lr, self.iterations, self.batch_size = lr, int(nb_iter), int(batch_size)

    def learn_masks(self, work, inputs, y, g, ctx: RunContext) -> dict[str, Tensor]:
        info = optimize_masks(
            work,
            inputs,
            y,
            g,
            eps=self.eps,
            steps=self.steps,
            alpha=self.alpha,
            lr=self.lr,
            iterations=self.iterations,
            batch_size=self.batch_size,
            num=ctx.num,
            progress=ctx.progress,
        )
        self.diagnostics["anp/max_noise"] = info["max_noise"]
        self.diagnostics["anp/mask_loss"] = info["loss"]
        return masks(work)
