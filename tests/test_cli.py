"""The real command line: a 2-job multirun writes 2 rows, the table tool renders them, a rerun skips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY

BIN = Path(sys.executable).parent


def cli(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "securetl"), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout
    )


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e["SECURETL_ROOT"] = str(tmp_path)
    e["OMP_NUM_THREADS"] = "1"
    return e


def test_multirun_writes_rows_renders_table_and_resumes(env, tmp_path):
    args = ["-m", "data_attack=none,badnets", "probe=finetune_short", *TINY]  # the demo preset's probe
    first = cli(args, env)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = list((tmp_path / "results" / "raw").glob("*.json"))
    assert len(rows) == 2
    choices = sorted(json.loads(p.read_text())["choices"]["data_attack"] for p in rows)
    assert choices == ["badnets", "none"]

    table = subprocess.run(
        [str(BIN / "securetl-table"), "demo", "--results-dir", str(tmp_path / "results")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert table.returncode == 0, table.stderr
    assert "ACC" in table.stdout and "ASR" in table.stdout and "badnets" in table.stdout
    for ext in ("md", "csv", "tex"):
        assert (tmp_path / "results" / "tables" / f"demo.{ext}").exists()
    assert "encoder_attack=badencoder" in table.stdout  # cells the preset wants but the sweep did not run

    mtimes = {p: p.stat().st_mtime_ns for p in rows}
    second = cli(args, env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("already finished") + second.stdout.count("already finished") == 2
    assert {p: p.stat().st_mtime_ns for p in rows} == mtimes


@pytest.mark.parametrize(
    "override,needle",
    [
        (["data_attack=nope"], "badnets"),  # Hydra lists the available options
        (["data_attack=badnets", "data_attack.poison_rate=1.5"], "poison_rate=1.5"),
        (["data_attack=badnets", "data_attack.target=42"], "target=42"),
        (["device=tpu9"], "device='tpu9'"),
    ],
)
def test_bad_input_fails_fast_with_a_clear_message(env, override, needle):
    out = cli([*override, *TINY], env, timeout=120)
    assert out.returncode != 0
    assert needle in out.stderr
    assert "Traceback" not in out.stderr


def test_help_lists_groups(env):
    out = cli(["--help"], env, timeout=60)
    assert out.returncode == 0
    for group in ("dataset", "encoder_attack", "data_attack", "defense", "probe", "logger", "table"):
        assert f"{group}:" in out.stdout


def test_a_table_does_not_count_rows_another_presets_sweep_ran():
    """A Threat-2 table (no `threat` in its sweep) must not average in the no-defense rows that a T-Core
    sweep ran through `threat=t2_badnets`, nor an ablation table's rows."""
    from securetl.tables import build_table, flatten

    def row(threat, ablation, acc):
        ch = {"dataset": "synthetic", "data_attack": "badnets", "defense": "none", "probe": "finetune"}
        return {"choices": ch | {"threat": threat, "ablation": ablation}, "seed": 0, "metrics": {"acc": acc}}

    df = flatten([row("None", "None", 0.8), row("t2_badnets", "None", 0.2), row("None", "full", 0.5)])
    report = {"rows": ["data_attack"], "cols": [], "metrics": ["acc"], "where": {"dataset": "synthetic"}}
    _, _, long = build_table(df, report, {"data_attack": ["badnets"], "seed": ["0"]})
    assert long[("acc", "count")].tolist() == [1] and long[("acc", "mean")].tolist() == [0.8]
    _, _, long = build_table(
        df, report, {"data_attack": ["badnets"], "threat": ["t2_badnets"], "seed": ["0"]}
    )
    assert long[("acc", "mean")].tolist() == [0.2]


def test_a_table_prefers_its_own_rows_to_rows_run_with_settings_it_does_not_describe():
    """Another table's encoder-seed rows (`encoder.seed=1`) share the choices of Threat-1's clean-encoder
    row, yet computed something else: per cell and seed, rows with the fewest overrides the table neither
    sweeps, fixes nor groups by win. A sweep that only ran with such settings still fills the table."""
    from securetl.tables import build_table, extra_overrides, flatten

    keys = {"encoder_attack", "data_attack", "defense", "probe", "seed", "dataset"}
    plain = ["table=threat1_synthetic", "encoder_attack=none", "progress=false"]
    assert extra_overrides({"overrides": plain}, keys) == []
    assert extra_overrides({"overrides": [*plain, "encoder.seed=1"]}, keys) == ["encoder.seed=1"]
    assert extra_overrides({"overrides": ["encoder.seed=1"]}, keys | {"encoder.seed"}) == []

    def row(acc, seed, extra=()):
        ch = {"dataset": "synthetic", "encoder_attack": "none", "probe": "linear"}
        return {"choices": ch, "seed": seed, "metrics": {"acc": acc}, "overrides": [*plain, *extra]}

    report = {"rows": ["encoder_attack"], "cols": [], "metrics": ["acc"]}
    sweep = {"encoder_attack": ["none"], "seed": ["0", "1"]}
    mixed = [row(0.8, 0), row(0.6, 0, ["encoder.seed=1"]), row(0.7, 1, ["encoder.seed=1"])]
    _, missing, long = build_table(flatten(mixed, described=keys), report, sweep)
    # seed 0: the plain row alone; seed 1 has only the other setting, and the table says so
    assert long[("acc", "mean")].round(3).tolist() == [0.75] and missing == []
    assert long.attrs["extra"] == ["encoder.seed=1"]
    only = {"encoder_attack": ["none"], "seed": ["0"]}
    _, _, only_plain = build_table(flatten(mixed[:1], described=keys), report, only)
    assert only_plain.attrs["extra"] == []


