"""SCAn: Statistical Contamination Analyzer -- Tang, Wang, Tang & Zhang, "Demon in the Variant: Statistical
Analysis of DNNs for Robust Backdoor Contamination Detection", USENIX Security 2021.

Needs clean labelled data (the reserve). Reference code read: vtu81/backdoor-toolbox cleansers_tool_box/scan.py
and cleanser.py; SCLBD/BackdoorBench detection_pretrain/scan.py. On the penultimate activations of the model
trained on D:

 1. global model, on the clean features (centred by their mean): EM for the between-class covariance Su and the
    within-class covariance Se (up to `em_iters` = 100 iterations, tolerance 1e-5), as in both codes;
 2. local model, per class, on the inspected and clean features together (centred by their joint mean): split
    the class in two by EM with F = pinv(Se) from a seeded random assignment (up to 100 iterations), and compute
    the statistic J_c of two subgroups against one;
 3. anomaly index of J over classes, (J - median) / (1.4826 MAD), and flag a class whose index exceeds
    `threshold` (default e^2 = 7.389, BackdoorBench and the paper; the toolbox uses e);
 4. in a flagged class remove the inspected samples of the subgroup that holds fewer of the clean samples.

Ours: the index is one-sided (a class whose J is abnormally SMALL is not a contaminated one; the codes take
|J - median|), and computed on J itself (the codes divide J by its maximum first, which changes nothing when the
maximum is positive and flips the order when it is not); a tie in clean counts removes the smaller subgroup
(the codes remove subgroup 1, an arbitrary label); features wider than n_clean / 2 are projected on the clean
set's top principal components first (BASELINES.md: Se from few clean samples), `max_dim` caps it. The per-sample
loops of the codes are vectorised (same arithmetic).

One correction (`identity: posterior`, the default): in J, the one-group identity vector is the posterior mean
Su (n Su + Se)^-1 sum(x) -- what the global model's E-step computes. The codes' calc_test (the same text in the
toolbox and BackdoorBench) omits the Su F factor there, -Se G sum(x) with G = -(n Su + Se)^-1, i.e.
Se (n Su + Se)^-1 sum(x); with few classes Su has low rank, and outside its range that term is the class SUM, so
J grows with n^2 |mean|^2 and ranks classes by size and offset, not by a second subgroup (measured on
tests/test_baselines_detectors.py's planted set: J ~ 1e5 in every class, nothing flagged). `identity: reference`
computes the codes' Se (n Su + Se)^-1 sum(x), the published statistic.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from securetl.interfaces import Knowledge

from ._detection import DetectionDefense
from ._features import require_clean
from ._scoring import host_blas, mad_anomaly_index

EPS = 1e-5


def _cov(x: np.ndarray) -> np.ndarray:
    """Covariance of the rows of x (unbiased, as numpy.cov on the transpose)."""
    return np.cov(x, rowvar=False)


def global_model(
    x: np.ndarray, y: np.ndarray, num_classes: int, iters: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """EM for (Su, Se) on clean features x with labels y."""
    x = x - x.mean(0)
    classes = [k for k in range(num_classes) if (y == k).any()]
    means = np.zeros((num_classes, x.shape[1]))
    counts = np.bincount(y, minlength=num_classes).astype(float)
    for k in classes:
        means[k] = x[y == k].mean(0)
    u = means[y]
    su, se = _cov(u), _cov(x - u)
    sums = np.zeros_like(means)
    np.add.at(sums, y, x)
    for _ in range(iters):
        f = np.linalg.pinv(se)
        suf = su @ f
        um = np.zeros_like(means)
        for k in classes:
            g = -np.linalg.pinv(counts[k] * su + se) @ suf
            um[k] = -(se @ g @ sums[k])
        u = um[y]
        su_new, se_new = _cov(u), _cov(x - u)
        dist = np.linalg.norm(su_new - su) + np.linalg.norm(se_new - se)
        su, se = su_new, se_new
        if dist <= EPS:
            break
    return su, se


def find_split(x: np.ndarray, f: np.ndarray, rng: np.random.Generator, iters: int = 100):
    """Two-subgroup EM of one class under metric F: (assignment in {0, 1}, mean of group 1, mean of group 0)."""
    n = len(x)
    z = (rng.random(n) >= 0.5).astype(float)
    if n == 1:
        return np.zeros(1), x[0].copy(), x[0].copy()
    if z.sum() == 0:
        z[0] = 1
    if z.sum() == n:
        z[0] = 0
    u1, u2 = x[z == 1].mean(0), x[z == 0].mean(0)
    last = -np.ones(n)
    for _ in range(iters):
        if np.linalg.norm(z - last) <= EPS or np.linalg.norm((1 - z) - last) <= EPS:
            break
        last = z.copy()
        g1, g2 = z >= 0.5, z < 0.5
        if not g1.any() or not g2.any():
            break
        u1, u2 = x[g1].mean(0), x[g2].mean(0)
        bias = u1 @ f @ u1 - u2 @ f @ u2
        delta = x @ f @ (u1 - u2)
        z = (bias - 2 * delta < 0).astype(float)
    return z, u1, u2


IDENTITIES = ("posterior", "reference")


def split_statistic(
    x: np.ndarray, su: np.ndarray, se: np.ndarray, f: np.ndarray, z, u1, u2, identity: str = "posterior"
) -> float:
    """J: the log-likelihood ratio of the two-subgroup model against the one-group model, per sample."""
    n = len(x)
    # the class's identity vector under the one-group model. posterior: Su (n Su + Se)^-1 sum(x), the global
    # model's own E-step (-Se G_k sum(x) with G_k = -(n Su + Se)^-1 Su F); reference: calc_test's
    # Se (n Su + Se)^-1 sum(x), without the Su F factor (see the module doc)
    left = su if identity == "posterior" else se
    mu = left @ np.linalg.pinv(n * su + se) @ x.sum(0)
    b1 = mu @ f @ mu - u1 @ f @ u1
    b2 = mu @ f @ mu - u2 @ f @ u2
    in1 = z >= 0.5
    n1 = int(in1.sum())
    sc = n1 * b1 + (n - n1) * b2
    sc -= 2 * (x[in1].sum(0) @ f @ (mu - u1)) + 2 * (x[~in1].sum(0) @ f @ (mu - u2))
    return float(sc / n)


class SCAn(DetectionDefense):
    name = "scan"
    knowledge = Knowledge(clean_fraction=0.05, needs_clean=True)

    def __init__(
        self,
        threshold: float = math.e**2,
        em_iters: int = 100,
        max_dim: int | None = None,
        identity: str = "posterior",
        clean_fraction: float | None = None,
    ) -> None:
        super().__init__(clean_fraction)
        if identity not in IDENTITIES:
            raise ValueError(f"defense.identity={identity!r}; choose posterior or reference")
        self.threshold, self.em_iters, self.max_dim = float(threshold), int(em_iters), max_dim
        self.identity = identity

    def detect(self, encoder, model, train, probe, ctx):
        require_clean(ctx, "SCAn")
        fi = self.features(model, train, ctx).double().numpy()
        fc = self.features(model, ctx.clean, ctx).double().numpy()
        with host_blas():
            return torch.from_numpy(self._detect(fi, fc, train.y.numpy(), ctx.clean.y.numpy(), ctx))

    def _detect(self, fi: np.ndarray, fc: np.ndarray, yi: np.ndarray, yc: np.ndarray, ctx) -> np.ndarray:
        c = ctx.num_classes
        dim = self.max_dim if self.max_dim is not None else max(1, len(fc) // 2)
        if fi.shape[1] > dim:  # few clean samples for a wide Se: the clean set's top principal components
            mean = fc.mean(0)
            _, _, vt = np.linalg.svd(fc - mean, full_matrices=False)
            proj = vt[:dim].T
            fi, fc = (fi - mean) @ proj, (fc - mean) @ proj
        su, se = global_model(fc, yc, c, self.em_iters)
        f = np.linalg.pinv(se)
        x = np.concatenate([fi, fc])
        x = x - x.mean(0)
        y = np.concatenate([yi, yc])
        is_clean = np.r_[np.zeros(len(yi), bool), np.ones(len(yc), bool)]
        rng = np.random.default_rng(ctx.seed * 1_000_003 + 31)
        j = np.full(c, np.nan)
        splits = {}
        for k in range(c):
            members = np.nonzero(y == k)[0]
            if len(members) < 2:
                continue
            z, u1, u2 = find_split(x[members], f, rng, self.em_iters)
            j[k] = split_statistic(x[members], su, se, f, z, u1, u2, self.identity)
            splits[k] = (members, z >= 0.5)
        scored = ~np.isnan(j)
        index = np.full(c, np.nan)
        index[scored] = mad_anomaly_index(j[scored], one_sided=True)
        flags = np.zeros(len(yi), dtype=bool)
        flagged = []
        for k, (members, in1) in splits.items():
            if not index[k] > self.threshold:
                continue
            flagged.append(k)
            clean1 = int((is_clean[members] & in1).sum())
            clean0 = int((is_clean[members] & ~in1).sum())
            insp1 = int((~is_clean[members] & in1).sum())
            insp0 = int((~is_clean[members] & ~in1).sum())
            if clean1 != clean0:
                drop = in1 if clean1 < clean0 else ~in1
            else:
                drop = in1 if insp1 <= insp0 else ~in1
            chosen = members[drop & ~is_clean[members]]
            flags[chosen] = True
        self.diagnostics["scan/J"] = [None if np.isnan(v) else round(float(v), 4) for v in j]
        self.diagnostics["scan/anomaly_index"] = [None if np.isnan(v) else round(float(v), 4) for v in index]
        self.diagnostics["scan/flagged_classes"] = flagged
        return flags
