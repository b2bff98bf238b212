"""CT: Confusion Training -- Qi, Xie, Wang & Mittal, "Towards A Proactive ML Approach for Detecting Backdoor Poison
Samples", USENIX Security 2023.

Reference code read: Unispac/Fight-Poison-With-Poison ct_cleanser.py, confusion_training.py, config.py,
README.md (the toolbox copy is deprecated). Needs the clean reserve. Rounds r = 0 .. len(distillation_ratio):

  pretrain   train the "base" model on the current distilled set (all of D in round 0; distilled + clean in the
             last round), starting from the previous round's base; SGD lr 0.01, momentum 0.9, wd 1e-4, batch 32
  confuse    from the base, `confusion_steps[r]` SGD steps (lr lrs[r], momentum momentums[r], wd 1e-4, batch 32):
             every step a clean batch relabelled (prediction + rounder + step) mod K -- never the predicted class;
             the predictions come from ONE model trained on all of D, the same in every round (confusion_train
             loads full_base_aug in every round; here round 0's base, see `detect`); every `batch_factors[r]`-th
             step also a distilled batch, loss ((lambda-1) CE_confusion + CE_inspection) / lambda with
             CE_inspection weighted per class by 1 / sqrt(freq + 0.001) (1 in the last round); other steps the
             confusion CE alone
  distill    per-sample CE of the confused model on D: keep the lowest distillation_ratio[r] |D|, topped up to
             n_c x min_class_share[r] per class (n_c // 50, n_c // 100 in the round before the last: distill's
             rate_factor); in the last round the middle `median_sample_rate` of each class's loss ranking is the
             "clean chunklet"
  identify   per class, the confused model's own penultimate features (what enters its last linear layer) in
             2-D (PCA); the samples predicted as their own label are "isolated"; one-Gaussian model: Gaussian 0
             fitted on the samples NOT isolated, for all of the class; two-Gaussian model: Gaussian 1 on the
             isolated ones for them; ratio exp((LL_two - LL_one) / n_c), 1 unless 2 <= n_isolated <= n_c - 2
             (HEAD identify_poison_samples_simplified; the chunklet is only checked to hold >= 2 samples of every
             class); flag the class of the largest ratio when it exceeds `max_ratio_threshold` (1.5) and any
             class over `ratio_threshold` (2); remove the flagged classes' samples predicted as their own label

Transfer learning: the trained model is the probe's trainable part (a head on frozen features, or the top stages
and a head on the activations entering them, initialised from the received encoder), the same scope as the
final probe. Ours: the fixed model behind the confusion labels is round 0's base (trained on all of D by the
pretrain step, no augmentation) rather than a separately trained full_base_aug (M0 would be that, but CT
trains no M0: uses_reference_model is False). The reference's debug ASR on the test set has no counterpart
here. Schedules: the YAML holds the paper's (CIFAR-10 config.py); conf/deltas/synthetic.yaml shrinks epochs
and steps for the CPU-sized default.
T-Core's phase 2 (defenses/tcore/confusion.py) is a different confusion loop (random wrong labels on a trusted
seed, Adam, an MLP on features, no distillation rounds), so the two share no code.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from securetl import guard
from securetl.interfaces import Knowledge

from ._detection import DetectionDefense
from ._features import Scope, require_clean
from ._scoring import host_blas

log = logging.getLogger(__name__)


def _sgd(module: nn.Module, lr: float, momentum: float, wd: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum, weight_decay=wd)


# confusion steps between two divergence checks (one host read each; securetl.guard)
_CHECK_STEPS = 100


def _train_epochs(
    module, x, y, epochs, opt, batch, g, device, phase: str = "ct/pretrain", record: dict | None = None
) -> None:
    """Divergence is checked once an epoch (securetl.guard; recorded into `record` under `phase`)."""
    module.train()
    n = len(y)
    watch = guard.Watch(phase, module, opt, record=record)
    for epoch in range(epochs):
        watch.begin()
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch):
            b = perm[s : s + batch]
            loss = F.cross_entropy(module(x[b].to(device)), y[b].to(device))
            watch.observe(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if watch.end(epoch + 1) == guard.STOP:
            break
    module.eval()


class _Cycler:
    """Batches of indices drawn without replacement, reshuffled at every pass (a DataLoader with shuffle)."""

    def __init__(self, n: int, batch: int, g: torch.Generator) -> None:
        self.n, self.batch, self.g, self.perm, self.pos = n, batch, g, torch.randperm(n, generator=g), 0

    def next(self) -> Tensor:
        if self.pos >= self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.g), 0
        b = self.perm[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return b


@torch.no_grad()
def _outputs(module, x, device, batch: int = 1024) -> Tensor:
    module.eval()
    return torch.cat([module(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)])


def _middle(m: int, rate: float) -> tuple[int, int]:
    """Start and end of the middle `rate` of a class's m samples ranked by loss: the reference's chunklet slice."""
    return int(m / 2 - m * rate / 2), int(m / 2 + m * rate / 2)


def _penultimate(module: nn.Module, x: Tensor, device) -> Tensor:
    """The module's own penultimate layer, what enters its last linear layer (the reference's return_hidden):
    under an MLP head its hidden activation; under a linear head the head's input (Scope.penultimate: the frozen
    features, or the trainable stages' pooled output). Scope.penultimate alone would give the frozen encoder's
    features under probe=mlp, which confusion training never changes."""
    feats = Scope.penultimate(module, x, device)
    head = Scope.head_of(module)
    # an MLP head is Standardize, Linear, ReLU, Linear (probe.make_head); a linear one Standardize, Linear
    if isinstance(head, nn.Sequential) and len(head) > 2:
        return _outputs(head[:-1], feats, device)
    return feats


def _gauss_loglik(z: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Log-density of rows z under N(mean, cov) (cov made positive definite by a pseudo-inverse fallback)."""
    d = len(mean)
    w, v = np.linalg.eigh((cov + cov.T) / 2)
    w = np.clip(w, 1e-12, None)
    diff = (z - mean) @ v
    return -0.5 * ((diff**2 / w).sum(1) + np.log(w).sum() + d * np.log(2 * np.pi))


