"""Per defense, the means a comparison note quotes, from a rendered table's long-form CSV.

    python scripts/summarize_defenses.py baselines_synthetic [--tables results/tables]

Reads results/tables/NAME.csv (as `securetl-table NAME` writes it: one line per cell, `<metric>_mean` columns) of a
preset whose rows are (threat, defense), and prints per defense: mean ACC and ASR over the attacked threats
(every threat but `clean`), ACC on the clean threat, mean removal TPR/FPR where the defense removes samples, the
mean seconds of its defense phase and that time over no defense's on the same threats, and how many cells it has.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def summarize(df: pd.DataFrame, baseline: str = "none") -> pd.DataFrame:
    if not {"threat", "defense", "acc_mean", "asr_mean"} <= set(df.columns):
        raise SystemExit(
            "the CSV needs threat, defense, acc_mean and asr_mean columns (rows: [threat, defense])"
        )
    time_col = "time:defense_mean" if "time:defense_mean" in df else None
    attacked = df[df["threat"] != "clean"]
    base_time = attacked[attacked["defense"] == baseline].set_index("threat")[time_col] if time_col else None
    out = []
    for name, g in attacked.groupby("defense", sort=False):
        rec = {
            "defense": name,
            "cells": len(g),
            "ACC": 100 * g["acc_mean"].mean(),
            "ASR": 100 * g["asr_mean"].mean(),
        }
        clean = df[(df["threat"] == "clean") & (df["defense"] == name)]
        rec["clean ACC"] = 100 * clean["acc_mean"].mean() if len(clean) else float("nan")
        for col, label in (("diag:detector/tpr_mean", "TPR"), ("diag:detector/fpr_mean", "FPR")):
            rec[label] = g[col].mean() if col in g else float("nan")
        if time_col:
            rec["seconds"] = g[time_col].mean()
            shared = g.set_index("threat")[time_col].reindex(base_time.index).dropna()
            rec["x none"] = (
                shared.mean() / base_time.loc[shared.index].mean() if len(shared) else float("nan")
            )
        out.append(rec)
    return pd.DataFrame(out).set_index("defense")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", help="table preset name, e.g. baselines_synthetic")
    parser.add_argument("--tables", type=Path, default=ROOT / "results" / "tables")
    args = parser.parse_args()
    path = args.tables / f"{args.name}.csv"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `securetl-table {args.name}` first")
    print(summarize(pd.read_csv(path)).to_markdown(floatfmt=".2f"))


if __name__ == "__main__":
    main()
