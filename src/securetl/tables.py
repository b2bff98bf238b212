"""`securetl-table NAME`: turn the rows of a sweep into the table a preset describes.

A preset (conf/table/NAME.yaml) holds the sweep (`hydra.sweeper.params`) and a `report` layout:
rows/cols (group names, `seed`, or dotted config keys such as `data_attack.poison_rate`), metrics, and
`where` (fixed choices). Cells show mean ± std over seeds; cells the sweep defines but no row fills are
listed as missing. Writes results/tables/NAME.{md,csv,tex}.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from securetl.results import read_failures, read_rows

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
METRIC_NAMES = {
    "acc": "ACC",
    "asr": "ASR",
    "asr/data": "ASR data-trigger",
    "asr/encoder": "ASR enc-trigger",
    "asr/shared": "ASR shared-trigger",
    "asr/reference": "ASR ref-trigger",
    "knn_acc": "kNN ACC",
    "knn_asr": "kNN ASR",
}


def load_preset(name: str, conf_dir: Path = CONF_DIR) -> dict[str, Any]:
    p = conf_dir / "table" / f"{name}.yaml"
    if not p.exists():
        known = sorted(q.stem for q in (conf_dir / "table").glob("*.yaml"))
        raise SystemExit(f"securetl-table: no preset {name!r}; known: {', '.join(known)}")
    cfg = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    report = cfg.get("report") or {}
    sweep = ((cfg.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    return {
        "report": report,
        "sweep": {k: [v.strip() for v in str(val).split(",")] for k, val in sweep.items()},
    }


def config_value(config: dict, dotted: str) -> Any:
    """`data_attack.poison_rate` of a row's resolved config (None where the row's config lacks it)."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# overrides that do not change what a run computes (where it writes, whether it shows progress, ...)
NEUTRAL_OVERRIDES = {"table", "progress", "resume", "cache", "logger", "device", "paths"}


def extra_overrides(row: dict, keys: set[str]) -> list[str]:
    """The overrides a row was run with that the table neither sweeps, fixes nor groups by and that change
    what a run computes (another encoder, a changed trigger, another encoder seed, ...)."""
    out = []
    for override in row.get("overrides") or []:
        key = override.split("=", 1)[0].lstrip("+~")
        if key not in keys and key not in NEUTRAL_OVERRIDES and not key.startswith(("hydra.", "paths.")):
            out.append(override)
    return sorted(out)


def flatten(
    rows: list[dict], config_keys: list[str] | tuple[str, ...] = (), described: set[str] | None = None
) -> pd.DataFrame:
    """One record per row: its choices, seed, metrics, diagnostics and timings, plus the resolved config
    values `config_keys` names (dotted paths such as `data_attack.poison_rate`, so that a table can group
    by a swept hyperparameter, not only by a config group). With `described` (the keys a table sweeps,
    fixes or groups by), each record also lists the row's other overrides (`_extra`, see extra_overrides)."""
    recs = []
    for r in rows:
        rec = dict(r["choices"])
        rec["seed"] = r["seed"]
        if described is not None:
            rec["_extra"] = tuple(extra_overrides(r, described))
        rec["_numerics"] = numerics_label(r)
        for k in config_keys:
            v = config_value(r.get("config") or {}, k)
            rec[k] = "None" if v is None else str(v)
        for k, v in r["metrics"].items():
            if isinstance(v, int | float):
                rec[k] = v
        for k, v in r.get("diagnostics", {}).items():
            if isinstance(v, int | float):
                rec[f"diag:{k}"] = v
        for k, v in r.get("timings", {}).items():
            rec[f"time:{k}"] = v
        recs.append(rec)
    return pd.DataFrame(recs)


def numerics_label(row: dict) -> str:
    """How a row was computed (device, precision, CPU threads): rows made under different numerics are
    not bit-comparable, so a cell that mixes them is pointed out under the table."""
    n = row.get("numerics")
    if not isinstance(n, dict):  # rows written before the numerics were recorded
        return f"{str(row.get('device', '?')).split(':')[0]}, numerics not recorded"
    label = f"{n.get('device', '?')} {n.get('precision', '?')}"
    return label + (f", {n['threads']} threads" if n.get("device") == "cpu" and "threads" in n else "")


def mixed_numerics(df: pd.DataFrame, keys: list[str]) -> list[str]:
    """The cells (by their `keys`) whose rows were computed under more than one numerics label."""
    if "_numerics" not in df or df.empty:
        return []
    by = [k for k in keys if k in df]
    groups = df.groupby(by, dropna=False)["_numerics"] if by else [((), df["_numerics"])]
    out = []
    for cell, labels in groups:
        kinds = sorted(set(labels))
        if len(kinds) > 1:
            cell = cell if isinstance(cell, tuple) else (cell,)
            out.append(", ".join(f"{k}={v}" for k, v in zip(by, cell)) + f": {' / '.join(kinds)}")
    return out