def likelihood_ratio(proj: np.ndarray, isolated: np.ndarray) -> float:
    """exp((LL of the two-Gaussian model - LL of the one-Gaussian model) / n) for one class (2-D features), as
    HEAD identify_poison_samples_simplified: Gaussian 0 is fitted on the samples NOT isolated and is the whole
    one-Gaussian model; 1 unless 2 <= n_isolated <= n - 2 (both Gaussians need two samples for a covariance).
    The Nov 2022 versions fitted Gaussian 0 on the clean chunklet (threshold 5, then e); HEAD dropped that."""
    n, n_iso = len(proj), int(isolated.sum())
    if not 2 <= n_iso <= n - 2:
        return 1.0
    other = ~isolated
    mu0, mu1 = proj[other].mean(0), proj[isolated].mean(0)
    cov0 = np.cov(proj[other].T) + 0.001  # the reference adds 0.001 to every entry
    cov1 = np.cov(proj[isolated].T) + 0.001
    one = _gauss_loglik(proj, mu0, cov0)
    two = np.where(isolated, _gauss_loglik(proj, mu1, cov1), one)
    # capped: a well-separated pair overflows exp(), and any ratio this large is far past every threshold
    return float(np.exp(min((two.sum() - one.sum()) / len(proj), 700.0)))


