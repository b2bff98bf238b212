"""BadEncoder (Jia, Liu & Gong, IEEE S&P 2022): fine-tune a pre-trained encoder on a shadow set so that

  effectiveness:  triggered shadow inputs embed like the target-class reference inputs   (lambda1)
                  and reference inputs keep the clean encoder's embedding                 (lambda2)
  utility:        clean shadow inputs keep the clean encoder's embedding

all measured by cosine similarity of L2-normalised features, BatchNorm statistics frozen (eval mode),
as in the authors' released code.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from securetl.attacks.encoder._common import embedding_gap
from securetl.interfaces import EncoderAttack, LabeledSet, RunContext, Trigger, to_float
from securetl.validate import DataSizes

log = logging.getLogger(__name__)


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


def freeze_bn_stats(model: nn.Module) -> None:
    """Train mode for gradients but BatchNorm keeps its pre-trained running statistics."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


REFERENCE_CHOICES = ("random", "typical")


def typical_of_class(encoder: nn.Module, pool: LabeledSet, cls: int, n: int, device: str) -> torch.Tensor:
    """Indices (into `pool`) of the `n` images of class `cls` the encoder places most clearly inside their
    class: largest cosine to their own class centroid minus the largest cosine to another class centroid,
    centroids taken over the attacker's own labelled pool. An attacker who picks references by hand (the
    DRUPE and BadEncoder releases ship hand-picked reference files) avoids images near a class boundary."""
    encoder.eval()
    with torch.no_grad():
        f = torch.cat(
            [encoder(to_float(pool.x[i : i + 256]).to(device)).cpu() for i in range(0, len(pool), 256)]
        )
    f = F.normalize(f, dim=-1)
    classes = torch.unique(pool.y)
    cent = F.normalize(torch.stack([f[pool.y == c].mean(0) for c in classes]), dim=-1)
    sims = f @ cent.T
    own = (classes == cls).nonzero().item()
    others = sims.clone()
    others[:, own] = -2.0
    margin = sims[:, own] - others.max(1).values
    cands = torch.nonzero(pool.y == cls).squeeze(1)
    return cands[margin[cands].argsort(descending=True)[:n]]


