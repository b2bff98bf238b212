"""How far the poisons stand apart in the representation a poison detector reads: an analysis with ground truth,
for explaining a detector's TPR, never for choosing its settings.

    python scripts/detector_separation.py threat=t2_badnets probe=finetune seed=0 [more Hydra overrides]

Composes the run the overrides describe (the encoder comes from the cache when a sweep built it), poisons the
training set, trains M0 (the probe on all of D: what AC, SS, SCAn and SPECTRE read) and, in every class that holds
poisons, compares the poisons' penultimate features with the clean samples' of the same class:

  fisher        distance between the two means over the pooled within-group std (along that direction)
  ss_auroc      AUROC of Spectral Signatures' score (squared projection on the class's top singular vector)
  ss_top_share  share of the class's centred variance on that top singular vector
  linear_auroc  AUROC of a logistic regression told poison vs clean (5-fold, out of fold): whether *any*
                linear direction separates them
  pc_share      share of the poisons' offset from the clean mean that lies in the top 10 PCs of the class

It prints the same for the received encoder's features (before M0's training) when the probe fine-tunes, so
the effect of fine-tuning on separability is visible. Ground truth (`poison_idx`) is read here, after the fact:
this is an analysis, never part of a defense.
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict


def separation(f: np.ndarray, is_poison: np.ndarray, seed: int) -> dict[str, float]:
    fp, fc = f[is_poison], f[~is_poison]
    d = fp.mean(0) - fc.mean(0)
    u = d / max(np.linalg.norm(d), 1e-12)
    spread = np.sqrt(0.5 * ((fp @ u).var() + (fc @ u).var()))
    centred = f - f.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    ss = (centred @ vt[0]) ** 2
    pcs = vt[:10]
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    z = (f - f.mean(0)) / (f.std(0) + 1e-8)
    lin = cross_val_predict(
        LogisticRegression(max_iter=2000), z, is_poison, cv=folds, method="predict_proba"
    )[:, 1]
    return {
        "fisher": float(np.linalg.norm(d) / max(spread, 1e-12)),
        "ss_auroc": float(roc_auc_score(is_poison, ss)),
        "ss_top_share": float(s[0] ** 2 / (s**2).sum()),
        "linear_auroc": float(roc_auc_score(is_poison, lin)),
        "pc_share": float(np.linalg.norm(pcs @ d) ** 2 / max(np.linalg.norm(d) ** 2, 1e-12)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides of the run, e.g. threat=t2_badnets seed=0"
    )
    args = parser.parse_args()

    from securetl.plots import compose, prepare
    from securetl.probe import memo_forward

    cell = prepare(compose(args.overrides))
    cfg, ctx, encoder, poisoned, probe = cell.cfg, cell.ctx, cell.encoder, cell.poisoned, cell.probe
    if len(poisoned.poison_idx) == 0:
        raise SystemExit("this run poisons nothing in the training set: nothing to separate")
    model = probe.fit(encoder, poisoned.train, ctx)
    y = poisoned.train.y.numpy()
    is_poison = np.zeros(len(y), dtype=bool)
    is_poison[poisoned.poison_idx.numpy()] = True
    views = {"M0 (trained on D)": memo_forward(model.encoder, poisoned.train.x, ctx).double().numpy()}
    if not probe.frozen:
        views["received encoder"] = memo_forward(encoder, poisoned.train.x, ctx).double().numpy()
    print(" ".join(args.overrides))
    print(f"{len(is_poison)} training samples, {is_poison.sum()} poisons")
    for c in np.unique(y[is_poison]):
        in_c = y == c
        n_p = int((is_poison & in_c).sum())
        print(f"class {c}: {n_p} poisons among {int(in_c.sum())} samples")
        for view, f in views.items():
            s = separation(f[in_c], is_poison[in_c], int(cfg.seed))
            print(f"  {view:20s} " + "  ".join(f"{k} {v:.3f}" for k, v in s.items()))


if __name__ == "__main__":
    main()
