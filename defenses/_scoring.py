"""Shared machinery (BASELINES.md section 3): per-class scoring mapped back to global indices, and robust
statistics. Everything here runs on CPU (numpy / CPU tensors): selections must be reproducible bit for bit.

`per_class`              run a scorer on each class's members, map its flags back to dataset indices
`mad_anomaly_index`      |x - median| / (1.4826 MAD) (SCAn, NC, DECREE); one-sided on request
`medcouple`              the robust skewness of Brys, Hubert & Struyf (2004), exact O(n^2) (n <= a few thousand)
`adjusted_outlyingness`  Hubert & Van der Veeken (2008), the medcouple-adjusted boxplot (ASSET)
`gaussian_tail_threshold` ASSET's threshold: a 1-component GMM on the lower half of the scores
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

MAD_SCALE = 1.4826  # MAD -> standard deviation under normality


@contextmanager
def host_blas():
    """numpy/scipy linear algebra on one BLAS thread: the matrices here are small (a class's features), where
    OpenBLAS's threads only contend (measured: a 401 x 401 eigh took 3.6 s with the machine's default threads
    on a loaded 2-core host, 0.05 s on one), and a fixed thread count keeps the selections reproducible."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def per_class(
    labels: Tensor, num_classes: int, fn: Callable[[int, Tensor], tuple[np.ndarray, Any]], min_size: int = 2
) -> tuple[Tensor, dict[int, Any]]:
    """`fn(c, idx)` gets class c's dataset indices and returns (a boolean flag per member, its statistics);
    returns the flags as one (N,) bool tensor over the dataset and the statistics per class. Classes with fewer
    than `min_size` members are not scored (nothing flagged)."""
    flags = torch.zeros(len(labels), dtype=torch.bool)
    info: dict[int, Any] = {}
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).squeeze(1)
        if len(idx) < min_size:
            continue
        with host_blas():
            local, stats = fn(c, idx)
        local = torch.as_tensor(np.asarray(local, dtype=bool))
        if local.shape != (len(idx),):
            raise ValueError(
                f"class {c}: the scorer returned {tuple(local.shape)} flags for {len(idx)} members"
            )
        flags[idx[local]] = True
        info[c] = stats
    return flags, info


def per_class_list(info: dict[int, Any], key: str, num_classes: int) -> list[float | None]:
    """One statistic of `per_class`'s results as a list indexed by class (None where a class was not scored),
    the form rows store (JSON keys would turn class numbers into strings)."""
    return [info[c][key] if c in info else None for c in range(num_classes)]


def mad_anomaly_index(x: np.ndarray, one_sided: bool = False) -> np.ndarray:
    """(x - median) / (1.4826 MAD); its absolute value unless `one_sided` (then only large x are anomalous)."""
    x = np.asarray(x, dtype=np.float64)
    med = np.median(x)
    mad = np.median(np.abs(x - med)) * MAD_SCALE
    dev = x - med if one_sided else np.abs(x - med)
    return dev / max(mad, 1e-12)


def medcouple(x: np.ndarray) -> float:
    """The medcouple of a univariate sample (exact, O(n^2) memory and time)."""
    x = np.sort(np.asarray(x, dtype=np.float64).ravel())[::-1]  # descending, as in Brys et al.
    n = len(x)
    if n < 3:
        return 0.0
    med = np.median(x)
    scale = 2.0 * max(np.max(np.abs(x - med)), 1e-300)
    z = (x - med) / scale
    zp = z[z >= 0]  # descending
    zm = z[z <= 0]  # descending
    a, b = zp[:, None], zm[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = (a + b) / (a - b)
    # ties at the median (a == b == 0): the kernel is -1, 0 or +1 by position (Brys et al., eq. 3)
    ties = (a == 0) & (b == 0)
    if ties.any():
        p, q = len(zp), len(zm)
        i = np.arange(p)[:, None]
        j = np.arange(q)[None, :]
        k = int((zp == 0).sum())
        # positions counted inside the tie block: i runs over zp's trailing zeros, j over zm's leading zeros
        ii = i - (p - k)
        jj = j
        sign = np.sign(ii + jj - (k - 1))  # -1 when i + j - 1 < k (1-based), 0 on the anti-diagonal
        h = np.where(ties, sign, h)
    return float(np.median(h))


def adjusted_outlyingness(x: np.ndarray) -> np.ndarray:
    """Per sample: its distance from the median over the distance of the adjusted boxplot's fence on its side
    (fences Q1 - 1.5 e^{-4MC} IQR, Q3 + 1.5 e^{3MC} IQR for MC >= 0; mirrored exponents for MC < 0)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    med = np.median(x)
    q1, q3 = np.quantile(x, [0.25, 0.75])
    iqr = q3 - q1
    mc = medcouple(x)
    if mc > 0:
        w1, w2 = q1 - 1.5 * np.exp(-4 * mc) * iqr, q3 + 1.5 * np.exp(3 * mc) * iqr
    else:
        w1, w2 = q1 - 1.5 * np.exp(-3 * mc) * iqr, q3 + 1.5 * np.exp(4 * mc) * iqr
    up = (x - med) / max(w2 - med, 1e-12)
    down = (med - x) / max(med - w1, 1e-12)
    return np.where(x > med, up, down)


def gaussian_tail_threshold(scores: np.ndarray, eps: float = 1e-6, formula: str = "density") -> float:
    """ASSET's threshold: fit one Gaussian (a 1-component GMM, i.e. the maximum-likelihood mean and std, with
    sklearn's 1e-6 variance floor) to the scores at or below their lower median, then

      density    t = mu + sigma sqrt(-2 ln(eps sigma sqrt(2 pi))): where the fitted density falls to eps
      reference  t = (sigma sqrt(-2 ln(eps) sigma sqrt(2 pi)) + mu) / w, w = 1: the reference code's expression
                 (ruoxi-jia-group/ASSET get_t, copied by BackdoorBench), the same with sigma sqrt(2 pi) outside
                 the logarithm; for a tight loss distribution (sigma 0.01) it lies 0.8 sigma above mu, below the
                 median, and flags about half of the clean samples."""
    if formula not in ("density", "reference"):
        raise ValueError(f"formula={formula!r}; choose density or reference")
    s = np.asarray(scores, dtype=np.float64).ravel()
    half = np.quantile(s, 0.5, method="lower")
    low = s[s <= half]
    mu = float(low.mean())
    sigma = float(np.sqrt(low.var() + 1e-6))
    root = np.sqrt(2 * np.pi)
    if formula == "reference":
        return sigma * np.sqrt(-2.0 * np.log(eps) * sigma * root) + mu
    return mu + sigma * np.sqrt(max(-2.0 * np.log(eps * sigma * root), 0.0))
