"""Calibrate DECREE's threshold on CLEAN encoders only (defenses/decree.py, conf/defense/decree.yaml).

    python scripts/decree_calibrate.py [--encoders E ...] [--seeds S ...] [--rule logmad|mad|min] [--k 2] [--write]
                                       [--report] [Hydra overrides, e.g. device=cuda dataset=synthetic]

Runs DECREE through the pipeline with `defense.action=continue` (the statistic, no verdict) on clean encoders the suite
pre-trains (`encoder_attack=none`): one per SSL method (--encoders; default the synthetic SimCLR and MoCo v2
ResNet-18s, the methods decree_synthetic reports: BYOL's encoders do not learn on the CPU budget) and pre-training
seed (--seeds; default 100-104, seeds no table uses, so that the clean encoders the decree_synthetic table reports,
seeds 0-2, are out of sample). No attacked encoder is ever read. The threshold is

  logmad  exp(median - k x 1.4826 MAD) of log PL1 over the clean encoders (default; k = 2, the MAD rule of the suite's
          other detectors, on the log scale a ratio such as PL1 calls for: the threshold stays positive)
  mad     median - k x 1.4826 MAD of PL1 itself
  min     the smallest clean PL1 (an encoder is flagged when its PL1 lies below every clean calibration encoder's)

Writes <results dir>/decree/calibration_<dataset>.json (every clean statistic, the rule, the threshold) and prints
the threshold; `--write` also sets it in conf/deltas/<dataset>.yaml (`defense: decree: {threshold: ...}`), so that every
DECREE row on that dataset runs with it and carries it in its config and run_id. `--report` then reads the rows of the
decree_synthetic sweep and prints, per encoder attack, the AUROC of PL1 against the clean encoders of the same SSL
method (lower PL1 = backdoored; 1 = perfect separation) and the detection rate at the threshold: an analysis of the
table's rows, after the fact.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the defenses/ package lives at the repository root

ENCODERS = ["synthetic_simclr_resnet18", "synthetic_mocov2_resnet18"]
SEEDS = [100, 101, 102, 103, 104]
MAD_SCALE = 1.4826
RULES = ("logmad", "mad", "min")
PL1_FLOOR = 1e-6  # a fully collapsed encoder's PL1 is ~0; its log is taken at this floor
log = logging.getLogger("decree_calibrate")


def run_overrides(encoders: list[str], seeds: list[int], extra: list[str]) -> list[list[str]]:
    """One run per clean calibration encoder: DECREE's statistic, no verdict (threshold null, action continue)."""
    fixed = ["encoder_attack=none", "data_attack=none", "defense=decree", "defense.action=continue"]
    fixed += ["defense.threshold=null", "probe=linear", "seed=0"]
    return [[f"encoder={e}", f"encoder.seed={s}", *fixed, *extra] for e in encoders for s in seeds]