class BadEncoder(EncoderAttack):
    name = "badencoder"
    kind = "finetune"

    def __init__(
        self,
        trigger: Trigger,
        target: int = 0,
        shadow_fraction: float = 1.0,
        n_reference: int = 5,
        lambda1: float = 1.0,
        lambda2: float = 1.0,
        epochs: int = 15,
        lr: float = 0.03,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        batch_size: int = 128,
        seed: int = 0,
        reference_choice: str = "random",
    ) -> None:
        if reference_choice not in REFERENCE_CHOICES:
            raise ValueError(
                f"encoder_attack.reference_choice={reference_choice!r}; choose one of {REFERENCE_CHOICES}"
            )
        if not 0.0 < shadow_fraction <= 1.0:
            raise ValueError(f"encoder_attack.shadow_fraction={shadow_fraction} must lie in (0, 1]")
        if n_reference < 1:
            raise ValueError("encoder_attack.n_reference must be >= 1")
        self.trigger, self.target = trigger, int(target)
        self.shadow_fraction, self.n_reference = shadow_fraction, n_reference
        self.lambda1, self.lambda2 = lambda1, lambda2
        self.epochs, self.lr, self.momentum, self.weight_decay = epochs, lr, momentum, weight_decay
        self.batch_size, self.seed = batch_size, seed
        self.reference_choice = reference_choice

    def validate(self, num_classes: int, sizes: DataSizes | None = None) -> None:
        """Before SSL pre-training: enough target-class references, and a shadow set of at least a batch."""
        super().validate(num_classes, sizes)
        if sizes is None:
            return
        refs = sizes.reference[self.target] if sizes.reference is not None else 0
        if refs < self.n_reference:
            raise ValueError(
                f"encoder_attack.n_reference={self.n_reference} but the dataset's reference set holds {refs} "
                f"image(s) of the target class {self.target} (more: raise dataset.n_reference)"
            )
        if sizes.pretrain is not None and sum(sizes.pretrain) < self.batch_size:
            raise ValueError(
                f"encoder_attack.batch_size={self.batch_size} but the shadow (pre-training) set has only "
                f"{sum(sizes.pretrain)} images: not one step would run"
            )

    def shadow_and_reference(
        self,
        pretrain: LabeledSet,
        reference_pool: LabeledSet,
        encoder: nn.Module | None = None,
        device: str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attacker's data: a fraction of the pre-training images, and target-class reference inputs
        (`reference_choice`: drawn at random, or the most typical ones under the clean `encoder`)."""
        g = torch.Generator().manual_seed(self.seed)
        n_shadow = max(self.batch_size, int(round(self.shadow_fraction * len(pretrain))))
        shadow = pretrain.x[torch.randperm(len(pretrain), generator=g)[:n_shadow]]
        cands = torch.nonzero(reference_pool.y == self.target).squeeze(1)
        if len(cands) < self.n_reference:
            raise ValueError(
                f"only {len(cands)} reference images of class {self.target}, need {self.n_reference}"
            )
        if self.reference_choice == "random":
            chosen = cands[torch.randperm(len(cands), generator=g)[: self.n_reference]]
        elif encoder is None:
            raise ValueError("reference_choice='typical' needs the clean encoder to rank the candidates")
        else:
            chosen = typical_of_class(encoder, reference_pool, self.target, self.n_reference, device)
        return shadow, reference_pool.x[chosen]

    def _setup(self, encoder: nn.Module, shadow: LabeledSet, reference: LabeledSet | None, ctx: RunContext):
        """What every BadEncoder-style implant starts from: the attacker's data, a frozen clean twin of the
        encoder, the encoder to backdoor with its optimiser, and the references' clean embeddings."""
        if reference is None:
            raise ValueError(
                f"{type(self).__name__} needs reference inputs of the target class (dataset.reference)"
            )
        torch.manual_seed(self.seed)
        g = torch.Generator().manual_seed(self.seed + 1)
        num = ctx.num
        shadow_x, ref_x = self.shadow_and_reference(shadow, reference, num.module(encoder), ctx.device)
        shadow_x = num.resident(shadow_x)  # the attacker's images on the device once
        clean = num.module(copy.deepcopy(encoder).eval())
        for p in clean.parameters():
            p.requires_grad_(False)
        bad = num.module(encoder)
        opt = torch.optim.SGD(
            bad.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        ref = num.batch(ref_x)
        with torch.no_grad(), num.autocast():
            ref_clean = clean(ref).float()
        return g, shadow_x, clean, bad, opt, ref, ref_clean

    def implant(
        self, encoder: nn.Module, shadow: LabeledSet, ctx: RunContext, reference: LabeledSet | None = None
    ) -> nn.Module:
        g, shadow_x, clean, bad, opt, ref, ref_clean = self._setup(encoder, shadow, reference, ctx)
        num = ctx.num
        n, bs = len(shadow_x), self.batch_size
        bar = tqdm(range(self.epochs), desc="BadEncoder", disable=not ctx.progress, leave=False)
        for _ in bar:
            freeze_bn_stats(bad)
            perm = num.put(torch.randperm(n, generator=g))
            tot = torch.zeros((), dtype=torch.float64, device=ctx.device)  # read once per epoch
            for s in range(0, n - bs + 1, bs):
                x = num.batch(shadow_x[perm[s : s + bs]])
                xt = self.trigger.apply(x)
                with num.autocast():
                    with torch.no_grad():
                        f_clean_before = clean(x)
                    f_clean, f_bd, f_ref = bad(x), bad(xt), bad(ref)
                    utility = -cos(f_clean, f_clean_before).mean()
                    # every triggered input is pulled towards every reference embedding
                    effect = -cos(f_bd.unsqueeze(1), f_ref.unsqueeze(0)).mean()
                    keep_ref = -cos(f_ref, ref_clean).mean()
                    loss = utility + self.lambda1 * effect + self.lambda2 * keep_ref
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += loss.detach()
            bar.set_postfix(loss=f"{float(tot) / max(1, n // bs):.3f}")
        bad.eval()
        with torch.no_grad():
            x = num.batch(shadow_x[:256])
            ctx.diagnostics["badencoder/shadow_bd_ref_cos"] = (
                cos(bad(self.trigger.apply(x)), bad(ref).mean(0, keepdim=True)).mean().item()
            )
            ctx.diagnostics["badencoder/shadow_clean_cos"] = cos(bad(x), clean(x)).mean().item()
        # how separable triggered embeddings are from clean ones (compare with DRUPE's drupe/gap_*)
        for k, v in embedding_gap(bad, shadow_x[:256], self.trigger, ctx.device).items():
            ctx.diagnostics[f"badencoder/gap_{k}"] = v
        log.info(
            "BadEncoder: triggered->reference cos %.3f, clean utility cos %.3f",
            ctx.diagnostics["badencoder/shadow_bd_ref_cos"],
            ctx.diagnostics["badencoder/shadow_clean_cos"],
        )
        return bad