class ConfusionTraining(DetectionDefense):
    name = "ct"
    knowledge = Knowledge(clean_fraction=0.05, needs_clean=True)
    uses_reference_model = False  # the rounds train their own models from the received encoder

    def __init__(
        self,
        distillation_ratio: tuple[float, ...] = (1 / 2, 1 / 5, 1 / 25, 1 / 50, 1 / 100),
        lambs: tuple[float, ...] = (20, 20, 20, 30, 30, 15),
        momentums: tuple[float, ...] = (0.7, 0.7, 0.7, 0.7, 0.7, 0.7),
        lrs: tuple[float, ...] = (1e-3, 1e-3, 1e-3, 1e-2, 1e-2, 1e-2),
        batch_factors: tuple[int, ...] = (2, 2, 2, 2, 2, 2),
        pretrain_epochs: tuple[int, ...] = (100, 100, 40, 40, 40, 40),
        confusion_steps: tuple[int, ...] = (6000, 6000, 6000, 6000, 2000, 2000),
        pretrain_lr: float = 0.01,
        weight_decay: float = 1e-4,
        batch_size: int = 32,
        min_class_share: tuple[float, ...] = (1 / 50, 1 / 50, 1 / 50, 1 / 50, 1 / 100),
        median_sample_rate: float = 0.1,
        max_ratio_threshold: float = 1.5,
        ratio_threshold: float = 2.0,
        clean_fraction: float | None = None,
    ) -> None:
        super().__init__(clean_fraction)
        rounds = len(distillation_ratio) + 1
        for key, v in (
            ("lambs", lambs),
            ("momentums", momentums),
            ("lrs", lrs),
            ("batch_factors", batch_factors),
            ("pretrain_epochs", pretrain_epochs),
            ("confusion_steps", confusion_steps),
        ):
            if len(v) != rounds:
                raise ValueError(
                    f"defense.{key} needs {rounds} values (len(distillation_ratio) + 1), got {len(v)}"
                )
        if len(min_class_share) != len(distillation_ratio):  # one per distillation (rounds 0 .. last - 1)
            raise ValueError(
                f"defense.min_class_share needs {len(distillation_ratio)} values (one per distillation_ratio), "
                f"got {len(min_class_share)}"
            )
        if any(lam <= 1 for lam in lambs):
            raise ValueError(
                "defense.lambs must be > 1 (the loss is ((lambda-1) CE_conf + CE_insp) / lambda)"
            )
        self.distillation_ratio, self.lambs, self.momentums = (
            list(distillation_ratio),
            list(lambs),
            list(momentums),
        )
        self.lrs, self.batch_factors = list(lrs), [int(b) for b in batch_factors]
        self.pretrain_epochs, self.confusion_steps = (
            [int(e) for e in pretrain_epochs],
            [int(s) for s in confusion_steps],
        )
        self.pretrain_lr, self.weight_decay, self.batch_size = pretrain_lr, weight_decay, int(batch_size)
        self.min_class_share, self.median_sample_rate = list(min_class_share), median_sample_rate
        self.max_ratio_threshold, self.ratio_threshold = max_ratio_threshold, ratio_threshold

    # ------------------------------------------------------------------ the rounds
    def detect(self, encoder, model, train, probe, ctx):
        require_clean(ctx, "CT")
        dev, k = ctx.device, ctx.num_classes
        g = ctx.generator(salt=5101)
        torch.manual_seed(ctx.seed * 10 + 5)
        # the chunklet is the middle of each class's ranking over all of D, so its size is known before training:
        # refuse here what _identify would refuse after every round of confusion training
        rate = self.median_sample_rate
        short = [
            c
            for c, m in enumerate(torch.bincount(train.y, minlength=k).tolist())
            if len(range(*_middle(m, rate))) < 2
        ]
        if short:
            raise ValueError(
                f"CT: the clean chunklet would hold fewer than 2 samples of classes {short} (too few samples per "
                "class for median_sample_rate; raise defense.median_sample_rate)"
            )
        scope = Scope.of(encoder, probe, train.x, ctx)  # from the received encoder, as the final probe
        xd, yd = scope.inputs, train.y
        xc, yc = scope.inputs_for(ctx.clean.x, ctx), ctx.clean.y
        n = len(yd)
        base = scope.module(k, ctx)
        distilled = torch.arange(n)
        last = len(self.distillation_ratio)
        confused, chunklet, preds = base, None, None
        for r in range(last + 1):
            counts = torch.bincount(yd[distilled], minlength=k).double()
            weights = 1.0 / torch.sqrt(counts / len(distilled) + 0.001)
            if r == last:
                weights[:] = 1.0
            # pretrain the base on the distilled set (and the clean set in the last round)
            px, py = xd[distilled], yd[distilled]
            if r == last:
                px, py = torch.cat([px, xc]), torch.cat([py, yc])
            opt = _sgd(base, self.pretrain_lr, 0.9, self.weight_decay)
            phase = f"ct/round{r}/pretrain"
            epochs = self.pretrain_epochs[r]
            _train_epochs(base, px, py, epochs, opt, self.batch_size, g, dev, phase, self.diagnostics)
            # confusion training from the base. Its labels come from one model trained on all of D, fixed for
            # every round (confusion_train loads full_base_aug each round): round 0's base, not this round's,
            # which from round 1 on is retrained on the shrinking distilled set
            if preds is None:
                preds = _outputs(base, xc, dev).argmax(1)
            confused = copy.deepcopy(base)
            self._confuse(confused, xd[distilled], yd[distilled], xc, preds, weights.float(), r, g, dev, k)
            loss = F.cross_entropy(_outputs(confused, xd, dev), yd, reduction="none")
            order = torch.argsort(loss, stable=True)
            per_class = [order[yd[order] == c] for c in range(k)]  # each class's samples, lowest loss first
            if r < last:
                head = order[: int(self.distillation_ratio[r] * n)]
                have = torch.bincount(yd[head], minlength=k)
                # distill's rate_factor: 50, and 100 in the round before the last
                factor = round(1 / self.min_class_share[r])
                extra = [per_class[c][int(have[c]) : len(per_class[c]) // factor] for c in range(k)]
                distilled = torch.unique(torch.cat([head, *extra]))
                self.diagnostics[f"ct/round{r}_distilled"] = len(distilled)
                self.decisions[f"ct_round{r}_idx"] = distilled
            else:
                parts = []
                for c in range(k):
                    st, ed = _middle(len(per_class[c]), self.median_sample_rate)
                    parts.append(per_class[c][st:ed])
                chunklet = torch.cat(parts)
        self.decisions["ct_chunklet_idx"] = chunklet
        return self._identify(confused, scope, xd, yd, chunklet, k, dev)

    def _confuse(self, model, xd, yd, xc, preds, weights, r, g, dev, k) -> None:
        lam, bf = self.lambs[r], self.batch_factors[r]
        opt = _sgd(model, self.lrs[r], self.momentums[r], self.weight_decay)
        clean_b, insp_b = _Cycler(len(xc), self.batch_size, g), _Cycler(len(yd), self.batch_size, g)
        w = weights.to(dev)
        watch = guard.Watch(f"ct/round{r}/confusion", model, opt, record=self.diagnostics, unit="step")
        model.train()
        rounder = 0
        for step in range(self.confusion_steps[r]):
            if step % _CHECK_STEPS == 0:
                watch.begin()
            if (rounder + step) % k == 0:
                rounder += 1
            cb = clean_b.next()
            target = ((preds[cb] + rounder + step) % k).to(dev)  # never the fixed model's prediction
            if step % bf == 0:
                ib = insp_b.next()
                out = model(torch.cat([xc[cb], xd[ib]]).to(dev))
                conf = F.cross_entropy(out[: len(cb)], target)
                yi = yd[ib].to(dev)
                per = F.cross_entropy(out[len(cb) :], yi, reduction="none")
                insp = (per * w[yi]).sum() / w[yi].sum()
                loss = ((lam - 1) * conf + insp) / lam
            else:
                loss = F.cross_entropy(model(xc[cb].to(dev)), target)
            watch.observe(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % _CHECK_STEPS == 0 and watch.end(step + 1) == guard.STOP:
                break
        if watch.pending:
            watch.end(self.confusion_steps[r])
        model.eval()

    def _identify(self, confused, scope, xd, yd, chunklet, k, dev) -> Tensor:
        # the reference only checks the chunklet (>= 2 of every class, else it raises): it is not in the test
        small = torch.nonzero(torch.bincount(yd[chunklet], minlength=k) < 2).squeeze(1).tolist()
        if small:
            raise ValueError(
                f"CT: the clean chunklet holds fewer than 2 samples of classes {small} (too few samples per "
                "class for median_sample_rate; raise defense.median_sample_rate)"
            )
        feats = _penultimate(confused, xd, dev).double().numpy()
        pred = _outputs(confused, xd, dev).argmax(1)
        own = (pred == yd).numpy()
        ratios = np.ones(k)
        with host_blas():
            for c in range(k):
                idx = np.nonzero(yd.numpy() == c)[0]
                if len(idx) < 4:  # 2 <= n_isolated <= n_c - 2 cannot hold: ratio 1
                    continue
                f = feats[idx] - feats[idx].mean(0)
                _, _, vt = np.linalg.svd(f, full_matrices=False)
                proj = f @ vt[:2].T
                ratios[c] = likelihood_ratio(proj, own[idx])
        top = int(np.argmax(ratios))
        flagged = [
            c
            for c in range(k)
            if (c == top and ratios[c] > self.max_ratio_threshold) or ratios[c] > self.ratio_threshold
        ]
        self.diagnostics["ct/likelihood_ratio"] = [round(float(v), 4) for v in ratios]
        self.diagnostics["ct/flagged_classes"] = flagged
        return torch.from_numpy(own) & torch.isin(yd, torch.tensor(flagged, dtype=torch.long))
