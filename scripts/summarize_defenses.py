"""Per defense, the means a comparison note quotes, from a table preset's committed rows.

    python scripts/summarize_defenses.py baselines_synthetic [--results-dir results] [--runs]

Reads the rows of a preset whose report rows are (threat, defense) (plus any column group, such as
`defense.clean_fraction`: each value is summarised apart) and prints per defense:

- mean ACC and ASR over the attacked threats (every threat but `clean`; the mean of the per-threat means), ACC on
  the clean threat, and how many attacked cells it has;
- mean removal TPR/FPR where the defense removes samples (detectors, T-Core);
- what a suppression method set apart, over the rows whose D holds poisons: `isolated/*` (ABL's unlearned set),
  `unlabelled/*` (DBD's and ASD's unlabelled part) as poisons in it / its size (precision) and its share of all
  the poisons (recall);
- mean pruned channels (`*/pruned`: FP, ANP, RNP);
- cost: the median seconds of the defense phase without M0 ("own s"), the shared reference model M0's training
  ("M0 s", charged to every method whose class declares `uses_reference_model`: a sweep trains M0 once per cell and
  caches it, so `time:defense` holds it only in the run that trained it), and their sum over no defense's median
  (whose training is M0's; M0's own median where the preset has no no-defense rows).

`--runs` adds one line per Neural Cleanse run: its anomaly index, the flagged classes and whether the attack's
target is among them (the target is read here, for the report only; NC never sees it).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd
from hydra.utils import get_class

from securetl import tables
from securetl.results import read_rows

ROOT = Path(__file__).resolve().parents[1]
SETS = ("isolated", "unlabelled")


def preset_frame(name: str, results_dir: Path) -> tuple[pd.DataFrame, list[str], list[dict]]:
    """The preset's rows, flattened (one line per run), the keys that name a method, and the raw rows kept."""
    preset = tables.load_preset(name)
    rows = read_rows(results_dir / "raw")
    if not rows:
        raise SystemExit(f"no rows under {results_dir / 'raw'}")
    flat = tables.flatten_for(preset, rows)
    flat["_run_id"] = [r.get("run_id") for r in rows]
    flat["defense._target_"] = [((r.get("config") or {}).get("defense") or {}).get("_target_") for r in rows]
    df = tables.select_rows(flat, preset["report"], preset["sweep"])
    keys = [
        k for k in (*preset["report"].get("rows", []), *preset["report"].get("cols", [])) if k != "threat"
    ]
    if "threat" not in df or "defense" not in keys:
        raise SystemExit("the preset's report rows must include threat and defense")
    kept = set(df["_run_id"])
    return df, keys, [r for r in rows if r.get("run_id") in kept]


def _own_seconds(g: pd.DataFrame) -> pd.Series:
    """Each run's defense phase without M0's training where the run trained M0 and says so (`m0/cached`); rows
    made before that key existed may include it (in the first M0 user of each cell a sweep ran)."""
    nan = pd.Series(math.nan, index=g.index)
    m0 = g.get("diag:m0/seconds", nan)
    trained = g.get("diag:m0/cached", nan).eq(False) & m0.notna()
    return g.get("time:defense", nan) - m0.where(trained, 0)


def _uses_m0(g: pd.DataFrame) -> bool:
    target = g["defense._target_"].dropna() if "defense._target_" in g else pd.Series(dtype=str)
    return bool(len(target)) and bool(getattr(get_class(target.iloc[0]), "uses_reference_model", False))


def summarize(df: pd.DataFrame, keys: list[str], baseline: str = "none") -> pd.DataFrame:
    out = []
    base = df[df["defense"] == baseline]
    base_seconds = float(base["time:defense"].median()) if "time:defense" in base and len(base) else math.nan
    m0_recorded = df.get("diag:m0/seconds", pd.Series(dtype=float)).dropna()
    # M0 is the probe trained on D: no defense's own training, where no row recorded M0's time
    m0_seconds = float(m0_recorded.median()) if len(m0_recorded) else base_seconds
    if math.isnan(base_seconds):  # a preset without no-defense rows: M0's training is no defense's training
        base_seconds = m0_seconds
    for name, g in df.groupby(keys, sort=False):
        name = name if isinstance(name, tuple) else (name,)
        attacked = g[g["threat"] != "clean"]
        per_threat = attacked.groupby("threat")[["acc", "asr"]].mean()
        rec = dict(zip(keys, name))
        rec |= {
            "cells": len(per_threat),
            "ACC": 100 * per_threat["acc"].mean(),
            "ASR": 100 * per_threat["asr"].mean(),
            "clean ACC": 100 * g.loc[g["threat"] == "clean", "acc"].mean(),
        }
        for col, label in (("diag:detector/tpr", "TPR"), ("diag:detector/fpr", "FPR")):
            if col in g and g[col].notna().any():
                rec[label] = g[col].mean()
        poisoned = g[g.get("diag:n_poison", pd.Series(0, index=g.index)).fillna(0) > 0]
        for s in SETS:
            n, size = f"diag:{s}/n_poison", f"diag:{s}/size"
            if n in poisoned and poisoned[n].notna().any():
                p = poisoned.dropna(subset=[n, size])
                rec[f"{s} poisons/size"] = f"{int(p[n].sum())}/{int(p[size].sum())}"
                rec[f"{s} precision"] = p[n].sum() / max(p[size].sum(), 1)
                rec[f"{s} recall"] = p[n].sum() / max(p["diag:n_poison"].sum(), 1)
        for col in sorted(c for c in g if c.endswith("/pruned")):
            if g[col].notna().any():
                rec[col.removeprefix("diag:")] = g[col].mean()
        rec["own s"] = float(_own_seconds(g).median())
        rec["M0 s"] = m0_seconds if _uses_m0(g) else 0.0
        rec["x none"] = (rec["own s"] + rec["M0 s"]) / base_seconds if base_seconds else math.nan
        out.append(rec)
    return pd.DataFrame(out).set_index(keys)


def nc_runs(rows: list[dict]) -> pd.DataFrame:
    out = []
    for r in rows:
        d = r.get("diagnostics", {})
        if "nc/anomaly_index" not in d:
            continue
        target = ((r.get("config") or {}).get("data_attack") or {}).get("target")
        if target is None:
            target = ((r.get("config") or {}).get("encoder_attack") or {}).get("target")
        flagged = d.get("nc/flagged_classes", [])
        out.append(
            {
                "threat": r["choices"].get("threat"),
                "seed": r.get("seed"),
                "anomaly index (smallest-L1 class)": d["nc/anomaly_index"],
                "max index": max(d.get("nc/anomaly_indices") or [math.nan]),
                "flagged": flagged,
                "target": target,
                "target flagged": None if target is None else target in flagged,
                "ASR": None if r["metrics"].get("asr") is None else 100 * r["metrics"]["asr"],
            }
        )
    return pd.DataFrame(out).sort_values(["threat", "seed"]) if out else pd.DataFrame()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", help="table preset name, e.g. baselines_synthetic")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "results")
    parser.add_argument("--runs", action="store_true", help="also list Neural Cleanse's verdict per run")
    args = parser.parse_args()
    df, keys, rows = preset_frame(args.name, args.results_dir)
    print(summarize(df, keys).to_markdown(floatfmt=".3g"))
    if args.runs:
        runs = nc_runs(rows)
        if len(runs):
            print("\nNeural Cleanse, per run:\n")
            print(runs.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
