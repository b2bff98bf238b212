"""Shared pieces of the encoder attacks.

Pre-training-data attacks (CTRL, SSL-Backdoor, CorruptEncoder) subclass `PretrainDataAttack`: it checks the
poison ratio (always a fraction of the WHOLE pre-training set), finds the attacker's source images by the
pre-training labels, and remembers which rows it altered. Fine-tuning attacks (BadEncoder, DRUPE) share
`embedding_gap`, the diagnostic that says how far triggered embeddings sit from clean ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from securetl.attacks.data._common import choose, count_for
from securetl.interfaces import EncoderAttack, LabeledSet, Trigger, to_float
from securetl.validate import DataSizes


def check_ratio(name: str, ratio: float) -> float:
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(
            f"encoder_attack.{name}={ratio} must lie in [0, 1] (a fraction of the whole pre-training set)"
        )
    return ratio


class PretrainDataAttack(EncoderAttack):
    """Base of the attacks that poison the SSL pre-training set; the SSL trainer then runs as usual.

    target: the downstream class the trigger should map to; pretrain_class: the pre-training category whose
    images the attacker poisons (None = the same index as `target`, right when both domains share classes).
    """

    kind = "pretrain_data"

    def __init__(
        self, trigger: Trigger, target: int = 0, poison_ratio: float = 0.01, pretrain_class: int | None = None
    ) -> None:
        self.trigger, self.target = trigger, int(target)
        self.poison_ratio = check_ratio("poison_ratio", poison_ratio)
        self.pretrain_class = None if pretrain_class is None else int(pretrain_class)
        # rows of the returned set(s), counted across them, that the attack made or altered
        self.poison_idx = torch.empty(0, dtype=torch.long)

    def validate(self, num_classes: int, sizes: DataSizes | None = None) -> None:
        super().validate(num_classes, sizes)
        if self.pretrain_class is not None and self.pretrain_class < 0:
            raise ValueError(f"encoder_attack.pretrain_class={self.pretrain_class} must be >= 0")
        # counted only where the pre-training labels share the downstream classes (unknown otherwise)
        if sizes is not None and sizes.pretrain is not None and self.source_class < len(sizes.pretrain):
            k, have = self.sources_needed(sum(sizes.pretrain)), sizes.pretrain[self.source_class]
            if k > have:
                raise ValueError(
                    f"{self.source_setting()} asks for {k} pre-training images of class {self.source_class}, "
                    f"but the pre-training set holds {have}"
                )

    def sources_needed(self, n_pretrain: int) -> int:
        """How many source-class pre-training images the attack draws (one per poison by default)."""
        return count_for(self.poison_ratio, n_pretrain)

    def source_setting(self) -> str:
        """The setting that sets sources_needed, for messages."""
        return f"encoder_attack.poison_ratio={self.poison_ratio}"

    @property
    def source_class(self) -> int:
        return self.target if self.pretrain_class is None else self.pretrain_class

    def n_poison(self, pretrain: LabeledSet) -> int:
        return count_for(self.poison_ratio, len(pretrain))

    def source_indices(self, pretrain: LabeledSet) -> Tensor:
        idx = torch.nonzero(pretrain.y == self.source_class).squeeze(1)
        if len(idx) == 0:
            raise ValueError(f"the pre-training set has no image of class {self.source_class} to poison")
        return idx

    def choose_sources(self, pretrain: LabeledSet, k: int, generator: torch.Generator) -> Tensor:
        try:
            return choose(
                self.source_indices(pretrain), k, generator, what=f"class-{self.source_class} pre-training"
            )
        except ValueError as e:
            raise ValueError(f"encoder_attack.poison_ratio={self.poison_ratio} is too high: {e}") from e


# --------------------------------------------------------------------------- embedding statistics
def offdiag_mean_cos(f: Tensor) -> Tensor:
    """Mean cosine similarity over distinct pairs of rows of `f` (how concentrated a set of embeddings is)."""
    n = len(f)
    if n < 2:
        return f.new_zeros(())
    z = F.normalize(f, dim=-1)
    s = z @ z.t()
    return (s.sum() - s.diagonal().sum()) / (n * (n - 1))


def sliced_wasserstein(
    a: Tensor, b: Tensor, n_projections: int = 50, generator: torch.Generator | None = None
) -> Tensor:
    """Sliced 2-Wasserstein distance between two equally sized point clouds (N, D): project on random
    unit directions, sort, compare quantiles (the estimator of POT's ot.sliced_wasserstein_distance)."""
    if a.shape != b.shape:
        raise ValueError(
            f"sliced_wasserstein needs equally sized sets, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    proj = torch.randn(a.shape[1], n_projections, generator=generator).to(a.device, a.dtype)
    proj = F.normalize(proj, dim=0)
    pa, pb = (a @ proj).sort(0).values, (b @ proj).sort(0).values
    return ((pa - pb) ** 2).mean().clamp_min(1e-12).sqrt()


@torch.no_grad()
def embedding_gap(
    encoder: nn.Module, x_uint8: Tensor, trigger: Trigger, device: torch.device
) -> dict[str, float]:
    """How separable triggered embeddings are from clean ones under `encoder` (DRUPE's claim is that they
    are not): sliced-Wasserstein distance in units of the clean features' spread, the distance of the two
    means in the same unit, and how concentrated each set is (mean pairwise cosine)."""
    was = encoder.training
    encoder.eval()
    x = to_float(x_uint8).to(device)
    fc, ft = encoder(x), encoder(trigger.apply(x))
    spread = fc.std(0).mean().clamp_min(1e-12)
    g = torch.Generator().manual_seed(0)
    out = {
        "swd": float(sliced_wasserstein(ft, fc, 200, g) / spread),
        "mean_dist": float((ft.mean(0) - fc.mean(0)).norm() / (spread * fc.shape[1] ** 0.5)),
        "poison_concentration": float(offdiag_mean_cos(ft)),
        "clean_concentration": float(offdiag_mean_cos(fc)),
    }
    encoder.train(was)
    return out
