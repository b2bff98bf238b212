"""How many poisons T-Core's clean subset (phases 1-2) takes, for several values of `expansion_agreement`: an
analysis with ground truth on development variants, for explaining the gate, never part of the defense.

    python scripts/tcore_expansion_gate.py variant=dev_small1200 threat=t2_adap_blend seed=1 \
        [--gates 0 0.3 0.5] [--inits 3] [more Hydra overrides]

Composes the run the overrides describe (with `defense=tcore probe=finetune`; the encoder comes from the cache
when a sweep built it), poisons the training set, runs T-Core's representations and TIS once, then the seed
expansion once per gate value and per initialisation of the confusion model (global seeds 1000, 1001, ...: the
subset depends on it), and prints the poisons in the final subset, the samples the gate sets aside, and the
label agreement of the poisons and of the clean samples of the classes that hold them (quantiles 10/50/90 %).
Ground truth (`poison_idx`) is read after the fact.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. threat=t2_badnets seed=0")
    parser.add_argument("--gates", nargs="+", type=float, default=[0.0, 0.3, 0.5])
    parser.add_argument("--inits", type=int, default=3)
    args = parser.parse_args()

    from securetl.defenses.tcore.confusion import expand_seed
    from securetl.defenses.tcore.sifting import label_agreement
    from securetl.plots import compose, prepare

    cell = prepare(compose(["defense=tcore", "probe=finetune", *args.overrides]))
    ctx, encoder, poisoned, tc = cell.ctx, cell.encoder, cell.poisoned, cell.defense

    # phases 1-2 as TCore._train runs them, up to the gate
    g = ctx.generator(salt=4242)
    torch.manual_seed(ctx.seed)
    y, c = poisoned.train.y, ctx.num_classes
    _, (layers, _, grid) = tc.represent(encoder, poisoned.train.x, ctx)
    logits = tc._reference_logits(layers[-1], y, c, g)
    res = tc.sift(layers, logits, y)
    dense = tc._collapsed(res.dense_idx, y)
    cfeats = torch.cat([grid, *[layers[i] for i in tc.confusion_layers]], dim=1)
    agree = label_agreement([layers[-1], logits], y, tc.k)

    is_poison = torch.zeros(len(y), dtype=torch.bool)
    is_poison[poisoned.poison_idx] = True
    print(" ".join(args.overrides), f"| {len(y)} samples, {int(is_poison.sum())} poisons")
    print(f"seed: {len(res.seed_idx)} samples, {int(is_poison[res.seed_idx].sum())} poisons")
    if is_poison.any():
        same = ~is_poison & torch.isin(y, y[is_poison])
        q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
        print(
            f"label agreement, poisons {agree[is_poison].quantile(q).numpy().round(2)}"
            f", clean of their classes {agree[same].quantile(q).numpy().round(2)}"
            f", all clean {agree[~is_poison].quantile(q).numpy().round(2)}"
        )
    state = g.get_state()
    for gate in args.gates:
        gated = torch.nonzero(agree < gate).squeeze(1) if gate > 0 else torch.empty(0, dtype=torch.long)
        exclude = torch.unique(torch.cat([dense, gated]))
        counts, sizes = [], []
        for init in range(args.inits):
            torch.manual_seed(1000 + init)
            g.set_state(state)
            exp = expand_seed(
                cfeats,
                y,
                res.seed_idx,
                c,
                g,
                tuple(tc.expansion_fractions),
                exclude=exclude if len(exclude) else None,
                lam=tc.lam,
                epochs=tc.confusion_epochs,
                batch_size=256,
                num=ctx.num,
            )
            counts.append(int(is_poison[exp.subset_idx].sum()))
            sizes.append(len(exp.subset_idx))
        print(
            f"gate {gate:.2f}: set aside {len(gated):5d}, subset {np.mean(sizes):.0f} samples,"
            f" poisons per initialisation {counts}"
        )


if __name__ == "__main__":
    main()
