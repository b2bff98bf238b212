"""Phase 1 — Topological Invariance Sifting: a small, high-credibility seed from an untrusted dataset.

For each class, over several layers' representations of the same samples:
  majority rule    keep a sample only if it lies in its class's largest DBSCAN cluster in EVERY layer;
  consistency rule score a kept sample by how many of its k nearest same-class neighbours all layers
                   agree on (size of the intersection of the per-layer neighbour sets);
and take the top `alpha` of each class by score.

Density ceiling (ours, not in the paper's description): before the two rules, samples whose same-class
neighbourhood is tighter than the dataset's `density_ceiling` quantile in any layer are set aside. A trigger
shared by many samples (a blend, or an encoder that maps every triggered input to one embedding) makes the
poisoned samples the densest, most layer-consistent group of the target class; when they are as many as its
clean samples (a 10 % poison rate over 10 classes), the two rules alone pick them first. Natural class
structure is not that tight, so the densest decile of a dataset is not where a trusted seed should come from.

Label agreement (ours): the two rules look at each class on its own, so a dirty-label poison whose content
belongs to another class is judged only against the target class, where a group of such poisons (TaCT's
single source class, or any patch on similar images) is a consistent cluster of its own. Among the whole
dataset, though, its neighbours carry the source label. A sample is a seed candidate only if, in every
layer, at least `agreement` of its k nearest neighbours in the whole dataset share its label (checked
after the majority rule, before the consistency ranking).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import DBSCAN
from sklearn.neighbors import NearestNeighbors
from torch import Tensor


@dataclass
class SiftResult:
    seed_idx: Tensor  # indices into the dataset, sorted
    majority_idx: Tensor  # samples that passed the majority rule (all classes)
    scores: Tensor  # consistency score per sample (-1 where the majority rule dropped it)
    dense_idx: Tensor  # samples the density ceiling set aside (abnormally tight neighbourhoods)


def _normalise(f: np.ndarray) -> np.ndarray:
    return f / np.clip(np.linalg.norm(f, axis=1, keepdims=True), 1e-12, None)


def neighbours(f: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances and indices of each sample's k nearest neighbours, itself excluded (k capped at n - 1)."""
    k = min(k, len(f) - 1)
    dist, idx = NearestNeighbors(n_neighbors=k + 1).fit(f).kneighbors(f)
    return dist[:, 1:], idx[:, 1:]


def largest_cluster(f: np.ndarray, eps_quantile: float, min_samples: int) -> np.ndarray:
    """Boolean mask of the largest DBSCAN cluster. eps = a quantile of the k-NN distances (k = min_samples),
    so the density threshold adapts to each class and layer instead of being one magic number."""
    n = len(f)
    if n <= min_samples:
        return np.ones(n, dtype=bool)
    dist, _ = neighbours(f, min_samples)
    eps = float(np.quantile(dist[:, -1], eps_quantile))
    labels = DBSCAN(eps=max(eps, 1e-6), min_samples=min_samples).fit_predict(f)
    valid = labels[labels >= 0]
    if len(valid) == 0:
        return np.ones(n, dtype=bool)
    return labels == np.bincount(valid).argmax()


def knn_distance(f: np.ndarray, k: int) -> np.ndarray:
    """Mean distance of each sample to its k nearest neighbours (itself excluded)."""
    if min(k, len(f) - 1) <= 0:
        return np.zeros(len(f))
    return neighbours(f, k)[0].mean(1)


def not_abnormally_dense(feats: list[np.ndarray], y: np.ndarray, k: int, quantile: float) -> np.ndarray:
    """Boolean mask: False where a sample's same-class k-NN distance is below the dataset-wide `quantile`
    of that distance in any layer."""
    ok = np.ones(len(y), dtype=bool)
    if quantile <= 0:
        return ok
    for f in feats:
        d = np.zeros(len(y))
        for c in np.unique(y):
            idx = np.nonzero(y == c)[0]
            d[idx] = knn_distance(f[idx], k)
        ok &= d >= np.quantile(d, quantile)
    return ok


def consistency_scores(layers: list[np.ndarray], k: int) -> np.ndarray:
    """Per sample: |intersection over layers of its k nearest neighbours| (0..k)."""
    n = len(layers[0])
    k = min(k, n - 1)
    if k <= 0:
        return np.zeros(n)
    common = None
    for f in layers:
        _, neigh = neighbours(f, k)
        member = np.zeros((n, n), dtype=bool)
        member[np.repeat(np.arange(n), k), neigh.ravel()] = True
        common = member if common is None else common & member
    return common.sum(1).astype(float)


def _agreement(feats: list[np.ndarray], y: np.ndarray, k: int) -> np.ndarray:
    agree = np.ones(len(y))
    for f in feats:
        _, neigh = neighbours(f, k)
        agree = np.minimum(agree, (y[neigh] == y[:, None]).mean(1))
    return agree


def label_agreement(layers: list[Tensor], labels: Tensor, k: int) -> Tensor:
    """Per sample: the smallest, over layers, share of its k nearest neighbours in the WHOLE dataset (any
    class) that carry its label (representations compared by cosine, as TIS compares them)."""
    feats = [_normalise(f.float().numpy()) for f in layers]
    return torch.from_numpy(_agreement(feats, labels.numpy(), k))


def sift(
    layers: list[Tensor],
    labels: Tensor,
    alpha: float = 0.02,
    k: int = 10,
    eps_quantile: float = 0.5,
    min_samples: int = 5,
    min_per_class: int = 2,
    majority: bool = True,
    density_ceiling: float = 0.0,
    agreement: float = 0.0,
) -> SiftResult:
    """Run TIS on per-layer representations `layers` (each (N, D_l)) with labels (N,)."""
    y = labels.numpy()
    feats = [_normalise(f.float().numpy()) for f in layers]
    scores = np.full(len(y), -1.0)
    seed: list[np.ndarray] = []
    passed: list[np.ndarray] = []
    candidate = not_abnormally_dense(feats, y, k, density_ceiling)
    agrees = _agreement(feats, y, k) >= agreement if agreement > 0 else np.ones(len(y), dtype=bool)
    for c in np.unique(y):
        members = np.nonzero(y == c)[0]
        idx = members[candidate[members]]
        if len(idx) < min_per_class:  # everything in the class was abnormally dense: use it all
            idx = members
        keep = np.ones(len(idx), dtype=bool)
        if majority:
            for f in feats:
                keep &= largest_cluster(f[idx], eps_quantile, min_samples)
        if keep.sum() < min_per_class:  # a degenerate class: fall back to everything rather than nothing
            keep[:] = True
        kept = idx[keep]
        passed.append(kept)
        # after the majority rule, not before: filtering first would thin out the clean majority that the
        # rule relies on and could leave a tight poison cluster as the largest one
        if agrees[kept].sum() >= min_per_class:
            kept = kept[agrees[kept]]
        s = consistency_scores([f[kept] for f in feats], k)
        scores[kept] = s
        n_take = max(min_per_class, int(round(alpha * len(members))))
        order = np.argsort(-s, kind="stable")
        seed.append(kept[order[:n_take]])
    seed_idx = torch.from_numpy(np.sort(np.concatenate(seed))).long()
    return SiftResult(
        seed_idx,
        torch.from_numpy(np.sort(np.concatenate(passed))).long(),
        torch.from_numpy(scores).float(),
        torch.from_numpy(np.nonzero(~candidate)[0]).long(),
    )
