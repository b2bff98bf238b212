"""Same config, same numbers (issue 16, items 1-2): a cached encoder is a function of its key, and a run's
numbers do not depend on what ran before it in the process, on the CPU thread count the process started
with, or on whether a sweep ran serially or in joblib workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY
from securetl import pipeline
from securetl.probe import clear_memo

BIN = Path(sys.executable).parent
CELL = ["data_attack=badnets", "probe=finetune_short"]


def _run(compose_cfg, root: Path, monkeypatch, overrides: list[str]) -> dict:
    monkeypatch.setenv("SECURETL_ROOT", str(root))
    clear_memo()
    return pipeline.run(compose_cfg([*CELL, *overrides]))


def _encoder_file(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (path,) = (root / ".cache" / "securetl" / "encoder").glob("*.safetensors")
    return load_file(str(path))


def test_an_encoder_does_not_depend_on_the_run_that_built_it(compose_cfg, tmp_path, monkeypatch):
    """`seed=1` alone, and `seed=1` after `seed=0` filled the cache: one encoder, one result."""
    alone = _run(compose_cfg, tmp_path / "a", monkeypatch, ["seed=1"])
    _run(compose_cfg, tmp_path / "b", monkeypatch, ["seed=0"])
    torch.manual_seed(12345)  # whatever the process did before must not matter either
    torch.rand(7)
    after = _run(compose_cfg, tmp_path / "b", monkeypatch, ["seed=1", "resume=false"])
    assert after["metrics"] == alone["metrics"]
    a, b = _encoder_file(tmp_path / "a"), _encoder_file(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_encoder_seed_changes_the_initial_weights(compose_cfg, tmp_path, monkeypatch):
    _run(compose_cfg, tmp_path / "s0", monkeypatch, ["encoder.epochs=0"])
    _run(compose_cfg, tmp_path / "s1", monkeypatch, ["encoder.epochs=0", "encoder.seed=1"])
    a, b = _encoder_file(tmp_path / "s0"), _encoder_file(tmp_path / "s1")
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


@pytest.mark.slow  # two processes / a two-job sweep: about a minute on 2 cores (make test-all)
def test_the_thread_count_is_the_configs_not_the_processes(compose_cfg, tmp_path, monkeypatch):
    """A joblib worker starts with one thread, a plain run with all cores: `threads` decides, and the row
    records it."""
    rows = []
    for ambient in (1, 2):
        torch.set_num_threads(ambient)
        rows.append(_run(compose_cfg, tmp_path / f"t{ambient}", monkeypatch, ["threads=2"]))
    torch.set_num_threads(1)
    assert rows[0]["metrics"] == rows[1]["metrics"]
    assert rows[0]["numerics"]["threads"] == 2


@pytest.mark.slow  # two processes / a two-job sweep: about a minute on 2 cores (make test-all)
def test_a_joblib_sweep_gives_the_rows_of_a_serial_sweep(tmp_path):
    """Two seeds, serially and with two joblib workers (each filling the encoder cache on its own)."""

    def sweep(root: Path, extra: list[str]) -> dict[str, dict]:
        env = dict(os.environ, SECURETL_ROOT=str(root), OMP_NUM_THREADS="1")
        args = ["-m", *CELL, "seed=0,1", *TINY, *extra]
        out = subprocess.run(
            [str(BIN / "securetl"), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
        )
        assert out.returncode == 0, out.stderr[-3000:]
        rows = [json.loads(p.read_text()) for p in (root / "results" / "raw").glob("*.json")]
        return {r["run_id"]: r["metrics"] for r in rows}

    serial = sweep(tmp_path / "serial", [])
    parallel = sweep(tmp_path / "joblib", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])
    assert len(serial) == 2 and serial == parallel


def test_the_table_tool_points_out_a_cell_with_mixed_numerics(tmp_path):
    from securetl.tables import render

    raw = tmp_path / "raw"
    raw.mkdir()
    base = {
        "choices": {
            "dataset": "synthetic",
            "encoder": "synthetic_simclr_resnet18",
            "encoder_attack": "none",
            "data_attack": "none",
            "defense": "none",
            "probe": "finetune_short",
            "threat": "None",
            "ablation": "None",
        },
        "metrics": {"acc": 0.5, "asr": 0.01, "asr/reference": 0.01},
        "overrides": [],
    }
    numerics = [
        {"device": "cpu", "precision": "fp32", "threads": 2},
        {"device": "cpu", "precision": "fp32", "threads": 1},
    ]
    for seed, n in enumerate(numerics):
        (raw / f"r{seed}.json").write_text(
            json.dumps(base | {"run_id": f"r{seed}", "seed": 0, "numerics": n})
        )
    md = render("demo", tmp_path)
    assert "different numerics" in md and "cpu fp32, 1 threads / cpu fp32, 2 threads" in md
    (raw / "r1.json").unlink()
    assert "different numerics" not in render("demo", tmp_path)


def _demo_row(run_id: str, seed: int, **extra) -> dict:
    return {
        "run_id": run_id,
        "seed": seed,
        "choices": {
            "dataset": "synthetic",
            "encoder": "synthetic_simclr_resnet18",
            "encoder_attack": "none",
            "data_attack": "none",
            "defense": "none",
            "probe": "finetune_short",
            "threat": "None",
            "ablation": "None",
        },
        "metrics": {"acc": 0.5, "asr": 0.01, "asr/reference": 0.01},
        "numerics": {"device": "cpu", "precision": "fp32", "threads": 1},
        "config": {"encoder": {"seed": 0, "width": 64}, "dataset": {"n_train": 4000}},
        "overrides": [],
    } | extra


def test_the_table_tool_points_out_rows_of_one_encoder_setting_built_from_other_weights(tmp_path):
    """Session 19's machine built the default encoder from the same config as another key (other weights):
    a table that mixes such rows says so, naming the keys."""
    from securetl.tables import render

    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [
        _demo_row("r0", 0, cache_keys={"encoder": "aaaa"}),
        _demo_row("r1", 0, cache_keys={"encoder": "aaaa"}),
        # an implant starts from the clean encoder: its base key must be the clean rows' key
        _demo_row("r2", 0, cache_keys={"encoder": "bbbb", "implanted": "cccc"}),
    ]
    rows[1]["choices"]["data_attack"] = "badnets"
    rows[2]["choices"]["encoder_attack"] = "badencoder"
    for r in rows:
        (raw / f"{r['run_id']}.json").write_text(json.dumps(r))
    md = render("demo", tmp_path)
    assert "started from different weights" in md and "`aaaa` (2 rows) / `bbbb` (1 rows)" in md
    # another encoder setting (here its seed) under another key is no conflict
    rows[2]["config"]["encoder"]["seed"] = 1
    (raw / "r2.json").write_text(json.dumps(rows[2]))
    assert "started from different weights" not in render("demo", tmp_path)


def test_a_row_records_its_cpu_and_a_cell_from_two_cpus_is_pointed_out(tmp_path):
    from securetl.results import machine
    from securetl.tables import render

    m = machine()
    assert m["cpu"] and m["isa"] == torch.backends.cpu.get_cpu_capability()
    raw = tmp_path / "raw"
    raw.mkdir()
    for seed, isa in enumerate(["AVX2", "AVX512"]):
        row = _demo_row(f"r{seed}", 0, machine={"cpu": "Some CPU", "isa": isa})
        (raw / f"r{seed}.json").write_text(json.dumps(row))
    md = render("demo", tmp_path)
    assert "different numerics" in md and "Some CPU (AVX2) / cpu fp32, 1 threads, Some CPU (AVX512)" in md
