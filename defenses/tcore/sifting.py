"""Phase 1 — Topological Invariance Sifting: a small, high-credibility seed from an untrusted dataset.

For each class, over several layers' representations of the same samples:
  majority rule    keep a sample only if it lies in its class's largest DBSCAN cluster in EVERY layer;
  consistency rule score a kept sample by how many of its k nearest same-class neighbours all layers
                   agree on (size of the intersection of the per-layer neighbour sets);
and take the top `alpha` of each class by score.
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


def _normalise(f: np.ndarray) -> np.ndarray:
    return f / np.clip(np.linalg.norm(f, axis=1, keepdims=True), 1e-12, None)


def largest_cluster(f: np.ndarray, eps_quantile: float, min_samples: int) -> np.ndarray:
    """Boolean mask of the largest DBSCAN cluster. eps = a quantile of the k-NN distances (k = min_samples),
    so the density threshold adapts to each class and layer instead of being one magic number."""
    n = len(f)
    if n <= min_samples:
        return np.ones(n, dtype=bool)
    nn = NearestNeighbors(n_neighbors=min_samples + 1).fit(f)
    dist, _ = nn.kneighbors(f)
    eps = float(np.quantile(dist[:, -1], eps_quantile))
    labels = DBSCAN(eps=max(eps, 1e-6), min_samples=min_samples).fit_predict(f)
    valid = labels[labels >= 0]
    if len(valid) == 0:
        return np.ones(n, dtype=bool)
    return labels == np.bincount(valid).argmax()


def consistency_scores(layers: list[np.ndarray], k: int) -> np.ndarray:
    """Per sample: |intersection over layers of its k nearest neighbours| (0..k)."""
    n = len(layers[0])
    k = min(k, n - 1)
    if k <= 0:
        return np.zeros(n)
    common = None
    for f in layers:
        _, idx = NearestNeighbors(n_neighbors=k + 1).fit(f).kneighbors(f)
        neigh = idx[:, 1:]  # drop the sample itself
        member = np.zeros((n, n), dtype=bool)
        member[np.repeat(np.arange(n), k), neigh.ravel()] = True
        common = member if common is None else common & member
    return common.sum(1).astype(float)


def sift(
    layers: list[Tensor],
    labels: Tensor,
    alpha: float = 0.02,
    k: int = 10,
    eps_quantile: float = 0.5,
    min_samples: int = 5,
    min_per_class: int = 2,
    majority: bool = True,
) -> SiftResult:
    """Run TIS on per-layer representations `layers` (each (N, D_l)) with labels (N,)."""
    y = labels.numpy()
    feats = [_normalise(f.float().numpy()) for f in layers]
    scores = np.full(len(y), -1.0)
    seed: list[np.ndarray] = []
    passed: list[np.ndarray] = []
    for c in np.unique(y):
        idx = np.nonzero(y == c)[0]
        keep = np.ones(len(idx), dtype=bool)
        if majority:
            for f in feats:
                keep &= largest_cluster(f[idx], eps_quantile, min_samples)
        if keep.sum() < min_per_class:  # a degenerate class: fall back to everything rather than nothing
            keep[:] = True
        kept = idx[keep]
        passed.append(kept)
        s = consistency_scores([f[kept] for f in feats], k)
        scores[kept] = s
        n_take = max(min_per_class, int(round(alpha * len(idx))))
        order = np.argsort(-s, kind="stable")
        seed.append(kept[order[:n_take]])
    seed_idx = torch.from_numpy(np.sort(np.concatenate(seed))).long()
    return SiftResult(
        seed_idx, torch.from_numpy(np.sort(np.concatenate(passed))).long(), torch.from_numpy(scores).float()
    )
