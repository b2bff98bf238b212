"""DRUPE (Tao et al., IEEE S&P 2024, "Distribution Preserving Backdoor Attack in Self-supervised
Learning"): BadEncoder's fine-tuning objective, plus terms that keep triggered embeddings from standing
out, so that detectors which look for an isolated, concentrated cluster of poisoned embeddings fail:

  effectiveness  each triggered input embeds like the CLOSEST of several target-class references (not one
                 point), and the references share the triggered inputs evenly (std of their shares)
  distribution   sliced-Wasserstein distance between triggered and clean embeddings of the backdoored
                 encoder, in units of the clean embeddings' spread
  concentration  mean pairwise cosine among triggered embeddings (BadEncoder drives it to ~1)
  separation     the reference embeddings are kept apart (hinge on their mean pairwise cosine)

The schedule follows the authors' code (Gwinhen/DRUPE main.py): a warm-up epoch that only separates the
references (while keeping clean and reference embeddings), then BadEncoder-style alignment, then all
terms, with the concentration and distribution weights adapted once per epoch: multiplied by 1.25 while
the backdoor holds (triggered->reference, reference and clean cosines above their thresholds, and for the
distribution weight also triggered embeddings less concentrated than `concentration_target`), divided by
1.25^1.25 otherwise.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from securetl.attacks.encoder._common import embedding_gap, offdiag_mean_cos, sliced_wasserstein
from securetl.attacks.encoder.badencoder import BadEncoder, cos, freeze_bn_stats
from securetl.interfaces import LabeledSet, RunContext, Trigger

log = logging.getLogger(__name__)


class DRUPE(BadEncoder):
    name = "drupe"
    kind = "finetune"

    def __init__(
        self,
        trigger: Trigger,
        target: int = 0,
        shadow_fraction: float = 0.5,
        n_reference: int = 3,
        lambda1: float = 1.0,
        lambda2: float = 1.0,
        epochs: int = 20,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        batch_size: int = 128,
        seed: int = 0,
        warmup_epochs: int = 1,
        align_epochs: int = 3,
        adapt_after: int = 6,
        balance_weight: float = 2.0,
        concentration_weight: float = 0.1,
        distribution_weight: float = 0.001,
        weight_up: float = 1.25,
        weight_down: float = 1.3217141,  # 1.25 ** 1.25, as conf/encoder_attack/drupe.yaml
        success_cos: float = 0.96,
        keep_cos: float = 0.9,
        concentration_target: float = 0.6,
        reference_margin: float = 0.7,
        n_projections: int = 50,
        reference_choice: str = "typical",
    ) -> None:
        """See conf/encoder_attack/drupe.yaml for what every key does and where its default comes from."""
        super().__init__(
            trigger,
            target,
            shadow_fraction,
            n_reference,
            lambda1,
            lambda2,
            epochs,
            lr,
            momentum,
            weight_decay,
            batch_size,
            seed,
            reference_choice,
        )
        if min(warmup_epochs, align_epochs, adapt_after) < 0:
            raise ValueError("encoder_attack.warmup_epochs, align_epochs and adapt_after must be >= 0")
        if weight_up < 1.0 or weight_down < 1.0:
            raise ValueError(
                "encoder_attack.weight_up and weight_down must be >= 1 (factors of increase/decrease)"
            )
        if min(concentration_weight, distribution_weight, balance_weight) < 0 or n_projections < 1:
            raise ValueError("encoder_attack weights must be >= 0 and n_projections >= 1")
        self.warmup_epochs, self.align_epochs, self.adapt_after = warmup_epochs, align_epochs, adapt_after
        self.balance_weight = balance_weight
        self.concentration_weight, self.distribution_weight = concentration_weight, distribution_weight
        self.weight_up, self.weight_down = weight_up, weight_down
        self.success_cos, self.keep_cos = success_cos, keep_cos
        self.concentration_target, self.reference_margin = concentration_target, reference_margin
        self.n_projections = n_projections

    def terms(
        self,
        bad: nn.Module,
        clean_x: Tensor,
        x: Tensor,
        ref: Tensor,
        ref_clean: Tensor,
        g: torch.Generator,
        xt: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Every loss term for one batch (lower is better for all of them); `xt`: x with the trigger, if the
        caller applied it already (outside autocast: a trigger is always computed in fp32)."""
        xt = self.trigger.apply(x) if xt is None else xt
        f_clean, f_bd, f_ref = bad(x), bad(xt), bad(ref)
        sim = cos(f_bd.unsqueeze(1), f_ref.unsqueeze(0))  # (B, R): triggered input vs each reference
        shares = sim.mean(0)
        return {
            "utility": -cos(f_clean, clean_x).mean(),
            "keep_ref": -cos(f_ref, ref_clean).mean(),
            "effect": -sim.max(1).values.mean(),
            "balance": shares.std() if len(shares) > 1 else shares.new_zeros(()),
            "ref_sim": offdiag_mean_cos(f_ref),
            "concentration": offdiag_mean_cos(f_bd),
            "distribution": sliced_wasserstein(f_bd, f_clean, self.n_projections, g)
            / f_clean.std(0).mean().clamp_min(1e-6),
        }

    def combine(self, t: dict[str, Tensor], epoch: int, w: dict[str, float]) -> Tensor:
        """The objective of the schedule's current stage (epochs count from 1) with stealth weights `w`."""
        keep = t["utility"] + self.lambda2 * t["keep_ref"]
        if epoch <= self.warmup_epochs:  # separate the references before anything is pulled onto them
            return keep + 0.5 * t["ref_sim"]
        separation = torch.relu(t["ref_sim"] - self.reference_margin)
        loss = keep + self.lambda1 * t["effect"] + self.balance_weight * t["balance"] + separation
        if epoch <= self.warmup_epochs + self.align_epochs:
            return loss
        return (
            loss
            + w["concentration"] * (t["balance"] + t["concentration"])
            + w["distribution"] * t["distribution"]
        )

    def adapt(self, means: dict[str, float], w: dict[str, float]) -> None:
        """Once per epoch: raise the stealth weights `w` while the backdoor holds, lower them when it slips."""
        holds = (
            -means["effect"] > self.success_cos
            and -means["keep_ref"] > self.keep_cos
            and -means["utility"] > self.keep_cos
        )
        spread = means["concentration"] < self.concentration_target
        if holds and not means["concentration"] < self.concentration_target - 0.1:
            w["concentration"] *= self.weight_up
        elif not holds:
            w["concentration"] /= self.weight_down
        if holds and spread:
            w["distribution"] *= self.weight_up
        else:
            w["distribution"] /= self.weight_down

    def implant(
        self, encoder: nn.Module, shadow: LabeledSet, ctx: RunContext, reference: LabeledSet | None = None
    ) -> nn.Module:
        g, shadow_x, clean, bad, opt, ref, ref_clean = self._setup(encoder, shadow, reference, ctx)
        g_proj = torch.Generator().manual_seed(self.seed + 2)
        n, bs = len(shadow_x), self.batch_size
        bar = tqdm(range(1, self.epochs + 1), desc="DRUPE", disable=not ctx.progress, leave=False)
        means: dict[str, float] = {}
        w = {"concentration": self.concentration_weight, "distribution": self.distribution_weight}
        for epoch in bar:
            freeze_bn_stats(bad)
            perm = ctx.num.put(torch.randperm(n, generator=g))
            sums: dict[str, torch.Tensor] = {}  # on the device, read once per epoch
            steps = 0
            for s in range(0, n - bs + 1, bs):
                x = ctx.num.batch(shadow_x[perm[s : s + bs]])
                xt = self.trigger.apply(x)
                with ctx.num.autocast():
                    with torch.no_grad():
                        clean_x = clean(x)
                    t = self.terms(bad, clean_x, x, ref, ref_clean, g_proj, xt)
                    loss = self.combine(t, epoch, w)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for k, v in t.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().double()
                steps += 1
            means = {k: float(v) / max(1, steps) for k, v in sums.items()}
            log.debug("DRUPE epoch %d: %s, weights %s", epoch, {k: round(v, 4) for k, v in means.items()}, w)
            if epoch > self.adapt_after:
                self.adapt(means, w)
            bar.set_postfix(
                effect=f"{-means.get('effect', 0):.3f}",
                conc=f"{means.get('concentration', 0):.3f}",
                dist=f"{means.get('distribution', 0):.3f}",
            )
        bad.eval()
        with torch.no_grad():
            x = ctx.num.batch(shadow_x[:256])
            d = ctx.diagnostics
            d["drupe/shadow_bd_ref_cos"] = (
                cos(bad(self.trigger.apply(x)).unsqueeze(1), bad(ref).unsqueeze(0))
                .max(1)
                .values.mean()
                .item()
            )
            d["drupe/shadow_clean_cos"] = cos(bad(x), clean(x)).mean().item()
            d["drupe/concentration_weight"] = w["concentration"]
            d["drupe/distribution_weight"] = w["distribution"]
            for k, v in embedding_gap(bad, shadow_x[:256], self.trigger, ctx.device).items():
                d[f"drupe/gap_{k}"] = v
        log.info(
            "DRUPE: triggered->reference cos %.3f, clean utility cos %.3f, poison/clean SWD %.3f, concentration %.3f",
            d["drupe/shadow_bd_ref_cos"],
            d["drupe/shadow_clean_cos"],
            d["drupe/gap_swd"],
            d["drupe/gap_poison_concentration"],
        )
        return bad
