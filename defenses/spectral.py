"""SS: Spectral Signatures -- Tran, Li & Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018.

Per class, on the penultimate activations of the model trained on D: centre by the class mean, take the top
right singular vector v, score each sample by its squared projection onto v (the "outlier score"), and remove
the highest scores. How many (reference code read: vtu81/backdoor-toolbox cleansers_tool_box/
spectral_signature.py; SCLBD/BackdoorBench defense/spectral.py, config/defense/spectral/cifar10.yaml):

  default (`assumed_poison_rate: null`)  BackdoorBench's no-oracle rule: every score above the class's
                                         `percentile` (85) -- 15 % of every class goes
  `assumed_poison_rate: r`               the toolbox's (and the paper's) budget: the top min(1.5 r |D|, n_c / 2)
                                         of every class; r is a config value, never the attack's true rate

Every class is inspected (BackdoorBench inspects only the attack's target label when it knows it: an oracle).
Scores are projections of centred features, as in the paper (BackdoorBench projects uncentred ones).
"""

from __future__ import annotations

import numpy as np

from securetl.interfaces import Knowledge

from ._detection import DetectionDefense
from ._scoring import per_class


def spectral_scores(f: np.ndarray) -> np.ndarray:
    """Squared projection of the centred rows of `f` onto their top right singular vector."""
    f = f - f.mean(0)
    _, _, vt = np.linalg.svd(f, full_matrices=False)
    return (f @ vt[0]) ** 2


class SpectralSignatures(DetectionDefense):
    name = "spectral"
    knowledge = Knowledge(clean_fraction=0.0)

    def __init__(
        self,
        percentile: float = 85.0,
        assumed_poison_rate: float | None = None,
        overremoval: float = 1.5,
        clean_fraction: float | None = None,
    ) -> None:
        super().__init__(clean_fraction)
        if not 0.0 < percentile < 100.0:
            raise ValueError(f"defense.percentile={percentile} must lie in (0, 100)")
        if assumed_poison_rate is not None and not 0.0 < assumed_poison_rate < 1.0:
            raise ValueError(
                f"defense.assumed_poison_rate={assumed_poison_rate} must lie in (0, 1) or be null"
            )
        self.percentile, self.assumed_poison_rate, self.overremoval = (
            percentile,
            assumed_poison_rate,
            overremoval,
        )

    def detect(self, encoder, model, train, probe, ctx):
        feats = self.features(model, train, ctx).double().numpy()
        n_total = len(train)

        def score(c, idx):
            s = spectral_scores(feats[idx.numpy()])
            if self.assumed_poison_rate is None:
                flag = s > np.percentile(s, self.percentile)
            else:
                k = min(int(self.overremoval * self.assumed_poison_rate * n_total), len(s) // 2)
                flag = np.zeros(len(s), dtype=bool)
                flag[np.argsort(-s, kind="stable")[:k]] = True
            return flag, {"max_score": float(s.max())}

        flags, _ = per_class(train.y, ctx.num_classes, score)
        return flags
