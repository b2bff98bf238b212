"""T-Core (Trusted Core Bootstrapping) — Zhang et al., "Secure Transfer Learning: Training Clean Models
Against Backdoor in (Both) Pre-trained Encoders and Downstream Datasets", arXiv 2504.11990 (IEEE S&P 2025).

Proactive: instead of hunting for poison, find what is clean — a seed of data, then a clean subset, then the
encoder channels clean data needs — and grow a model from it. Four phases (../shared/TCORE.md):

  1 TIS            seed S: majority + consistency rules over several layers' representations
  2 expansion      D_sub: confusion training grows S to about half of D
  3 channel filter trusted channels chi vs untrusted psi of the trainable encoder part
  4 bootstrapping  re-initialise psi, freeze chi, train (phi, psi) on a pool grown from D_sub to rho |D|

The trainable part of the encoder is its top `trainable_stages` stages (the transfer-learning budget: "the
head, or a part of the encoder"; the config default is two stages more than probe=finetune trains, since an
encoder implant also lives below that); everything below is frozen and its activations are computed once.
The defense sees the encoder and the labelled training set only: never `poison_idx`.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from securetl import guard
from securetl.interfaces import Defense, Knowledge, LabeledSet, Model, RunContext
from securetl.numerics import take

from .bootstrap import QUOTAS, Trainer, bootstrap
from .channels import Tail, recover_masks, reinit_untrusted, unlearn, unmask, untrusted_from_masks
from .confusion import expand_seed
from .sifting import label_agreement, sift

log = logging.getLogger(__name__)


@torch.no_grad()
def stage_representations(
    encoder,
    x: Tensor,
    ctx: RunContext,
    start: int,
    batch: int = 512,
    grid_at: int | None = None,
    grid: int = 4,
) -> tuple[list[Tensor], Tensor, Tensor | None]:
    """Pooled output of every stage (for TIS), the activation entering stage `start` (for training) and, with
    `grid_at`, the activation entering that stage average-pooled to a grid x grid map (for confusion training).
    The activations stay on the run's device (the later phases train on them there); the rest is on the host,
    where sifting and selection happen. All fp32, whatever precision computed them."""
    num = ctx.num
    num.module(encoder.eval())
    src = num.resident(x)
    pooled: list[list[Tensor]] = []
    acts, grids = [], []
    with num.autocast():
        for i in range(0, len(x), batch):
            h = encoder.normalize(num.batch(src[i : i + batch]))
            outs = []
            for j, stage in enumerate(encoder.stages):
                if j == start:
                    acts.append(h.float())
                if j == grid_at and h.dim() == 4:
                    grids.append(F.adaptive_avg_pool2d(h, grid).flatten(1).float())
                h = stage(h)
                outs.append(encoder.pool(h).float())
            if start >= len(encoder.stages):
                acts.append(encoder.pool(h).float())
            pooled.append(outs)
    layers = [torch.cat([p[j] for p in pooled]).cpu() for j in range(len(encoder.stages))]
    return layers, torch.cat(acts), (torch.cat(grids).cpu() if grids else None)


class TCore(Defense):
    name = "tcore"
    knowledge = Knowledge(clean_fraction=0.0, trains_encoder=True)

    def __init__(
        self,
        # ablation switches
        tis: bool = True,
        expansion: bool = True,
        channel_filter: bool = True,
        bootstrap: bool = True,
        train_encoder: bool = True,
        trainable_stages: int = 4,
        # phase 1: topological invariance sifting
        tis_layers: tuple[int, ...] = (-3, -2, -1),
        tis_logits: bool = True,
        ref_epochs: int = 10,
        alpha: float = 0.02,
        k: int = 10,
        eps_quantile: float = 0.5,
        min_samples: int = 5,
        density_ceiling: float = 0.1,
        agreement: float = 0.5,
        expansion_skips_dense: bool = True,
        pool_skips_dense: str = "off",
        # phase 2: seed expansion
        expansion_agreement: float = 0.7,
        lam: float = 20.0,
        expansion_fractions: tuple[float, ...] = (0.1, 0.2, 0.3),
        confusion_epochs: int = 10,
        confusion_layers: tuple[int, ...] = (-1,),
        confusion_grid: int = 4,
        confusion_grid_stage: int | None = 3,
        # phase 3: channel filtering
        fit_epochs: int = 10,
        unlearn_threshold: float = 0.2,
        unlearn_lr: float = 0.01,
        unlearn_majority_stop: bool = True,
        recover_epochs: int = 10,
        recover_lr: float = 0.05,
        mask_l1: float = 1e-3,
        sigma: float = 0.7,
        max_untrusted: float = 0.6,
        trusted_from: str = "pretrained",
        chi_lr_scale: float = 1.0,
        # phase 4: bootstrapping
        rho: float = 0.9,
        pool_quota: str = "topup",
        class_rho: float = 0.8,
        loss_guided_steps: int = 2,
        meta_guided_steps: int = 2,
        epochs_per_step: int = 5,
        meta_epochs: int = 1,
        final_epochs: int = 15,
        final_cosine: bool = True,
        meta_score: str = "rank_sum",
        lr: float = 1e-3,
        batch_size: int = 128,
        weight_decay: float = 0.0,
        # every phase's loops
        divergence: str = "recover",
    ) -> None:
        super().__init__()
        guard.check_policy(divergence, "defense.divergence")
        for name, v in (
            ("alpha", alpha),
            ("rho", rho),
            ("class_rho", class_rho),
            ("sigma", sigma),
            ("unlearn_threshold", unlearn_threshold),
            ("max_untrusted", max_untrusted),
        ):
            if not 0.0 < v <= 1.0:
                raise ValueError(f"defense.{name}={v} must lie in (0, 1]")
        for name, v in (("agreement", agreement), ("expansion_agreement", expansion_agreement)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"defense.{name}={v} must lie in [0, 1]")
        if not 0.0 <= density_ceiling < 1.0:
            raise ValueError(f"defense.density_ceiling={density_ceiling} must lie in [0, 1)")
        if meta_score not in ("reduction", "rank_sum"):
            raise ValueError(f"defense.meta_score={meta_score!r}; choose reduction or rank_sum")
        if pool_skips_dense not in ("off", "topup", "all"):
            raise ValueError(f"defense.pool_skips_dense={pool_skips_dense!r}; choose off, topup or all")
        if pool_quota not in QUOTAS:
            raise ValueError(f"defense.pool_quota={pool_quota!r}; choose one of {', '.join(QUOTAS)}")
        if trusted_from not in ("fitted", "pretrained"):
            raise ValueError(f"defense.trusted_from={trusted_from!r}; choose fitted or pretrained")
        if any(not 0.0 < f <= 1.0 for f in expansion_fractions):
            raise ValueError("defense.expansion_fractions must lie in (0, 1]")
        self.cfg = {k_: v for k_, v in locals().items() if k_ not in ("self", "__class__")}
        for key, value in self.cfg.items():
            setattr(self, key, value)

    # ------------------------------------------------------------------ the four phases
    def train(self, encoder, train: LabeledSet, probe, ctx: RunContext) -> Model:
        # every loop of the four phases checks for divergence under this policy and records into the row
        with guard.session(self.divergence, self.diagnostics):
            return self._train(encoder, train, probe, ctx)

    def _train(self, encoder, train: LabeledSet, probe, ctx: RunContext) -> Model:
        g = ctx.generator(salt=4242)
        torch.manual_seed(ctx.seed)
        num = ctx.num
        t: dict[str, float] = {}
        y, c = train.y, ctx.num_classes
        t0 = time.perf_counter()
        start, (layers, acts, grid_acts) = self.represent(encoder, train.x, ctx)
        feats = layers[-1]
        t["represent"] = time.perf_counter() - t0

        # ---- phase 1: seed
        t0 = time.perf_counter()
        ref_logits = self._reference_logits(feats, y, c, g) if (self.tis and self.tis_logits) else None
        if self.tis:
            res = self.sift(layers, ref_logits, y)
            seed = res.seed_idx
            collapsed = self._collapsed(res.dense_idx, y)
            exclude = collapsed if self.expansion_skips_dense else None
            pool_exclude = collapsed if self.pool_skips_dense != "off" else None
            self.decisions["tis_majority_idx"] = res.majority_idx
            self.decisions["dense_collapsed_idx"] = collapsed
        else:
            seed, exclude, pool_exclude = self._random_per_class(y, self.alpha, g), None, None
        self.decisions["seed_idx"] = seed
        t["tis"] = time.perf_counter() - t0

        # ---- phase 2: clean subset
        t0 = time.perf_counter()
        subset = seed
        if self.expansion:
            # a sample whose neighbours carry another label does not join: confusion training cannot fit a
            # trigger the frozen features barely carry, and such a poison then ranks among the clean samples
            if self.expansion_agreement > 0:
                if ref_logits is None:
                    ref_logits = self._reference_logits(feats, y, c, g)
                agree = label_agreement([feats, ref_logits], y, self.k)
                gated = torch.nonzero(agree < self.expansion_agreement).squeeze(1)
                self.diagnostics["tcore/expansion_gated"] = len(gated)
                exclude = gated if exclude is None else torch.unique(torch.cat([exclude, gated]))
            # the confusion model must be able to fit a backdoor shortcut: besides pooled features it reads a
            # coarse spatial grid of the activations entering stage `confusion_grid_stage`, where a local trigger shows
            grid = grid_acts if grid_acts is not None else acts  # no spatial map: the pooled features
            cfeats = torch.cat([grid, *[layers[i] for i in self.confusion_layers]], dim=1)
            exp = expand_seed(
                cfeats,
                y,
                seed,
                c,
                g,
                tuple(self.expansion_fractions),
                exclude=exclude,
                lam=self.lam,
                epochs=self.confusion_epochs,
                batch_size=256,
                num=num,
            )
            subset = exp.subset_idx
            for r, idx in enumerate(exp.rounds):
                self.decisions[f"subset_round{r + 1}_idx"] = idx
        self.decisions["subset_idx"] = subset
        t["expansion"] = time.perf_counter() - t0

        # ---- phase 3: trusted channels
        t0 = time.perf_counter()
        g = self._phase_rng(ctx, 3)
        stages = list(encoder.stages[start:])
        trainer_all = Trainer(None, self.lr, self.batch_size, self.weight_decay, num=num, phase="tcore/fit")
        grad_masks = None
        tail = num.module(Tail(stages, encoder.feat_dim, c))
        if self.channel_filter and stages:
            fitted = num.module(Tail(stages, encoder.feat_dim, c))
            trainer_all.train(
                fitted, acts, y, self.fit_epochs, g
            )  # the model D would give: backdoor included
            if self.trusted_from == "fitted":
                # chi keeps what the fitted model learned; psi (the channels clean recovery did not need) restarts
                tail.stages.load_state_dict(fitted.stages.state_dict())
            info = unlearn(
                fitted,
                acts,
                y,
                g,
                self.unlearn_threshold,
                self.unlearn_lr,
                self.batch_size,
                num=num,
                majority_stop=self.unlearn_majority_stop,
            )
            masks = recover_masks(
                fitted,
                take(acts, subset),
                y[subset],
                g,
                self.recover_epochs,
                self.recover_lr,
                self.mask_l1,
                num=num,
            )
            # a NaN mask is neither trusted nor "not below sigma": never read silently as a trusted channel
            guard.require_finite(masks, "tcore/masks", "masks", "non-finite masks counted as untrusted")
            untrusted = untrusted_from_masks(masks, self.sigma, self.max_untrusted)
            grad_masks = reinit_untrusted(tail, untrusted, g)
            n_un = int(sum(int(u.sum()) for u in untrusted.values()))
            self.diagnostics.update(
                {
                    "tcore/untrusted_channels": n_un,
                    "tcore/channels": tail.n_channels(),
                    **{f"tcore/{k_}": v for k_, v in info.items()},
                }
            )
            self.diagnostics["tcore/mask_mean"] = float(torch.cat(list(masks.values())).mean())
        t["channel_filter"] = time.perf_counter() - t0

        # ---- phase 4: bootstrapping
        t0 = time.perf_counter()
        g = self._phase_rng(ctx, 4)
        trainer = Trainer(grad_masks, self.lr, self.batch_size, self.weight_decay, self.chi_lr_scale, num=num)
        train_stages = bool(stages)
        if self.bootstrap:
            res = bootstrap(
                tail,
                acts,
                y,
                subset,
                trainer,
                g,
                self.rho,
                self.loss_guided_steps,
                self.meta_guided_steps,
                self.epochs_per_step,
                self.meta_epochs,
                self.final_epochs,
                train_stages,
                self.pool_quota,
                self.final_cosine,
                self.meta_score,
                self.class_rho,
                exclude=pool_exclude,
                exclude_in_topup_only=self.pool_skips_dense == "topup",
            )
            pool = res.pool_idx
            for i, step in enumerate(res.steps):
                self.decisions[f"pool_step{i + 1}_{step['kind']}_idx"] = step["pool"]
        else:
            pool = subset
            trainer.train(
                tail, take(acts, pool), y[pool], self.final_epochs, g, train_stages, cosine=self.final_cosine
            )
        self.decisions["kept_idx"] = pool
        t["bootstrap"] = time.perf_counter() - t0
        self.diagnostics.update({f"time/tcore_{k_}": round(v, 3) for k_, v in t.items()})

        return self.assemble(encoder, start, tail)

    # ------------------------------------------------------------------ helpers
    def trainable_start(self, encoder) -> int:
        """The first trainable stage (len(stages) when none is trainable)."""
        n_stages = len(encoder.stages)
        k = min(self.trainable_stages, n_stages - 1)
        return n_stages - k if (self.train_encoder and k > 0) else n_stages

    def represent(self, encoder, x: Tensor, ctx: RunContext):
        """`trainable_start` and `stage_representations` for it, with the grid the confusion model reads."""
        start, n_stages = self.trainable_start(encoder), len(encoder.stages)
        grid_at = start if self.confusion_grid_stage is None else self.confusion_grid_stage % n_stages
        return start, stage_representations(encoder, x, ctx, start, grid_at=grid_at, grid=self.confusion_grid)

    @staticmethod
    def assemble(encoder, start: int, tail: Tail) -> Model:
        """The downstream model: the encoder with its stages from `start` replaced by the tail's (masks folded
        into plain BatchNorm), and the tail's head."""
        final = copy.deepcopy(encoder)
        for i, stage in enumerate(tail.stages):
            final.stages[start + i] = unmask(stage)
        return Model(final, tail.head).eval()

    def sift(self, layers: list[Tensor], ref_logits: Tensor | None, y: Tensor):
        """Phase 1 (TIS) over the configured stages' pooled outputs and, when given, the reference logits."""
        views = [layers[i] for i in self.tis_layers] + ([ref_logits] if ref_logits is not None else [])
        return sift(
            views,
            y,
            self.alpha,
            self.k,
            self.eps_quantile,
            self.min_samples,
            density_ceiling=self.density_ceiling,
            agreement=self.agreement,
        )

    @staticmethod
    def _phase_rng(ctx: RunContext, phase: int) -> torch.Generator:
        """A fresh generator (and global seed) per phase, so that how many random draws an earlier phase made
        (a seed of another size, one more confusion round) does not reshuffle the later phases. Measured:
        with one shared stream, TaCT seed 2's unlearning stopped at 10 or 20 steps depending on the seed, and
        the untrusted channels went from 79 to 304 (ACC 87.0 -> 80.2)."""
        torch.manual_seed(ctx.seed * 10 + phase)
        return ctx.generator(salt=4242 + phase)

    def _reference_logits(self, feats: Tensor, y: Tensor, c: int, g: torch.Generator) -> Tensor:
        """Phase 1's reference model: a linear head on the frozen encoder, trained briefly on all of D."""
        f = (feats - feats.mean(0)) / feats.std(0).clamp_min(1e-6)
        head = torch.nn.Linear(f.shape[1], c)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        watch = guard.Watch("tcore/reference_head", head, opt)
        for epoch in range(self.ref_epochs):
            watch.begin()
            perm = torch.randperm(len(y), generator=g)
            for s in range(0, len(y), 256):
                b = perm[s : s + 256]
                loss = F.cross_entropy(head(f[b]), y[b])
                watch.observe(loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if watch.end(epoch + 1) == guard.STOP:
                break
        with torch.no_grad():
            return head(f)

    @staticmethod
    def _collapsed(dense: Tensor, y: Tensor) -> Tensor:
        """The abnormally dense samples of classes holding over twice the dataset's share of them: where a
        group collapsed onto one embedding (an encoder backdoor's target) rather than a class's tight core."""
        counts = torch.bincount(y)
        share = torch.bincount(y[dense], minlength=len(counts)) / counts.clamp_min(1)
        overall = len(dense) / max(1, len(y))
        hot = torch.nonzero(share > 2 * overall).squeeze(1)
        return dense[torch.isin(y[dense], hot)]

    @staticmethod
    def _random_per_class(y: Tensor, frac: float, g: torch.Generator) -> Tensor:
        out = []
        for cls in torch.unique(y):
            idx = torch.nonzero(y == cls).squeeze(1)
            out.append(idx[torch.randperm(len(idx), generator=g)[: max(2, int(round(frac * len(idx))))]])
        return torch.cat(out).sort().values
