"""Whether ASSET's discriminator V can tell the poisons of a D batch from the clean base set: an analysis with
ground truth, for explaining ASSET's TPR, never for choosing its settings.

    python scripts/asset_discriminator.py threat=t2_badnets probe=finetune seed=0 [--batches 4] [--steps 100 1000]

Composes the run, trains M0 (the probe on all of D; cached when a sweep built it) and reads its penultimate
features of D and of the clean reserve, as defenses/asset.py does. For a few batches of D (batch size from the
defense's config) it trains a fresh V per batch exactly as ASSET does (`ASSET._discriminate`) and prints V's mean
output on the batch's poisons minus that on its clean samples, and how many samples pass the adjusted-outlyingness
rule (AO > `outlyingness`, 2) that chooses the samples ASSET's offset step pushes away. Both feature scalings are
shown: standardised with the base set's statistics (the suite's) and raw (the codes'), each at `--steps` V steps
(the codes' 100, and more). Ground truth (`poison_idx`) is read here, after the fact: an analysis, never part of a
defense.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the run (defense=asset is added)")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 1000])
    args = ap.parse_args()

    from securetl.defenses._features import reference_model
    from securetl.defenses._scoring import adjusted_outlyingness
    from securetl.plots import compose, prepare

    p = prepare(compose([*args.overrides, "defense=asset", "progress=false"]))
    asset, ctx = p.defense, replace(p.ctx, clean=p.clean, diagnostics={})
    m0 = reference_model(p.encoder, p.poisoned.train, p.probe, ctx)
    fd, fb = asset.features(m0, p.poisoned.train, ctx), asset.features(m0, ctx.clean, ctx)
    is_poison = torch.zeros(len(fd), dtype=torch.bool)
    is_poison[p.poisoned.poison_idx] = True
    print(" ".join(args.overrides))
    print(
        f"{len(fd)} training samples, {int(is_poison.sum())} poisons; base set {len(fb)}; features {fd.shape[1]}-d, "
        f"raw mean {float(fd.mean()):.3f} std {float(fd.std()):.3f}"
    )
    mean, std = fb.mean(0), fb.std(0).clamp_min(1e-6)
    scalings = {"standardised": ((fd - mean) / std, (fb - mean) / std), "raw": (fd, fb)}
    bs = asset.batch_size
    for name, (a, b) in scalings.items():
        for steps in args.steps:
            asset.v_steps = steps
            g = torch.Generator().manual_seed(0)  # the same batches for every setting
            perm, bperm = torch.randperm(len(fd), generator=g), torch.randperm(len(fb), generator=g)
            gaps, passed, passed_poison, poisons = [], 0, 0, 0
            for i in range(args.batches):
                bi = perm[i * bs : (i + 1) * bs]
                bb = bperm.roll(-i * bs)[:bs]
                torch.manual_seed(i)
                s = asset._discriminate(a[bi], b[bb]).numpy()
                ao = adjusted_outlyingness(s) > asset.outlyingness
                m = is_poison[bi].numpy()
                gaps.append(s[m].mean() - s[~m].mean() if m.any() else np.nan)
                passed, passed_poison, poisons = (
                    passed + ao.sum(),
                    passed_poison + (ao & m).sum(),
                    poisons + m.sum(),
                )
            print(
                f"  {name:12s} V steps {steps:5d}: V(poison) - V(clean) {np.nanmean(gaps):+.4f}; AO > "
                f"{asset.outlyingness:g}: {passed} samples, {passed_poison} of {poisons} poisons "
                f"({args.batches} batches of {bs})"
            )


if __name__ == "__main__":
    main()