def fmt(mean: float, std: float, n: int, pct: bool) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    k = 100.0 if pct else 1.0
    s = f"{k * mean:.2f}"
    if n > 1 and not math.isnan(std):
        s += f" ± {k * std:.2f}"
    return s


OPTIONAL_PRESETS = ("threat", "ablation")


def build_table(df: pd.DataFrame, report: dict, sweep: dict) -> tuple[pd.DataFrame, list[str], pd.DataFrame]:
    """(display table, missing cells, long-form numbers)."""
    rows = list(report.get("rows", []))
    cols = list(report.get("cols", []))
    metrics = list(report.get("metrics", ["acc", "asr"]))
    where = dict(report.get("where", {}))
    for k, v in where.items():
        if k in df:
            df = df[df[k].astype(str) == str(v)]
    # the sweep's own choices restrict the rows too, so other sweeps' rows in the same folder stay out;
    # an optional preset group the table neither sweeps nor fixes must be unset: a Threat-2 table must not
    # count the no-defense rows a T-Core sweep ran through `threat=t2_badnets` a second time
    for k in OPTIONAL_PRESETS:
        if k in df and k not in sweep and k not in where:
            df = df[df[k].astype(str) == "None"]
    for k, vals in sweep.items():
        if k in df and k != "seed":
            df = df[df[k].astype(str).isin(vals)]
    if "seed" in sweep and "seed" in df:
        df = df[df["seed"].astype(str).isin(sweep["seed"])]
    keys = rows + cols
    df = prefer_plain_rows(df, [k for k in keys if k in df] + ["seed"])
    missing: list[str] = []
    grid_axes = [
        sweep.get(k) or sorted(df[k].astype(str).unique()) if k in df or k in sweep else [] for k in keys
    ]
    seeds = sweep.get("seed", ["0"])
    for cell in itertools.product(*grid_axes):
        sel = df
        for k, v in zip(keys, cell):
            sel = sel[sel[k].astype(str) == v] if k in sel else sel.iloc[0:0]
        have = set(sel["seed"].astype(str)) if len(sel) else set()
        for s in seeds:
            if s not in have:
                missing.append(", ".join(f"{k}={v}" for k, v in zip(keys, cell)) + f", seed={s}")
    present = [m for m in metrics if m in df]
    if df.empty or not present:
        return pd.DataFrame(), missing, pd.DataFrame()
    agg = df.groupby(keys, dropna=False)[present].agg(["mean", "std", "count"])
    long = agg.copy()
    # settings the preset does not set, under which some of the kept rows ran (said under the table)
    long.attrs["extra"] = sorted({e for extra in df.get("_extra", []) for e in extra})
    long.attrs["mixed_numerics"] = mixed_numerics(df, keys)
    disp = pd.DataFrame(index=agg.index)
    for m in present:
        pct = not m.startswith("time:") and not m.startswith("diag:") or m.endswith("purity")
        disp[METRIC_NAMES.get(m, m)] = [
            fmt(a, b, int(c), pct) for a, b, c in zip(agg[(m, "mean")], agg[(m, "std")], agg[(m, "count")])
        ]
    if cols:
        disp = disp.unstack(cols)
        disp.columns = [
            " ".join(str(c) for c in col[::-1]) if isinstance(col, tuple) else str(col)
            for col in disp.columns
        ]
        # order columns by the sweep's order of the column group, then metric
        disp = disp[sorted(disp.columns, key=lambda c: _col_order(c, cols, sweep, present))]
    return disp, missing, long


def _col_order(col: str, cols: list[str], sweep: dict, metrics: list[str]) -> tuple:
    parts = col.split(" ", len(cols))
    order = []
    for p, c in zip(parts, cols[::-1] + ["metric"]):
        vals = sweep.get(c, [])
        order.append(vals.index(p) if p in vals else len(vals))
    names = [METRIC_NAMES.get(m, m) for m in metrics]
    order.append(names.index(parts[-1]) if parts[-1] in names else 99)
    return tuple(order)


