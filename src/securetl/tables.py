"""`securetl-table NAME`: turn the rows of a sweep into the table a preset describes.

A preset (conf/table/NAME.yaml, or DIR/table/NAME.yaml with `--config-dir DIR`, as `securetl -cd DIR`)
holds the sweep (`hydra.sweeper.params`, read with Hydra's own override parser: `seed: range(0,3)` works)
and a `report` layout: rows/cols (group names, `seed`, or dotted config keys such as
`data_attack.poison_rate`), metrics, and `where` (fixed choices). Cells show mean ± std over the seeds each
cell has; cells the sweep defines but no row fills are listed as missing. Rows are read from the results
dir the runs wrote to (`paths.results_dir`: $SECURETL_RESULTS_DIR, else $SECURETL_ROOT/results, else
./results). Writes <results dir>/tables/NAME.{md,csv,tex} (the .tex compiles with `booktabs`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from securetl.results import LATE_GROUPS, read_failures, read_rows

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


ConfDirs = Path | str | Sequence[Path | str]


def conf_dirs(conf_dir: ConfDirs = CONF_DIR) -> list[Path]:
    """The config dirs to search, first wins: a user's dir(s) (`--config-dir`), then the suite's conf/."""
    dirs = [Path(conf_dir)] if isinstance(conf_dir, str | Path) else [Path(d) for d in conf_dir]
    return dirs + ([CONF_DIR] if CONF_DIR not in dirs else [])


def load_preset(name: str, conf_dir: ConfDirs = CONF_DIR) -> dict[str, Any]:
    dirs = conf_dirs(conf_dir)
    p = next((d / "table" / f"{name}.yaml" for d in dirs if (d / "table" / f"{name}.yaml").exists()), None)
    if p is None:
        known = sorted({q.stem for d in dirs for q in (d / "table").glob("*.yaml")})
        where = ", ".join(str(d / "table") for d in dirs)
        raise SystemExit(f"securetl-table: no preset {name!r} under {where}; known: {', '.join(known)}")
    cfg = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    report = cfg.get("report") or {}
    sweep = ((cfg.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    return {"report": report, "sweep": parse_sweep(sweep, dirs)}


def parse_sweep(params: dict[str, Any], dirs: list[Path] | None = None) -> dict[str, list[str]]:
    """`hydra.sweeper.params` as the values each key takes, written as str() of what Hydra would set (so
    `0.003` and `range(0,3)` match the rows' values). Parsed by Hydra's own override parser, so every sweep
    syntax the command line takes works here too (`a,b`, `range(0,3)`, `choice(...)`, `glob(...)` over a
    group's options). A sweep that cannot be enumerated (an Optuna `interval(...)`) restricts nothing."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    parser = OverridesParser.create()
    out: dict[str, list[str]] = {}
    for key, raw in params.items():
        text = ",".join(map(str, raw)) if isinstance(raw, list) else str(raw)
        try:
            o = parser.parse_override(f"{key}={text}")
        except Exception as e:  # noqa: BLE001 — Hydra's parser raises its own exception types
            raise SystemExit(f"securetl-table: cannot parse the sweep `{key}: {raw}` ({e})") from None
        if o.value_type == ValueType.INTERVAL_SWEEP:
            continue
        if o.value_type == ValueType.GLOB_CHOICE_SWEEP:
            group = key.split("@", 1)[0]
            options = sorted({q.stem for d in dirs or conf_dirs() for q in (d / group).glob("*.yaml")})
            values = o.value().filter(options)
        else:
            values = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
        out[key] = [str(v) for v in values]
    return out


def default_results_dir(conf_dir: ConfDirs = CONF_DIR) -> Path:
    """Where `securetl` writes its rows: `paths.results_dir` of the paths config (a user's config dir's own
    paths/default.yaml first), with the same environment variables (SECURETL_RESULTS_DIR, SECURETL_ROOT)."""
    for d in conf_dirs(conf_dir):
        p = d / "paths" / "default.yaml"
        if p.exists():
            paths = OmegaConf.load(p)
            if "results_dir" in paths:
                return Path(str(paths.results_dir))
    return Path("results")


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
NEUTRAL_OVERRIDES |= {"note", "tags", "objective"}  # metadata (results.METADATA_KEYS)


@dataclasses.dataclass(frozen=True)
class Defaults:
    """What `securetl` runs with no override: the unresolved config and the group choices. An override that
    restates one of them (`encoder.seed=0`, `encoder=synthetic_simclr_resnet18`) runs the default cell."""

    config: dict
    choices: dict

    def restates(self, key: str, value: str) -> bool:
        if key in self.choices:
            return str(self.choices[key]) == value
        default = config_value(self.config, key)
        if default is None or isinstance(default, dict | list):
            return False
        try:  # the value as Hydra reads it (YAML scalars: 0, 0.1, true)
            given = OmegaConf.create(f"v: {value}").v
        except Exception:  # noqa: BLE001  not a scalar: it restates nothing
            return False
        return (type(given) is type(default) and given == default) or str(default) == value


def compose_run(overrides: Sequence[str] = (), config_dirs: Sequence[Path | str] = ()) -> Any:
    """The run config `securetl -cd DIR... OVERRIDES` composes, with its `hydra` node (group choices); not
    resolved (a caller that resolves imports securetl.run first, for the resolvers the configs use)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    dirs = [Path(d).resolve() for d in config_dirs if Path(d).resolve() != CONF_DIR]
    searchpath = [f"hydra.searchpath=[{','.join(f'file://{d}' for d in dirs)}]"] if dirs else []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("run", overrides=[*searchpath, *overrides], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def run_defaults(conf_dir: ConfDirs = CONF_DIR) -> Defaults | None:
    """The default run config of the suite (a user's config dirs first, as `securetl -cd` searches them);
    None, with a warning, where it does not compose (a table still renders, judging overrides by name)."""
    try:
        cfg = compose_run(config_dirs=conf_dirs(conf_dir))
    except Exception as e:  # noqa: BLE001  any composition error: the table is still worth rendering
        log.warning(
            "securetl-table: the default run config does not compose (%s); an override that "
            "restates a default counts as a setting of its own",
            str(e).splitlines()[0],
        )
        return None
    config = OmegaConf.to_container(cfg, resolve=False)
    choices = config.pop("hydra")["runtime"]["choices"]
    return Defaults(config, choices)


def extra_overrides(row: dict, keys: set[str], defaults: Defaults | None = None) -> list[str]:
    """The overrides a row was run with that the table neither sweeps, fixes nor groups by and that change
    what a run computes (another encoder, a changed trigger, another encoder seed, ...); with `defaults`,
    an override that restates a default (`encoder.seed=0`, written by a sweep over encoder seeds whose
    seed-0 cell is the default run) changes nothing."""
    out = []
    for override in row.get("overrides") or []:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        neutral = key in NEUTRAL_OVERRIDES or key.split(".", 1)[0] in NEUTRAL_OVERRIDES  # logger.note=...
        if defaults is not None and not override.startswith(("+", "~")) and defaults.restates(key, value):
            neutral = True
        if key not in keys and not neutral and not key.startswith("hydra."):
            out.append(override)
    return sorted(out)


def flatten(
    rows: list[dict],
    config_keys: list[str] | tuple[str, ...] = (),
    described: set[str] | None = None,
    defaults: Defaults | None = None,
) -> pd.DataFrame:
    """One record per row: its choices, seed, metrics, diagnostics and timings, plus the resolved config
    values `config_keys` names (dotted paths such as `data_attack.poison_rate`, so that a table can group
    by a swept hyperparameter, not only by a config group). With `described` (the keys a table sweeps,
    fixes or groups by), each record also lists the row's other overrides (`_extra`, see extra_overrides)."""
    recs = []
    for r in rows:
        # a row that names no variant (written before the group existed) did not choose one
        rec = dict.fromkeys(LATE_GROUPS, "None") | r["choices"]
        rec["seed"] = r["seed"]
        if described is not None:
            rec["_extra"] = tuple(extra_overrides(r, described, defaults))
        rec["_numerics"] = numerics_label(r)
        rec["_encoder_setting"], rec["_encoder_key"] = encoder_provenance(r)
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
    """How a row was computed (device, precision, CPU threads and, where recorded, the CPU): rows made under
    different numerics are not bit-comparable, so a cell that mixes them is pointed out under the table."""
    n = row.get("numerics")
    if not isinstance(n, dict):  # rows written before the numerics were recorded
        return f"{str(row.get('device', '?')).split(':')[0]}, numerics not recorded"
    label = f"{n.get('device', '?')} {n.get('precision', '?')}"
    label += f", {n['threads']} threads" if n.get("device") == "cpu" and "threads" in n else ""
    m = row.get("machine")  # rows written before the machine was recorded say nothing of it
    return label + (
        f", {m.get('cpu')} ({m.get('isa')})" if isinstance(m, dict) and n.get("device") == "cpu" else ""
    )


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


def encoder_provenance(row: dict) -> tuple[str, str]:
    """(what should fix the row's starting encoder, the cache key of the encoder it started from). The key
    hashes the encoder's settings, the pre-training images themselves and the numerics; two rows with the
    same settings but another key started from other weights, because the images or the arithmetic differed:
    the synthetic generator's float ops are not bit-identical on every CPU (session 19 built the default
    encoder as 25466eb..., sessions 17, 18 and 20 as 29ab068... from one config)."""
    keys = row.get("cache_keys") if isinstance(row.get("cache_keys"), dict) else {}
    config = row.get("config") or {}
    dataset = {k: v for k, v in (config.get("dataset") or {}).items() if k != "downstream"}  # downstream only
    attack = (row.get("choices") or {}).get("encoder_attack", "none")
    # a pre-training-data attack is in the encoder's key; an implant's base encoder is the clean one
    poisons_pretraining = attack != "none" and "implanted" not in keys
    setting = [
        config.get("encoder"),
        dataset,
        row.get("numerics"),
        config.get("encoder_attack") if poisons_pretraining else None,
    ]
    return json.dumps(setting, sort_keys=True, default=str), str(keys.get("encoder", ""))


def mixed_encoders(df: pd.DataFrame) -> list[str]:
    """One line per encoder setting that the table's rows started from under more than one cache key: the
    cells of such a table compare models built from different weights (another machine's build)."""
    if "_encoder_key" not in df or df.empty:
        return []
    out = []
    for setting, group in df[df["_encoder_key"] != ""].groupby("_encoder_setting"):
        counts = group["_encoder_key"].value_counts()
        if len(counts) > 1:
            enc = (json.loads(setting)[0] or {}).get("seed")
            attacks = (
                ", ".join(sorted(set(group["encoder_attack"].astype(str))))
                if "encoder_attack" in group
                else "?"
            )
            out.append(
                f"encoder_attack={attacks}, encoder.seed={enc}: "
                + " / ".join(f"`{k}` ({n} rows)" for k, n in counts.items())
            )
    return out


def fmt(mean: float, std: float, n: int, pct: bool, n_usual: int | None = None) -> str:
    """`mean ± std` with two decimals (in % when `pct`); a cell over fewer or more seeds than the table's
    usual `n_usual` says how many (`[n=2]`), so the note above the table is true of every cell."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    k = 100.0 if pct else 1.0
    s = f"{k * mean:.2f}"
    if n > 1 and not math.isnan(std):
        s += f" ± {k * std:.2f}"
    if n_usual is not None and n != n_usual:
        s += f" [n={n}]"
    return s


def usual_count(counts: Sequence[int]) -> int | None:
    """The number of seeds most cells have (the larger one on a tie), or None without cells."""
    tally = collections.Counter(int(c) for c in counts if c)
    return max(tally, key=lambda n: (tally[n], n)) if tally else None


def seeds_note(counts: Sequence[int]) -> str:
    """The line above a table: how many seeds its cells average, counted on the cells themselves."""
    n = usual_count(counts)
    if n is None:
        return "ACC and ASR in %."
    spread = "one seed" if n == 1 else f"mean ± std over {n} seeds"
    if any(c and c != n for c in counts):
        spread += " (cells marked [n=k] have k)"
    return f"ACC and ASR in %, {spread}."


OPTIONAL_PRESETS = ("threat", "ablation", "variant")


def select_rows(df: pd.DataFrame, report: dict, sweep: dict) -> pd.DataFrame:
    """The flattened rows that belong to a preset's table: its `where`, its sweep's choices, one row per seed."""
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
    keys = [*report.get("rows", []), *report.get("cols", [])]
    return prefer_plain_rows(df, [k for k in keys if k in df] + ["seed"])


def build_table(df: pd.DataFrame, report: dict, sweep: dict) -> tuple[pd.DataFrame, list[str], pd.DataFrame]:
    """(display table, missing cells, long-form numbers)."""
    rows = list(report.get("rows", []))
    cols = list(report.get("cols", []))
    metrics = list(report.get("metrics", ["acc", "asr"]))
    keys = rows + cols
    df = select_rows(df, report, sweep)
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
    long.attrs["mixed_encoders"] = mixed_encoders(df)
    # a cell's seeds: its rows (a metric a row lacks, such as an ASR a clean run has none of, is not a seed less)
    counts = agg[[(m, "count") for m in present]].max(axis=1).astype(int)
    long.attrs["seeds"] = counts.tolist()
    n_usual = usual_count(counts.tolist())
    disp = pd.DataFrame(index=agg.index)
    for m in present:
        pct = not m.startswith("time:") and not m.startswith("diag:") or m.endswith("purity")
        disp[METRIC_NAMES.get(m, m)] = [
            fmt(a, b, int(c), pct, n_usual)
            for a, b, c in zip(agg[(m, "mean")], agg[(m, "std")], agg[(m, "count")])
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


def flatten_for(preset: dict, rows: list[dict], conf_dir: ConfDirs = CONF_DIR) -> pd.DataFrame:
    """`rows` flattened with the columns a preset's report and sweep name."""
    report, sweep = preset["report"], preset["sweep"]
    keys = [*report.get("rows", []), *report.get("cols", []), *report.get("where", {}), *sweep]
    # dotted config keys, not group overrides such as `trigger@eval.reference_trigger`
    config_keys = [k for k in keys if "." in k and "@" not in k]
    return flatten(rows, config_keys, described=set(keys), defaults=run_defaults(conf_dir))


def render(
    name: str, results_dir: Path | None = None, conf_dir: ConfDirs = CONF_DIR, out_dir: Path | None = None
) -> str:
    """Render preset `name` from the rows under `results_dir` (default: where `securetl` writes them)."""
    preset = load_preset(name, conf_dir)
    report, sweep = preset["report"], preset["sweep"]
    results_dir = Path(results_dir) if results_dir is not None else default_results_dir(conf_dir)
    rows = read_rows(results_dir / "raw")
    if not rows:
        raise SystemExit(
            f"securetl-table: no rows under {results_dir / 'raw'}; run `securetl table={name}` first "
            "(with the same SECURETL_ROOT / SECURETL_RESULTS_DIR, or pass --results-dir)"
        )
    disp, missing, long = build_table(flatten_for(preset, rows, conf_dir), report, sweep)
    out_dir = Path(out_dir or results_dir / "tables")
    out_dir.mkdir(parents=True, exist_ok=True)
    title = report.get("title", name)
    note = seeds_note(long.attrs.get("seeds", []) if len(long) else [])
    # disable_numparse: tabulate would re-format "88.60" as 88.6 beside "94.72 ± 1.20" (a string)
    table = disp.reset_index().to_markdown(index=False, disable_numparse=True) if len(disp) else None
    md = f"### {title}\n\n{note}\n\n" + (table or "_no matching rows_") + "\n"
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
    if len(long) and long.attrs.get("mixed_encoders"):
        mixed = long.attrs["mixed_encoders"]
        log.warning("%s: rows of one encoder setting started from %d sets of weights", name, len(mixed) + 1)
        md += (
            "\nRows that share an encoder's settings but started from different weights (its cache key: the "
            "pre-training images or the arithmetic differed, e.g. another CPU; re-run the minority with "
            "`resume=false` on one machine):\n" + "".join(f"- {m}\n" for m in mixed)
        )
    if missing:
        failed = failed_cells(read_failures(results_dir), report, sweep)
        md += f"\nMissing cells ({len(missing)}):\n" + "".join(
            f"- {m}" + (f" — failed: {failed[m]}" if m in failed else "") + "\n" for m in missing
        )
    (out_dir / f"{name}.md").write_text(md)
    if len(long):
        flat = long.copy()
        flat.columns = [f"{m}_{s}" for m, s in flat.columns]
        flat.reset_index().to_csv(out_dir / f"{name}.csv", index=False)
        (out_dir / f"{name}.tex").write_text(to_latex(disp, title, f"tab:{name}", note))
    return md


# --------------------------------------------------------------------------- LaTeX
_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "–": "--",
    "—": "---",
    "×": r"$\times$",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
}


def tex_escape(text: Any) -> str:
    """Plain text as LaTeX that pdflatex takes as is: its special characters escaped, the few non-ASCII
    characters the tables use as commands, any other non-ASCII character replaced by `?`."""
    out = "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))
    return out.encode("ascii", "replace").decode("ascii")


def to_latex(disp: pd.DataFrame, caption: str, label: str, note: str = "") -> str:
    """A `table` float with a booktabs `tabular` (\\toprule/\\midrule/\\bottomrule only: no \\cline or
    \\hline, no \\multirow, which booktabs' spacing does not mix with); a row key repeated from the row
    above is left blank. Needs only `\\usepackage{booktabs}`."""
    frame = disp.reset_index()
    n_keys = disp.index.nlevels
    header = " & ".join(tex_escape(c) for c in frame.columns)
    lines, previous = [], [None] * n_keys
    for values in frame.itertuples(index=False):
        cells = [tex_escape(v) for v in values]
        keys = [str(v) for v in values[:n_keys]]
        for i in range(n_keys):  # blank a key equal to the row above's, while the keys before it are too
            if keys[: i + 1] == previous[: i + 1]:
                cells[i] = ""
        previous = keys
        lines.append("    " + " & ".join(cells) + r" \\")
    safe_label = re.sub(r"[^A-Za-z0-9:_.-]", "-", label)
    caption_text = tex_escape(caption) + (" " + tex_escape(note) if note else "")
    return "\n".join(
        [
            r"\begin{table}[t]",
            r"  \centering",
            rf"  \caption{{{caption_text}}}",
            rf"  \label{{{safe_label}}}",
            rf"  \begin{{tabular}}{{{'l' * n_keys}{'r' * (frame.shape[1] - n_keys)}}}",
            r"    \toprule",
            f"    {header} \\\\",
            r"    \midrule",
            *lines,
            r"    \bottomrule",
            r"  \end{tabular}",
            r"\end{table}",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="securetl-table", description=__doc__.splitlines()[0])
    ap.add_argument("name", help="a preset in conf/table/ or DIR/table/ (e.g. demo)")
    ap.add_argument(
        "--config-dir",
        "-cd",
        action="append",
        default=[],
        help="a config dir searched before conf/ (as `securetl -cd DIR`); may be given more than once",
    )
    ap.add_argument(
        "--results-dir",
        default=None,
        help="default: paths.results_dir ($SECURETL_RESULTS_DIR, else $SECURETL_ROOT/results, else ./results)",
    )
    ap.add_argument("--out-dir", default=None, help="default: <results-dir>/tables")
    args = ap.parse_args(argv)
    dirs = [Path(d).expanduser().resolve() for d in args.config_dir]
    for d in dirs:
        if not d.is_dir():
            raise SystemExit(f"securetl-table: --config-dir {d}: no such folder")
    print(render(args.name, args.results_dir, conf_dir=[*dirs, CONF_DIR], out_dir=args.out_dir))


if __name__ == "__main__":
    sys.exit(main())
