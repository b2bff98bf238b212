"""The Threat-1 pre-training-data attacks over three pre-training runs each, from the rendered tables.

    python scripts/make_threat1_seed_figure.py [--out results/figures/threat1_pretrain_seeds.png]

Reads results/tables/encoder_seed_synthetic.csv (SimCLR) and encoder_seed_mocov2_synthetic.csv (MoCo v2),
as `securetl-table` writes them, and draws one column per SSL method: ASR on top (filled: linear probe,
mean over probe seeds; hollow: kNN), ACC below; one colour per pre-training seed, so that an attack is read
against the clean encoder of its own seed. The dashed line is the paper's lowest no-defense ASR for these
attacks (37 %). A seed whose points sit apart from the others is what a one-seed table would have hidden.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TABLES = {"SimCLR": "encoder_seed_synthetic", "MoCo v2": "encoder_seed_mocov2_synthetic"}
# what the clean rows' ASR measures (each preset's eval.reference_trigger)
CLEAN_TRIGGER = {"SimCLR": "the 3-px checkerboard", "MoCo v2": "SSL-Backdoor's 7-px white patch"}
ATTACKS = ["none", "sslbackdoor", "corruptencoder", "ctrl"]
LABELS = {"none": "clean", "sslbackdoor": "SSL-Backdoor", "corruptencoder": "CorruptEncoder", "ctrl": "CTRL"}
PAPER_LOWEST_ASR = 37.0


def load(tables_dir: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for method, name in TABLES.items():
        p = tables_dir / f"{name}.csv"
        if not p.exists():
            raise SystemExit(f"{p} is missing: run `securetl table={name} && securetl-table {name}` first")
        out[method] = pd.read_csv(p)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tables", type=Path, default=ROOT / "results" / "tables")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "results" / "figures" / "threat1_pretrain_seeds.png"
    )
    args = parser.parse_args()
    data = load(args.tables)

    fig, axes = plt.subplots(2, len(data), figsize=(4.6 * len(data), 6.4), sharey="row", squeeze=False)
    colours = plt.get_cmap("tab10")
    for col, (method, df) in enumerate(data.items()):
        attacks = [a for a in ATTACKS if a in set(df["encoder_attack"])]
        seeds = sorted(df["encoder.seed"].unique())
        for j, seed in enumerate(seeds):
            rows = df[df["encoder.seed"] == seed].set_index("encoder_attack")
            xs = [i + (j - (len(seeds) - 1) / 2) * 0.18 for i in range(len(attacks))]
            c = colours(j)
            asr = [100 * rows.loc[a, "asr_mean"] if a in rows.index else float("nan") for a in attacks]
            knn = [100 * rows.loc[a, "knn_asr_mean"] if a in rows.index else float("nan") for a in attacks]
            acc = [100 * rows.loc[a, "acc_mean"] if a in rows.index else float("nan") for a in attacks]
            axes[0, col].scatter(xs, asr, color=c, label=f"pre-training seed {seed}: linear probe")
            axes[0, col].scatter(
                xs, knn, facecolors="none", edgecolors=c, label=f"pre-training seed {seed}: kNN"
            )
            axes[1, col].scatter(xs, acc, color=c)
        for row, ylabel in enumerate(("ASR (%)", "ACC (%)")):
            ax = axes[row, col]
            ax.set_xticks(range(len(attacks)), [LABELS[a] for a in attacks], fontsize=8)
            ax.grid(axis="y", alpha=0.3)
            if col == 0:
                ax.set_ylabel(ylabel)
        axes[0, col].axhline(PAPER_LOWEST_ASR, ls="--", color="grey", lw=1)
        axes[0, col].set_ylim(-2, 45)
        axes[0, col].set_title(
            f"{method} (synthetic, 25 epochs)\nclean: ASR of {CLEAN_TRIGGER[method]}", fontsize=9
        )
    axes[0, 0].text(
        0.02,
        PAPER_LOWEST_ASR + 1,
        "paper's lowest no-defense ASR",
        fontsize=7,
        color="grey",
        transform=axes[0, 0].get_yaxis_transform(),
    )
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3)
    fig.suptitle("Threat-1 pre-training-data attacks over three pre-training runs (linear probe and kNN)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