def test_an_override_that_restates_a_default_is_the_default_cell():
    """A sweep over encoder seeds writes its seed-0 cell with `encoder.seed=0`, which is the default run (same
    run_id): it must count as the plain row, so that another encoder seed or another encoder (one setting
    each) does not join it in a table that sets neither."""
    from securetl.tables import build_table, extra_overrides, flatten, run_defaults

    defaults = run_defaults()
    keys = {"encoder_attack", "data_attack", "defense", "probe", "seed", "dataset"}
    restated = ["encoder.seed=0", "encoder=synthetic_simclr_resnet18", "threads=2", "defense=none"]
    assert extra_overrides({"overrides": restated}, keys, defaults) == []
    changed = ["encoder.seed=1", "encoder=synthetic_mocov2_resnet18", "threads=1", "+foo=0"]
    assert extra_overrides({"overrides": changed}, keys, defaults) == sorted(changed)
    assert extra_overrides({"overrides": ["encoder.seed=0"]}, keys) == ["encoder.seed=0"]  # no defaults given

    def row(acc, extra):
        ch = {"dataset": "synthetic", "encoder_attack": "none", "probe": "linear"}
        return {"choices": ch, "seed": 0, "metrics": {"acc": acc}, "overrides": ["probe=linear", *extra]}

    rows = [
        row(0.8, ["encoder.seed=0"]),
        row(0.6, ["encoder.seed=1"]),
        row(0.5, ["encoder=synthetic_mocov2_resnet18"]),
    ]
    report = {"rows": ["encoder_attack"], "cols": [], "metrics": ["acc"]}
    _, _, long = build_table(flatten(rows, described=keys, defaults=defaults), report, {"seed": ["0"]})
    assert long[("acc", "count")].tolist() == [1] and long[("acc", "mean")].tolist() == [0.8]


def test_a_table_groups_by_a_swept_config_value():
    """A budget sweep (`data_attack.poison_rate=0.003,0.03`) becomes one row per swept value, read from each
    row's resolved config; the sweep's values select the rows, so a rate nobody swept stays out."""
    from securetl.tables import build_table, flatten

    def row(rate, seed, asr):
        ch = {"dataset": "synthetic", "data_attack": "tact", "defense": "none", "probe": "finetune"}
        cfg = {"data_attack": {"poison_rate": rate, "trigger": {"size": 4}}}
        return {"choices": ch, "seed": seed, "config": cfg, "metrics": {"asr": asr}}

    rows = [row(0.003, 0, 0.5), row(0.003, 1, 0.7), row(0.03, 0, 0.9), row(0.1, 0, 1.0)]
    df = flatten(rows, ["data_attack.poison_rate"])
    report = {"rows": ["data_attack", "data_attack.poison_rate"], "cols": [], "metrics": ["asr"]}
    sweep = {"data_attack": ["tact"], "data_attack.poison_rate": ["0.003", "0.03"], "seed": ["0", "1"]}
    _, missing, long = build_table(df, report, sweep)
    assert long[("asr", "mean")].round(3).tolist() == [0.6, 0.9]
    assert long.index.get_level_values(1).tolist() == ["0.003", "0.03"]
    assert missing == ["data_attack=tact, data_attack.poison_rate=0.03, seed=1"]


def test_a_table_sweeping_a_group_override_renders_its_rows(tmp_path):
    """`trigger@eval.reference_trigger` in a preset's sweep is a group override, not a config path: it must
    not be read from the rows' configs (it is in none, so every row used to drop out)."""
    import json
    import re

    from securetl.tables import render

    (tmp_path / "conf" / "table").mkdir(parents=True)
    (tmp_path / "conf" / "table" / "floor.yaml").write_text(
        "hydra:\n  sweeper:\n    params:\n      trigger@eval.reference_trigger: htba_random\n"
        "      eval.reference_trigger.size: 6,7\n      seed: 0\n"
        "report:\n  rows: [eval.reference_trigger.size]\n  metrics: [asr]\n"
    )
    raw = tmp_path / "results" / "raw"
    raw.mkdir(parents=True)
    for size, asr in ((6, 0.03), (7, 0.04)):
        row = {
            "choices": {"dataset": "synthetic"},
            "seed": 0,
            "metrics": {"asr": asr},
            "config": {"eval": {"reference_trigger": {"size": size}}},
            "overrides": [
                "trigger@eval.reference_trigger=htba_random",
                f"eval.reference_trigger.size={size}",
            ],
        }
        (raw / f"r{size}.json").write_text(json.dumps(row))
    md = render("floor", tmp_path / "results", conf_dir=tmp_path / "conf")
    assert re.search(r"\|\s*6\s*\|\s*3\.00\s*\|", md) and re.search(r"\|\s*7\s*\|\s*4\.00\s*\|", md)
    assert "Missing" not in md


