"""SPECTRE -- Hayase, Kong, Somani & Oh, "SPECTRE: Defending Against Backdoor Attacks Using Robust Statistics",
ICML 2021.

A Python port of the authors' Julia filter as vtu81/backdoor-toolbox runs it (cleansers_tool_box/spectre/
run_filters.jl, quantum_filters.jl, dkk17.jl, util.jl; cleanser.py picks the class), read beside SCLBD/
BackdoorBench's port (detection_pretrain/spectre.py, spectre_utils.py). Per class, on the penultimate
activations of the model trained on D:

  budget   eps = assumed_poison_rate x |D| (the toolbox passes the TRUE poison count; BackdoorBench a
           `percentile`), 0.1 n when <= 0, capped at 0.33 n, and at 0.1 n when the class has < 500 samples;
           round(1.5 eps) samples are marked
  PCA      to 64 dimensions (or fewer when the class or the features are smaller)
  for k in 1, 4, 9, ..., 64: robust covariance of the top-k coordinates (the DKK17 filter, tau 0.1, at most
           2 eps removed), whiten, QUE score x' M x with M = exp(alpha (S' - I) / (||S'|| - 1)) / tr (alpha 4),
           mark the top round(1.5 eps); keep the k whose marks leave the largest tr(S' M) / tr(M)
  class    the toolbox removes the marks of ONE class, the one with the highest such score (the suspected
           target); BackdoorBench unions every class's marks (`union_classes: true` does that)

The DKK17 filter follows the Julia code: the top eigenpair of the fourth-moment operator (here scipy's eigsh
with a fixed start vector, so it is deterministic), then remove the points whose |p - median(p)| exceeds
T = diff_i - 3 for the first i (ascending) with i / n >= Tail(T). `assumed_poison_rate` is ours (0.05);
BackdoorBench's filter also takes the true poison indices (only to count them): this port does not.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.sparse.linalg import LinearOperator, eigsh

from securetl.interfaces import Knowledge

from ._detection import DetectionDefense
from ._scoring import per_class, per_class_list

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- linear algebra helpers
def pca(a: np.ndarray, k: int) -> np.ndarray:
    """Rows of `a` (n x d) projected on their top-k principal directions (n x k), centred."""
    a = a - a.mean(0)
    _, _, vt = np.linalg.svd(a, full_matrices=False)
    return a @ vt[:k].T


def _sym_power(s: np.ndarray, p: float, floor: float = 1e-12) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.clip(w, floor, None) ** p) @ v.T


def _sym_exp(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.exp(w)) @ v.T


def k_lowest(a: np.ndarray, k: int) -> np.ndarray:
    """Mask of the entries <= the k-th smallest value (Julia's k_lowest_ind: ties are all included)."""
    if k <= 0:
        return np.zeros(a.shape, dtype=bool)
    cut = np.sort(a, kind="stable")[k - 1]
    return a <= cut


def _tail(t: float, eps: float) -> float:
    if t <= 10 * np.log(1 / eps):
        return 1.0
    return 3 * eps / (t * np.log(t)) ** 2


# --------------------------------------------------------------------------- DKK17 robust covariance
def top_moment_eigenpair(y: np.ndarray) -> tuple[float, np.ndarray]:
    """The largest-magnitude eigenpair of T = -vec(I) vec(I)' + (1/n) sum_i vec(y_i y_i') vec(y_i y_i')' for
    whitened columns y (d x n), the eigenvector reshaped to d x d with unit Frobenius norm.

    T = A' S A with A = [vec(y_i y_i')' / sqrt(n); vec(I)'] and S = diag(1, .., 1, -1), so its non-zero
    eigenpairs are those of S A A' ((n + 1) x (n + 1), entries (y_i'y_j)^2 / n, |y_i|^2 / sqrt(n), d) mapped
    back by A'; when n + 1 >= d^2 it is cheaper to run Lanczos on T itself (fixed start vector)."""
    d, n = y.shape
    if n + 1 < d * d:
        g = np.empty((n + 1, n + 1))
        g[:n, :n] = (y.T @ y) ** 2 / n
        g[:n, n] = g[n, :n] = (y * y).sum(0) / np.sqrt(n)
        g[n, n] = d
        # S G is similar to the symmetric H = B' S B with G = B B' (B = Q L^1/2): H z = lam z gives S G (S B z) =
        # lam (S B z), and A' S B z is T's eigenvector
        ev, q = np.linalg.eigh(g)
        b = q * np.sqrt(np.clip(ev, 0, None))
        sb = b.copy()
        sb[n] *= -1
        w, z = np.linalg.eigh(b.T @ sb)
        i = int(np.argmax(np.abs(w)))
        lam, coef = float(w[i]), sb @ z[:, i]
        v = (y * (coef[:n] / np.sqrt(n))) @ y.T + coef[n] * np.eye(d)
        return lam, v / np.linalg.norm(v)
    eye = np.eye(d).ravel()

    def matvec(x: np.ndarray) -> np.ndarray:
        q = (y * (x.reshape(d, d) @ y)).sum(0)  # y_i' V y_i
        return ((y * q) @ y.T).ravel() / n - eye * (eye @ x.ravel())

    op = LinearOperator((d * d, d * d), matvec=matvec, dtype=np.float64)
    lam, vec = eigsh(op, k=1, which="LM", v0=np.ones(d * d))
    return float(lam[0]), vec[:, 0].reshape(d, d)


def cov_estimation_filter(s: np.ndarray, eps: float, tau: float = 0.1, limit: int | None = None):
    """One filtering step on the columns-as-samples matrix s (d x n). Returns a keep-mask, "done" (the
    covariance passed the test) or None (no threshold found)."""
    d, n = s.shape
    c_const = 10.0
    sigma = s @ s.T / n + 1e-8 * np.eye(d)
    y = _sym_power(sigma, -0.5) @ s
    xinvx = (y * y).sum(0)
    mask = xinvx >= c_const * d * np.log(n / tau)
    if mask.any():
        keep = ~mask
        return keep if limit is None else keep | k_lowest(xinvx, max(0, n - limit))
    lam, v = top_moment_eigenpair(y)
    if lam <= (1 + c_const * eps * np.log(1 / eps) ** 2) * (2 * np.linalg.norm(v) ** 2) / 2:
        return "done"
    vs = (v + v.T) / 2
    p = ((y * (vs @ y)).sum(0) - np.trace(vs)) / np.sqrt(2)
    diffs = np.abs(p - np.median(p))
    for i, diff in enumerate(np.sort(diffs), start=1):
        if diff < 3:
            continue
        t = diff - 3
        if t <= 0:
            continue
        if i / n >= _tail(t, eps):
            keep = diffs <= t
            return keep if limit is None else keep | k_lowest(diffs, max(0, n - limit))
    return None


def cov_estimation_iterate(
    s: np.ndarray, eps: float, tau: float = 0.1, limit: int | None = None
) -> np.ndarray:
    """Repeat the filter until the covariance passes, no threshold is found, or `limit` points are gone."""
    n = s.shape[1]
    idx = np.arange(n)
    while True:
        res = cov_estimation_filter(s, eps, tau, limit)
        if res is None or isinstance(res, str):
            break
        if limit is not None:
            limit -= int(len(res) - res.sum())
        s, idx = s[:, res], idx[res]
        if limit == 0 or s.shape[1] < 2:
            break
    keep = np.zeros(n, dtype=bool)
    keep[idx] = True
    return keep


# --------------------------------------------------------------------------- QUE filter
def que_matrix(sigma_w: np.ndarray, alpha: float) -> np.ndarray:
    k = len(sigma_w)
    if k == 1:
        return np.ones((1, 1))
    denom = max(np.linalg.norm(sigma_w, 2) - 1, 1e-12)
    m = _sym_exp(alpha * (sigma_w - np.eye(k)) / denom)
    return m / np.trace(m)


def quantum_filter(
    reps: np.ndarray, eps: int, k: int, alpha: float, tau: float, limit1: float, limit2: float
):
    """rcov_quantum_filter: keep-mask over the class (n samples; reps n x 64 PCA coordinates)."""
    n = len(reps)
    r = reps[:, :k].T  # k x n
    if k == 1:
        white, sigma_w = r, np.ones((1, 1))
    else:
        selected = cov_estimation_iterate(r, eps / n, tau, limit=round(limit1 * eps))
        rs = r[:, selected]
        sigma = np.cov(rs, bias=True)
        white = _sym_power(sigma, -0.5) @ r
        sigma_w = np.cov(white)
    m = que_matrix(np.atleast_2d(sigma_w), alpha)
    scores = (white * (m @ white)).sum(0)
    return ~k_lowest(-scores, round(limit2 * eps))


def spectre_class(feats: np.ndarray, eps: int, alpha: float = 4.0, tau: float = 0.1, dims: int = 64):
    """rcov_auto_quantum_filter for one class: (suspect mask, score)."""
    n = len(feats)
    kmax = max(1, min(dims, feats.shape[1], n - 1))
    reps = pca(feats, kmax)
    ks = sorted({min(kmax, round(v**2)) for v in np.linspace(1, np.sqrt(dims), 8)})
    best = (-np.inf, None, None)
    for k in ks:
        keep = quantum_filter(reps, eps, k, alpha, tau, 2.0, 1.5)
        if keep.sum() < 2:
            continue
        sigma = np.atleast_2d(np.cov(reps[keep].T))
        sigma_w = np.atleast_2d(np.cov(_sym_power(sigma, -0.5) @ reps.T))
        m = que_matrix(sigma_w, alpha)
        op = float(np.trace(sigma_w @ m) / np.trace(m))
        if op > best[0]:
            best = (op, keep, k)
    if best[1] is None:
        return np.zeros(n, dtype=bool), float("nan"), None
    return ~best[1], best[0], best[2]


def class_budget(n: int, eps_total: int) -> int:
    eps = eps_total
    if eps <= 0:
        eps = round(0.1 * n)
    if eps > 0.33 * n:
        eps = round(0.33 * n)
    if n < 500 and eps > 0.1 * n:
        eps = round(0.1 * n)
    return int(eps)


class Spectre(DetectionDefense):
    name = "spectre"
    knowledge = Knowledge(clean_fraction=0.0)

    def __init__(
        self,
        assumed_poison_rate: float = 0.05,
        dims: int = 64,
        alpha: float = 4.0,
        tau: float = 0.1,
        union_classes: bool = False,
        clean_fraction: float | None = None,
    ) -> None:
        super().__init__(clean_fraction)
        if not 0.0 <= assumed_poison_rate < 1.0:
            raise ValueError(f"defense.assumed_poison_rate={assumed_poison_rate} must lie in [0, 1)")
        self.assumed_poison_rate, self.dims, self.alpha, self.tau = assumed_poison_rate, dims, alpha, tau
        self.union_classes = union_classes

    def detect(self, encoder, model, train, probe, ctx):
        feats = self.features(model, train, ctx).double().numpy()
        eps_total = round(self.assumed_poison_rate * len(train))

        def score(c, idx):
            eps = class_budget(len(idx), eps_total)
            if eps < 1 or len(idx) < 4:
                return np.zeros(len(idx), dtype=bool), {"score": None, "k": None}
            marks, op, k = spectre_class(feats[idx.numpy()], eps, self.alpha, self.tau, self.dims)
            return marks, {"score": None if np.isnan(op) else round(op, 6), "k": k}

        marks, info = per_class(train.y, ctx.num_classes, score)
        scores = per_class_list(info, "score", ctx.num_classes)
        self.diagnostics["spectre/score"] = scores
        self.diagnostics["spectre/k"] = per_class_list(info, "k", ctx.num_classes)
        if self.union_classes:
            return marks
        valid = [(s, c) for c, s in enumerate(scores) if s is not None]
        if not valid:
            return marks & False
        suspect = max(valid)[1]
        self.diagnostics["spectre/suspected_class"] = suspect
        return marks & (train.y == suspect)
