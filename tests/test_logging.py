"""What a run says while it works and what it leaves behind (issue 23, defects 4 and 7): one summary line
with every ASR and the kNN scores, a log line per pipeline phase and per phase of a multi-phase defense,
no progress-bar carriage returns in a log that is not a terminal, and the wandb mirror."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import ROOT, TINY

BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- defect 7
def test_the_summary_line_names_every_asr_and_the_knn_scores():
    from securetl.progress import summary

    metrics = {
        "acc": 0.886,
        "asr/data": 0.9161,
        "asr/encoder": 0.9906,
        "asr": 0.9161,
        "asr_definition": "non-target test samples",
        "asr_source": "data",
        "knn_acc": 0.8,
        "knn_asr/encoder": 0.97,
        "knn_asr": 0.97,
    }
    line = summary("abc", metrics)
    assert line == (
        "run abc: ACC 88.60%  ASR data 91.61%  ASR encoder 99.06%  kNN ACC 80.00%  kNN ASR encoder 97.00%"
    )


def test_a_defense_logs_each_index_set_it_decides():
    from securetl.progress import DecisionLog

    out = io.StringIO()
    logger = logging.getLogger("test.decisions")
    logger.addHandler(logging.StreamHandler(out))
    logger.setLevel(logging.INFO)
    d = DecisionLog("tcore", logger=logger)
    d["seed_idx"] = [1, 2, 3]
    d["threshold"] = 0.5  # not an index set: no line
    d.update({"kept_idx": list(range(10))})
    assert dict(d) == {"seed_idx": [1, 2, 3], "threshold": 0.5, "kept_idx": list(range(10))}
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("defense tcore: seed 3 samples (") and "kept 10 samples" in lines[1]


def test_tcore_logs_a_line_per_phase_and_the_run_per_pipeline_phase(compose_cfg, caplog):
    from securetl.pipeline import run

    fast = ["defense.fit_epochs=1", "defense.recover_epochs=1", "defense.epochs_per_step=1"]
    fast += ["defense.final_epochs=1", "defense.confusion_epochs=2", "defense.ref_epochs=2"]
    with caplog.at_level(logging.INFO, logger="securetl"):
        row = run(compose_cfg(["defense=tcore", "data_attack=badnets", *fast]))
    text = caplog.text
    for phase in ("data", "encoder", "poison", "defense", "evaluate"):
        assert f"{phase} ..." in text and f"{phase}: " in text, phase
    for decided in ("seed", "subset", "kept"):
        assert f"defense tcore: {decided} " in text, decided
    assert "pool_step1_loss" in text
    assert f"run {row['run_id']}: ACC " in text and "ASR data " in text


def test_bars_only_on_a_terminal():
    from securetl.progress import bar_disabled, bars_enabled

    assert not bars_enabled(True, io.StringIO())
    assert not bars_enabled(False, sys.stderr)
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w") as tty:
            assert bars_enabled(True, tty)
    finally:
        os.close(master)
    assert bar_disabled(True) == (not sys.stderr.isatty())


def test_a_redirected_run_writes_no_carriage_returns(tmp_path):
    """`securetl ... 2> log` (a SLURM or joblib log): progress=true draws no bars into the file."""
    env = dict(os.environ, SECURETL_ROOT=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("SECURETL_CACHE_DIR", None)
    env.pop("SECURETL_RESULTS_DIR", None)
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        out = subprocess.run(
            [str(BIN / "securetl"), *TINY, "progress=true", "encoder.epochs=2", "probe.epochs=3"],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            timeout=300,
        )
    text = log.read_text()
    assert out.returncode == 0, text[-3000:]
    assert "\r" not in text
    assert "kNN ACC" in text and "ASR reference" in text  # the summary line of a clean run


# --------------------------------------------------------------------------- defect 4: wandb
class FakeRun:
    def __init__(self, **kwargs):
        self.init = kwargs
        self.logged: list[dict] = []
        self.summary: dict = {}
        self.finished = False

    def log(self, data):
        self.logged.append(dict(data))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    import wandb

    runs: list[FakeRun] = []

    def init(**kwargs):
        runs.append(FakeRun(**kwargs))
        return runs[-1]

    monkeypatch.setattr(wandb, "init", init)
    return runs


def test_wandb_mirrors_the_whole_row_and_skipped_rows(compose_cfg, fake_wandb):
    from securetl.pipeline import run

    cfg = compose_cfg(
        [
            "logger=wandb",
            "+logger.group=A",
            "logger.tags=[x]",
            "tags=[y]",
            "note=hello",
            "logger.mode=disabled",
        ]
        + ["data_attack=badnets", "defense=ac"]
    )
    row = run(cfg)
    (r,) = fake_wandb
    assert r.init["group"] == "A" and r.init["tags"] == ["x", "y"] and r.init["notes"] == "hello"
    assert r.init["mode"] == "disabled" and r.init["id"] == row["run_id"]
    assert not isinstance(r.init["reinit"], bool)  # the boolean is deprecated
    logged = {k: v for d in r.logged for k, v in d.items()}
    for key in ("acc", "asr", "asr/data", "time/total", "time/defense", "diag/n_poison", "diag/detector/tpr"):
        assert key in logged, key
    assert logged["diag/detector/tpr"] == row["diagnostics"]["detector/tpr"]
    assert any(k.startswith("memory/") for k in logged)
    assert r.summary["skipped"] is False and r.summary["asr_source"] == "data" and r.finished

    again = run(cfg)  # resume: the row is not recomputed, but still mirrored, marked skipped
    assert again.get("skipped") and len(fake_wandb) == 2
    r2 = fake_wandb[1]
    assert r2.init["id"] == row["run_id"] and r2.finished
    assert r2.summary["skipped"] is True and r2.summary["acc"] == row["metrics"]["acc"]


def test_wandb_groups_a_sweeps_runs_by_default():
    from securetl.logger import default_group

    assert default_group(sweep_dir="/o/multirun/2025-01-01_10-00-00_abc123", table="demo") == (
        "demo/2025-01-01_10-00-00_abc123"
    )
    assert default_group(sweep_dir="/o/multirun/x", table=None) == "x"
    assert default_group(sweep_dir=None, table=None) is None


def test_wandb_init_raises_no_deprecation_warning(tmp_path):
    """The real wandb (disabled mode, nothing written): no `reinit` boolean deprecation warning."""
    from securetl.logger import WandbLogger

    lg = WandbLogger(mode="disabled", dir=str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lg.start({"seed": 0}, "rid", {"defense": "none"})
        lg.log_row({"metrics": {"acc": 0.5}, "timings": {"total": 1.0}, "seed": 0})
        lg.finish()
    assert not [w for w in caught if "reinit" in str(w.message)], [str(w.message) for w in caught]
