"""Shared machinery (BASELINES.md section 3): attention transfer (Zagoruyko & Komodakis, "Paying More Attention to
Attention", ICLR 2017), the distillation term of NAD (section 2.11) and of the encoder distillation defense (2.16).

`attention_map`       a feature map's spatial attention: sum over channels of |F_c|^p, L2-normalised over H x W
`attention_loss`      AT(student, teacher) = MSE between the two maps (p = 2 in both NAD and MIMIC)
`attention_transfer`  sum over layers of beta_l AT(student_l, teacher_l), layers with beta 0 skipped
`stage_outputs`       the output of every stage of a stack run on an activation (what AT compares)

Read in bboylyg/NAD at.py (the AT class, after AberHu/Knowledge-Distillation-Zoo) and wssun/MIMIC models/AT.py:
the map is |F|^p summed over channels, divided by its L2 norm over H x W plus eps = 1e-6, and the loss is the mean
squared difference of the maps (F.mse_loss, mean over N x H x W). The maps are computed in fp32 whatever the
autocast: a normalised map's entries are ~1/sqrt(HW), and with beta in the thousands bf16's three digits would
be most of the loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attention_map(fm: Tensor, p: float = 2.0, eps: float = 1e-6) -> Tensor:
    """(N, 1, H, W): sum_c |F_c|^p of a (N, C, H, W) map, divided by its L2 norm over H x W (+ eps)."""
    if fm.dim() != 4:
        raise ValueError(f"attention maps need (N, C, H, W) feature maps, got shape {tuple(fm.shape)}")
    am = fm.float().abs().pow(p).sum(dim=1, keepdim=True)
    return am / (torch.linalg.vector_norm(am, dim=(2, 3), keepdim=True) + eps)


def attention_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """AT: the MSE between the two attention maps; the teacher's side carries no gradient."""
    return F.mse_loss(attention_map(student, p), attention_map(teacher.detach(), p))


def attention_transfer(
    student: Sequence[Tensor], teacher: Sequence[Tensor], betas: Sequence[float], p: float = 2.0
) -> Tensor:
    """sum_l beta_l AT(student_l, teacher_l) over aligned lists of maps; a layer with beta 0 is not computed."""
    if not len(student) == len(teacher) == len(betas):
        raise ValueError(f"{len(student)} student maps, {len(teacher)} teacher maps, {len(betas)} betas")
    total = student[0].new_zeros((), dtype=torch.float32)
    for fs, ft, beta in zip(student, teacher, betas):
        if beta:
            total = total + float(beta) * attention_loss(fs, ft, p)
    return total


def stage_outputs(stages: Sequence[nn.Module], h: Tensor) -> list[Tensor]:
    """The output of each stage of `stages` run in sequence on the activation `h`."""
    outs = []
    for stage in stages:
        h = stage(h)
        outs.append(h)
    return outs


def align_betas(betas: Sequence[float], n_stages: int) -> list[float]:
    """Per-layer weights given for the encoder's LAST stages (the last entry for the last stage), laid over the
    `n_stages` stages actually compared: stages earlier than the list get 0, list entries earlier than those
    stages are dropped (they weigh stages outside the trainable scope, where student and teacher coincide)."""
    betas = [float(b) for b in betas]
    if n_stages <= len(betas):
        return betas[len(betas) - n_stages :]
    return [0.0] * (n_stages - len(betas)) + betas