def _sweep_with_a_rejected_cell(env, tmp_path, launcher: list[str]) -> None:
    """The rejected cell comes first: the cell after it must still run."""
    out = cli(["-m", *launcher, *TINY, "data_attack=badnets", "data_attack.poison_rate=1.5,0.1"], env)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    rows = [json.loads(p.read_text()) for p in (tmp_path / "results" / "raw").glob("*.json")]
    assert [r["config"]["data_attack"]["poison_rate"] for r in rows] == [0.1]
    failed = [json.loads(p.read_text()) for p in (tmp_path / "results" / "failed").glob("*.json")]
    assert len(failed) == 1 and "data_attack.poison_rate=1.5" in failed[0]["overrides"]
    assert "poison_rate=1.5" in failed[0]["error"]
    summary = out.stderr[out.stderr.index("cell(s) of this sweep failed") :]
    assert "data_attack.poison_rate=1.5" in summary and "data_attack.poison_rate=0.1" not in summary


def test_a_rejected_cell_does_not_end_the_sweep(env, tmp_path):
    _sweep_with_a_rejected_cell(env, tmp_path, [])


@pytest.mark.slow
def test_a_rejected_cell_does_not_end_a_joblib_sweep(env, tmp_path):
    """Jobs in other processes: the failure reaches the sweep's report through its record."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    _sweep_with_a_rejected_cell(env, tmp_path, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])


def test_the_table_lists_why_a_missing_cell_failed(tmp_path):
    from securetl.tables import render

    (tmp_path / "conf" / "table").mkdir(parents=True)
    (tmp_path / "conf" / "table" / "rates.yaml").write_text(
        "hydra:\n  sweeper:\n    params:\n      data_attack.poison_rate: 0.1,1.5\n      seed: 0\n"
        "report:\n  rows: [data_attack.poison_rate]\n  metrics: [acc]\n  where: {dataset: synthetic}\n"
    )
    results = tmp_path / "results"
    (results / "raw").mkdir(parents=True)
    (results / "failed").mkdir()
    ch = {"dataset": "synthetic", "data_attack": "badnets"}
    row = {"choices": ch, "seed": 0, "metrics": {"acc": 0.8}, "config": {"data_attack": {"poison_rate": 0.1}}}
    (results / "raw" / "a.json").write_text(json.dumps(row))
    fail = {"choices": ch, "seed": 0, "config": {"data_attack": {"poison_rate": 1.5}}, "error": "too high"}
    (results / "failed" / "b.json").write_text(json.dumps(fail))
    other = dict(fail, choices={**ch, "dataset": "cifar10"}, error="not this table")
    (results / "failed" / "c.json").write_text(json.dumps(other))
    md = render("rates", results, conf_dir=tmp_path / "conf")
    assert "- data_attack.poison_rate=1.5, seed=0 — failed: too high" in md
    assert "not this table" not in md


@pytest.mark.parametrize(
    "override,needle",
    [
        (["seed=abc"], "seed='abc'"),
        (["data_attack=badnets", "data_attack.poison_rate=0.95"], "data_attack.poison_rate=0.95"),
        (["encoder_attack=badencoder", "encoder_attack.n_reference=10"], "encoder_attack.n_reference=10"),
        (["paths.results_dir=RESULTS_FILE"], "paths.results_dir="),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_any_work(env, tmp_path, override, needle):
    (tmp_path / "results_file").write_text("a file, not a folder")
    override = [o.replace("RESULTS_FILE", str(tmp_path / "results_file")) for o in override]
    out = cli([*TINY, *override], env, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("securetl: error:")]
    assert len(errors) == 1 and needle in errors[0]
    assert "Traceback" not in out.stderr
    assert "pre-training" not in out.stderr and not (tmp_path / ".cache").exists()  # no SSL, no artifact


def test_a_sweep_into_a_results_dir_that_is_a_file_stops_before_its_first_cell(env, tmp_path):
    (tmp_path / "f").write_text("a file")
    out = cli(["-m", *TINY, "data_attack=none,badnets", f"paths.results_dir={tmp_path / 'f'}"], env)
    assert out.returncode == 2 and "securetl: error: paths.results_dir=" in out.stderr
    assert "Launching" not in out.stdout + out.stderr and not (tmp_path / ".cache").exists()