def compose(overrides: list[str], conf_dir: Path = ROOT / "conf"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import securetl.run  # noqa: F401  registers the config resolvers

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return hydra_compose("run", overrides=overrides, return_hydra_config=True)


def run_all(runs: list[list[str]]) -> list[dict]:
    """The pipeline's row of every run (a finished one is read back: `resume=true`)."""
    from securetl.pipeline import run

    return [run(compose(o)) for o in runs]


def threshold_from(values: list[float], rule: str = "logmad", k: float = 2.0) -> dict:
    """The threshold on the clean PL1 values and what it was made of (median and MAD of the values the rule reads)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        raise SystemExit("decree_calibrate: no clean statistics to calibrate on")
    if rule not in RULES:
        raise SystemExit(f"decree_calibrate: --rule {rule!r}; choose {', '.join(RULES)}")
    # PL1 is a ratio spanning orders of magnitude (a patch trigger ~0.01, a clean encoder ~0.3): logmad reads it on a
    # log scale, where the threshold stays positive however widely the clean encoders spread
    v = np.log(np.maximum(x, PL1_FLOOR)) if rule == "logmad" else x
    med = float(np.median(v))
    mad = float(np.median(np.abs(v - med)) * MAD_SCALE)
    t = {"logmad": float(np.exp(med - k * mad)), "mad": med - k * mad, "min": float(x.min())}[rule]
    if t <= 0:
        log.warning("the threshold is %.4g <= 0: no encoder can be flagged (the clean PL1 spread widely)", t)
    return {
        "threshold": t,
        "rule": rule,
        "k": k,
        "median": med,
        "mad": mad,
        "min": float(x.min()),
        "n": len(x),
    }


def write_delta(path: Path, threshold: float, note: str) -> None:
    """Set `defense: decree: {threshold: ...}` in a delta file, keeping every other line (and its comments)."""
    text = path.read_text() if path.exists() else ""
    line = f"  decree: {{threshold: {threshold:.6g}}}   # {note}"
    if re.search(r"^  decree:.*$", text, flags=re.M):
        text = re.sub(r"^  decree:.*$", lambda _: line, text, count=1, flags=re.M)
    elif re.search(r"^defense:[ \t]*$", text, flags=re.M):
        text = re.sub(r"^defense:[ \t]*$", lambda m: m.group(0) + "\n" + line, text, count=1, flags=re.M)
    else:
        text = text + ("" if text.endswith("\n") or not text else "\n") + "defense:\n" + line + "\n"
    path.write_text(text)


def auroc(clean: list[float], attacked: list[float]) -> float:
    """P(an attacked encoder's PL1 < a clean one's), ties counting one half."""
    c, a = np.asarray(clean, dtype=np.float64), np.asarray(attacked, dtype=np.float64)
    if not len(c) or not len(a):
        return float("nan")
    return float(
        ((a[:, None] < c[None, :]).sum() + 0.5 * (a[:, None] == c[None, :]).sum()) / (len(a) * len(c))
    )


def report(rows: list[dict], threshold: float | None, exclude_seeds: set[int]) -> str:
    """Per (SSL method, encoder attack), over the decree_synthetic rows (action continue, no data attack; one row per
    encoder): encoders, mean PL1, detection rate at `threshold`, AUROC of PL1 against that method's clean encoders."""
    stats: dict[tuple[str, str], dict[tuple, float]] = defaultdict(dict)
    for r in rows:
        ch, cfg = r.get("choices", {}), r.get("config", {})
        pl1 = r.get("diagnostics", {}).get("decree/pl1")
        action = cfg.get("defense", {}).get("action")
        if (
            ch.get("defense") != "decree"
            or ch.get("data_attack") != "none"
            or action != "continue"
            or pl1 is None
        ):
            continue
        enc_seed = int(cfg.get("encoder", {}).get("seed", -1))
        if enc_seed in exclude_seeds:
            continue  # a calibration encoder
        stats[(ch.get("encoder", "?"), ch.get("encoder_attack", "?"))][(enc_seed, r.get("seed"))] = float(pl1)
    lines = [
        "| encoder | encoder_attack | n | PL1 mean | detected | AUROC vs clean |",
        "|---|---|---|---|---|---|",
    ]
    for (enc, attack), by_run in sorted(stats.items()):
        vals = list(by_run.values())
        rate = "–" if threshold is None else f"{np.mean(np.asarray(vals) < threshold):.2f}"
        clean = list(stats.get((enc, "none"), {}).values())
        roc = "–" if attack == "none" else f"{auroc(clean, vals):.2f}"
        lines.append(f"| {enc} | {attack} | {len(vals)} | {np.mean(vals):.4f} | {rate} | {roc} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="decree_calibrate", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--encoders", nargs="+", default=ENCODERS, help="encoder configs (clean, one per SSL method)"
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=SEEDS, help="pre-training seeds no table uses")
    ap.add_argument("--rule", default="logmad", choices=RULES)
    ap.add_argument("--k", type=float, default=2.0, help="MAD multiples below the median (rules logmad, mad)")
    ap.add_argument("--write", action="store_true", help="set the threshold in conf/deltas/<dataset>.yaml")
    ap.add_argument(
        "--report", action="store_true", help="then summarise the decree_synthetic rows per attack"
    )
    ap.add_argument(
        "overrides", nargs="*", help="Hydra overrides for every run (device=cuda, dataset=..., ...)"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if any(
        o.split("=", 1)[0].lstrip("+") in ("encoder", "encoder_attack", "defense") for o in args.overrides
    ):
        raise SystemExit(
            "decree_calibrate: the encoders and the defense are the script's (--encoders, --seeds)"
        )

    rows = run_all(run_overrides(args.encoders, args.seeds, args.overrides))
    cfg = compose(run_overrides(args.encoders[:1], args.seeds[:1], args.overrides)[0])
    dataset = rows[0]["choices"].get("dataset", "synthetic")
    clean = [
        {
            "encoder": r["choices"]["encoder"],
            "encoder_seed": r["config"]["encoder"]["seed"],
            "pl1": r["diagnostics"]["decree/pl1"],
            "found": r["diagnostics"]["decree/found"],
            "run_id": r["run_id"],
        }
        for r in rows
    ]
    result = threshold_from([c["pl1"] for c in clean], args.rule, args.k) | {
        "dataset": dataset,
        "clean": clean,
    }
    out = Path(str(cfg.paths.results_dir)) / "decree" / f"calibration_{dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True))
    for c in clean:
        print(
            f"{c['encoder']} seed {c['encoder_seed']}: PL1 {c['pl1']:.4f}{'' if c['found'] else ' (no trigger found)'}"
        )
    t, scale = result["threshold"], "log PL1" if args.rule == "logmad" else "PL1"
    print(f"\nthreshold ({args.rule}, k {args.k:g}): {t:.6g}")
    print(f"  {scale}: median {result['median']:.4g}, MAD {result['mad']:.4g}; {result['n']} clean encoders")
    print(f"written: {out}\nuse: defense.threshold={t:.6g}")
    if args.write:
        delta = ROOT / "conf" / "deltas" / f"{dataset}.yaml"
        note = f"scripts/decree_calibrate.py --rule {args.rule} --k {args.k:g}: {result['n']} clean encoders"
        write_delta(delta, t, note)
        print(f"set in {delta.relative_to(ROOT)}")
    if args.report:
        from securetl.results import read_rows

        print("\n" + report(read_rows(Path(str(cfg.paths.results_dir)) / "raw"), t, set(args.seeds)))


if __name__ == "__main__":
    main()