def prefer_plain_rows(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Per cell and seed, keep the rows run with the fewest extra overrides: a table's own sweep wins over
    another table's rows that share its choices (`encoder.seed=1` rows beside Threat-1's clean encoder),
    while a sweep run only with extra settings (a smaller dataset, say) still fills the table."""
    if "_extra" not in df or df.empty:
        return df
    n = df["_extra"].map(len)
    fewest = n.groupby([df[k].astype(str) for k in by], dropna=False).transform("min")
    return df[n == fewest]


def record_value(record: dict, key: str) -> str:
    """A row's (or failure record's) value of a table key: a group choice, `seed`, or a dotted config key,
    written as the missing-cell labels of build_table write it."""
    if key == "seed":
        return str(record.get("seed"))
    choices = record.get("choices") or {}
    if key in choices:
        return str(choices[key])
    v = config_value(record.get("config") or {}, key)
    return "None" if v is None else str(v)


def failed_cells(records: list[dict], report: dict, sweep: dict) -> dict[str, str]:
    """Missing-cell label -> the error of that cell's last failed run (results/failed/*.json), for the
    failure records that fall inside this table (its `where` and its sweep)."""
    keys = [*report.get("rows", []), *report.get("cols", [])]
    out = {}
    for r in records:
        if any(record_value(r, k) != str(v) for k, v in report.get("where", {}).items()):
            continue
        if any("@" not in k and record_value(r, k) not in vals for k, vals in sweep.items()):
            continue
        label = ", ".join(f"{k}={record_value(r, k)}" for k in keys) + f", seed={record_value(r, 'seed')}"
        out[label] = str(r.get("error", "?"))
    return out


def render(name: str, results_dir: Path, conf_dir: Path = CONF_DIR, out_dir: Path | None = None) -> str:
    preset = load_preset(name, conf_dir)
    report, sweep = preset["report"], preset["sweep"]
    rows = read_rows(Path(results_dir) / "raw")
    if not rows:
        raise SystemExit(
            f"securetl-table: no rows under {Path(results_dir) / 'raw'}; run `securetl table={name}` first"
        )
    keys = [*report.get("rows", []), *report.get("cols", []), *report.get("where", {}), *sweep]
    # dotted config keys, not group overrides such as `trigger@eval.reference_trigger`
    config_keys = [k for k in keys if "." in k and "@" not in k]
    disp, missing, long = build_table(flatten(rows, config_keys, described=set(keys)), report, sweep)
    out_dir = Path(out_dir or Path(results_dir) / "tables")
    out_dir.mkdir(parents=True, exist_ok=True)
    title = report.get("title", name)
    n_seeds = len(sweep.get("seed", ["0"]))
    note = (
        f"ACC and ASR in %, mean ± std over {n_seeds} seed(s)."
        if n_seeds > 1
        else "ACC and ASR in %, one seed."
    )
    md = (
        f"### {title}\n\n{note}\n\n"
        + (disp.reset_index().to_markdown(index=False) if len(disp) else "_no matching rows_")
        + "\n"
    )
    if len(long) and long.attrs.get("extra"):
        md += (
            "\nSome rows ran with settings this preset does not set: "
            + ", ".join(f"`{e}`" for e in long.attrs["extra"])
            + "\n"
        )
    if len(long) and long.attrs.get("mixed_numerics"):
        mixed = long.attrs["mixed_numerics"]
        log.warning("%d cell(s) of %s mix rows computed under different numerics", len(mixed), name)
        md += (
            "\nCells whose rows were computed under different numerics (not bit-comparable; "
            "`securetl device=... precision=... threads=...` sets them):\n"
            + "".join(f"- {m}\n" for m in mixed)
        )
    if missing:
        failed = failed_cells(read_failures(Path(results_dir)), report, sweep)
        md += f"\nMissing cells ({len(missing)}):\n" + "".join(
            f"- {m}" + (f" — failed: {failed[m]}" if m in failed else "") + "\n" for m in missing
        )
    (out_dir / f"{name}.md").write_text(md)
    if len(long):
        flat = long.copy()
        flat.columns = [f"{m}_{s}" for m, s in flat.columns]
        flat.reset_index().to_csv(out_dir / f"{name}.csv", index=False)
        (out_dir / f"{name}.tex").write_text(disp.to_latex(escape=True, caption=title, label=f"tab:{name}"))
    return md


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="securetl-table", description=__doc__.splitlines()[0])
    ap.add_argument("name", help="a preset in conf/table/ (e.g. demo)")
    ap.add_argument("--results-dir", default=None, help="default: $SECURETL_RESULTS_DIR or ./results")
    ap.add_argument("--out-dir", default=None, help="default: <results-dir>/tables")
    args = ap.parse_args(argv)
    import os

    results_dir = Path(args.results_dir or os.environ.get("SECURETL_RESULTS_DIR", "results"))
    print(render(args.name, results_dir, out_dir=args.out_dir))


if __name__ == "__main__":
    sys.exit(main())
