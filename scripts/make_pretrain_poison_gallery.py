"""Pre-training poisons of the Threat-1 data attacks (CTRL, SSL-Backdoor, CorruptEncoder), and what the
victim's SSL crops make of them.

    python scripts/make_pretrain_poison_gallery.py [--out results/figures/pretrain_poisons.png]

Per attack (one row): a downstream test image with the attack's test trigger, two poisons as SSL sees them
(CorruptEncoder's are twice as wide as tall, as the authors'), and four views of the first poison under the
synthetic SimCLR encoder's crop (area 0.3-1; colour augmentation left out so the trigger stays visible).
Attacks are built from conf/ exactly as a run builds them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

# the trigger gallery's panel and save helpers (this folder is on sys.path when a script here runs)
from make_trigger_gallery import save, show  # noqa: E402

from securetl.build import build  # noqa: E402
from securetl.data.synthetic import build_synthetic  # noqa: E402
from securetl.interfaces import pretraining_sets, to_float  # noqa: E402
from securetl.ssl.augment import random_resized_crop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = [("CTRL", "ctrl"), ("SSL-Backdoor", "sslbackdoor"), ("CorruptEncoder", "corruptencoder")]
N_VIEWS = 4


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "figures" / "pretrain_poisons.png")
    args = parser.parse_args()

    splits = build_synthetic(n_train=200, n_test=64, n_pretrain=400, n_reference=10)
    test = to_float(splits.test.x[splits.test.y != 0][:1])
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfgs = {name: compose("run", overrides=[f"encoder_attack={name}"]) for _, name in ATTACKS}
    crop_min = float(next(iter(cfgs.values())).encoder.augment.crop_scale_min)

    cols = 3 + N_VIEWS
    fig, axes = plt.subplots(len(ATTACKS), cols, figsize=(1.5 * cols + 1.2, 1.7 * len(ATTACKS)))
    for row, (title, name) in enumerate(ATTACKS):
        attack = build(cfgs[name].encoder_attack)
        parts = pretraining_sets(
            attack.poison_pretraining(
                splits.pretrain, torch.Generator().manual_seed(0), background=splits.background
            )
        )
        n_clean = len(parts[0]) if len(parts) > 1 else 0
        idx = attack.poison_idx[:2] - n_clean
        poisons = to_float(parts[-1].x[idx])
        show(axes[row, 0], attack.apply_test(test)[0], title="test + trigger" if row == 0 else "")
        axes[row, 0].set_ylabel(title, fontsize=9)
        for j in range(2):
            show(axes[row, 1 + j], poisons[j], title=f"poison {j + 1}" if row == 0 else "")
        views = random_resized_crop(
            poisons[:1].expand(N_VIEWS, -1, -1, -1),
            scale=(crop_min, 1.0),
            g=torch.Generator().manual_seed(row),
            size=tuple(splits.test.x.shape[-2:]),
        )
        for k in range(N_VIEWS):
            show(axes[row, 3 + k], views[k], title=f"view {k + 1} of poison 1" if row == 0 else "")
    save(fig, args.out)


if __name__ == "__main__":
    main()
