"""Trigger gallery: one clean synthetic image, every trigger applied, and the amplified difference.

    python scripts/make_trigger_gallery.py [--out results/figures/triggers.png] [--index 0]

Rows: the test-time trigger, its difference from the clean image, a training poison as the attack stores
it (uint8, partial triggers and train opacities included), and that difference. Each difference panel is
scaled to its own maximum; the factor is printed under it. Attacks are built from conf/ exactly as a run
builds them, so the figure shows what the configs say.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from securetl.build import build  # noqa: E402
from securetl.data.synthetic import build_synthetic  # noqa: E402
from securetl.interfaces import LabeledSet, to_float  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (column title, config group, option): the data attacks, plus BadEncoder's trigger (Threat-1/3)
COLUMNS = [
    ("BadNets", "data_attack", "badnets"),
    ("BadEncoder\n(white10)", "encoder_attack", "badencoder"),
    ("Blended", "data_attack", "blended"),
    ("SIG", "data_attack", "sig"),
    ("WaNet", "data_attack", "wanet"),
    ("TaCT", "data_attack", "tact"),
    ("Adap-Blend", "data_attack", "adap_blend"),
    ("Adap-Patch", "data_attack", "adap_patch"),
]


def training_poison(attack, image: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """One poisoned copy of `image` (uint8, (C, H, W)) as `attack.poison` stores it, or None."""
    if not hasattr(attack, "poison"):
        return None
    n = 20 * num_classes  # copies of the one image under every label, so each attack finds its classes
    copies = LabeledSet(image.expand(n, -1, -1, -1).clone(), torch.arange(n) % num_classes)
    out = attack.poison(copies, torch.Generator().manual_seed(0))
    return out.train.x[out.poison_idx[0]] if len(out.poison_idx) else None


def show(ax, img: torch.Tensor, caption: str = "", title: str = "") -> None:
    ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if caption:
        ax.set_xlabel(caption, fontsize=8)
    if title:
        ax.set_title(title, fontsize=8)


def save(fig, out: Path) -> None:
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    print(f"wrote {out}")


def diff_panel(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, str]:
    d = (a - b).abs()
    m = float(d.max())
    return (d / m if m > 0 else d), (f"x{1 / m:.0f}" if m > 0 else "no change")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "figures" / "triggers.png")
    parser.add_argument("--index", type=int, default=3, help="which synthetic test image to show")
    args = parser.parse_args()

    splits = build_synthetic(n_train=200, n_test=64, n_pretrain=10, n_reference=10)
    image_u8 = splits.test.x[args.index]
    clean = to_float(image_u8)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        attacks = [
            build(compose("run", overrides=[f"{group}={option}"])[group]) for _, group, option in COLUMNS
        ]

    fig, axes = plt.subplots(4, len(COLUMNS) + 1, figsize=(1.35 * (len(COLUMNS) + 1), 6.4))
    show(axes[0, 0], clean)
    axes[0, 0].set_title("clean", fontsize=9)
    for r in range(1, 4):
        axes[r, 0].axis("off")
    for row, label in enumerate(["test trigger", "difference", "training poison", "difference"]):
        axes[row, 1].set_ylabel(label, fontsize=9)

    for col, ((title, _, _), attack) in enumerate(zip(COLUMNS, attacks), start=1):
        test = attack.apply_test(clean[None])[0]
        axes[0, col].set_title(title, fontsize=9)
        show(axes[0, col], test)
        show(axes[1, col], *diff_panel(test, clean))
        poisoned = training_poison(attack, image_u8, splits.num_classes)
        if poisoned is None:  # encoder attacks poison the encoder, not a stored image
            axes[2, col].axis("off")
            axes[3, col].axis("off")
            continue
        poisoned = to_float(poisoned)
        show(axes[2, col], poisoned)
        show(axes[3, col], *diff_panel(poisoned, clean))

    save(fig, args.out)


if __name__ == "__main__":
    main()
