"""AC: Activation Clustering -- Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy & Srivastava, "Detecting
Backdoor Attacks on Deep Neural Networks by Activation Clustering", AAAI-W SafeAI 2019.

Per class, on the penultimate activations of the model trained on D: centre, reduce to `n_components`
dimensions (ICA as in the paper and BackdoorBench detection_pretrain/ac.py; PCA as in vtu81/backdoor-toolbox
cleansers_tool_box/activation_clustering.py), 2-means, and flag the smaller cluster when it holds less than
`size_threshold` of the class ("relative size" analysis). The silhouette score is logged per class; it gates
the decision only when `silhouette_min` is set (the toolbox's 0.15/0.25 gates are commented out there).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA, FastICA
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score

from securetl.interfaces import Knowledge

from ._detection import DetectionDefense
from ._scoring import per_class, per_class_list


class ActivationClustering(DetectionDefense):
    name = "ac"
    knowledge = Knowledge(clean_fraction=0.0)

    def __init__(
        self,
        reduce: str = "ica",
        n_components: int = 10,
        size_threshold: float = 0.35,
        silhouette_min: float | None = None,
        kmeans_n_init: int = 10,
        clean_fraction: float | None = None,
    ) -> None:
        super().__init__(clean_fraction)
        if reduce not in ("ica", "pca"):
            raise ValueError(f"defense.reduce={reduce!r}; choose ica or pca")
        if not 0.0 < size_threshold <= 0.5:
            raise ValueError(f"defense.size_threshold={size_threshold} must lie in (0, 0.5]")
        self.reduce, self.n_components, self.size_threshold = reduce, int(n_components), float(size_threshold)
        self.silhouette_min, self.kmeans_n_init = silhouette_min, int(kmeans_n_init)

    def detect(self, encoder, model, train, probe, ctx):
        feats = self.features(model, train, ctx).double().numpy()
        seed = ctx.seed

        def score(c, idx):
            f = feats[idx.numpy()]
            f = f - f.mean(0)
            k = min(self.n_components, f.shape[1], len(f) - 1)
            if k < 1 or len(f) < 4:
                return np.zeros(len(f), dtype=bool), {"silhouette": float("nan"), "minority": 0.0}
            if self.reduce == "ica":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    z = FastICA(k, whiten="unit-variance", random_state=seed, max_iter=1000).fit_transform(f)
            else:
                z = PCA(k, svd_solver="full").fit_transform(f)
            labels = KMeans(2, n_init=self.kmeans_n_init, random_state=seed).fit_predict(z)
            sizes = np.bincount(labels, minlength=2)
            small = int(np.argmin(sizes))
            share = sizes[small] / len(labels)
            sil = float(silhouette_score(z, labels)) if sizes.min() > 0 else float("nan")
            flag = share < self.size_threshold
            if self.silhouette_min is not None:
                flag = flag and sil > self.silhouette_min
            return (labels == small) & flag, {"silhouette": round(sil, 4), "minority": round(float(share), 4)}

        flags, info = per_class(train.y, ctx.num_classes, score)
        self.diagnostics["ac/silhouette"] = per_class_list(info, "silhouette", ctx.num_classes)
        self.diagnostics["ac/minority_share"] = per_class_list(info, "minority", ctx.num_classes)
        self.diagnostics["ac/flagged_classes"] = sorted(
            int(c) for c in range(ctx.num_classes) if flags[train.y == c].any()
        )
        return flags
