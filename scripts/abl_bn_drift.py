"""Where ABL's accuracy goes: its unlearning as both codes run it (train mode, so BatchNorm's running statistics
follow the isolated samples) against the same steps with every BatchNorm's statistics frozen, and against no
unlearning at all. An analysis that reads test ACC/ASR to explain a committed row, never to choose a setting: the
defense itself keeps the codes' train mode.

    python scripts/abl_bn_drift.py threat=t2_badnets seed=0 [more Hydra overrides]

Rows go to the results dir as usual (point SECURETL_RESULTS_DIR elsewhere to keep them out of results/raw); the
frozen-statistics run has the default config's run_id, so `resume=false` is forced.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

from torch import nn


@contextmanager
def frozen_bn_statistics():
    """ABL's unlearning with every BatchNorm of the unlearned module kept in eval mode (statistics frozen)."""
    import securetl.defenses.abl as abl

    original = abl.unlearn

    def unlearn(module, *args, **kwargs):
        bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in bns:  # train() on the module no longer reaches these
            m.train = lambda mode=True, m=m: nn.Module.train(m, False)
            nn.Module.train(m, False)
        try:
            return original(module, *args, **kwargs)
        finally:
            for m in bns:
                del m.train

    abl.unlearn = unlearn
    try:
        yield
    finally:
        abl.unlearn = original


def main() -> None:
    from securetl.pipeline import run
    from securetl.plots import compose

    base = [*sys.argv[1:], "defense=abl", "progress=false", "resume=false"]
    variants = {
        "codes (train-mode unlearning)": (base, None),
        "BN statistics frozen": (base, frozen_bn_statistics),
        "no unlearning": ([*base, "defense.unlearning_steps=0"], None),
    }
    for name, (overrides, patch) in variants.items():
        if patch is None:
            row = run(compose(overrides))
        else:
            with patch():
                row = run(compose(overrides))
        d = row["diagnostics"]
        print(
            f"{name:32s} ACC {100 * row['metrics']['acc']:6.2f}  ASR {100 * row['metrics']['asr']:6.2f}  "
            f"isolated {d.get('isolated/size')} ({d.get('isolated/n_poison')} poisons), "
            f"per class {d.get('abl/isolated_per_class')}"
        )


if __name__ == "__main__":
    main()
