"""Reliability (issue 16): bad rows, corrupted or half-written cache artifacts, concurrent builders, file
modes, per-run peak memory, a failing cell inside a sweep, and bad input that must stop before any work."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import re
import stat
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from securetl import cache as cache_mod
from securetl.cache import Cache, atomic_write_json


# --------------------------------------------------------------------------- cache: corrupted artifacts
def _artifact(tmp_path: Path) -> tuple[Cache, Path]:
    c = Cache(tmp_path)
    c.save_state("encoder", "k", {"w": torch.arange(8.0)}, {"loss": [1.0, 0.5]})
    return c, c.path("encoder", "k")


def test_a_truncated_artifact_is_named_moved_aside_and_reported_missing(tmp_path, caplog):
    c, p = _artifact(tmp_path)
    p.write_bytes(p.read_bytes()[:-7])
    with caplog.at_level(logging.WARNING, logger="securetl.cache"):
        assert c.load_state("encoder", "k") is None
    assert str(p) in caplog.text
    assert not p.exists() and p.with_name(p.name + ".corrupt").exists()
    c.save_state("encoder", "k", {"w": torch.zeros(2)}, {})  # the caller rebuilds it
    assert torch.equal(c.load_state("encoder", "k")["w"], torch.zeros(2))


def test_an_artifact_with_unreadable_metadata_is_set_aside(tmp_path, caplog):
    c = Cache(tmp_path)
    p = c.path("encoder", "k")
    p.parent.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(p), metadata={cache_mod.META_KEY: "{not json"})
    with caplog.at_level(logging.WARNING, logger="securetl.cache"):
        assert c.load_state("encoder", "k") is None
    assert str(p) in caplog.text and p.with_name(p.name + ".corrupt").exists()
    assert c.load_meta("encoder", "k") is None


def test_old_style_sidecar_metadata_is_still_read_and_checked(tmp_path):
    c = Cache(tmp_path)
    p = c.path("encoder", "k")
    p.parent.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(p))
    p.with_suffix(".json").write_text(json.dumps({"diagnostics": {"gap": 0.3}}))
    assert c.load_state("encoder", "k") is not None
    assert c.load_meta("encoder", "k") == {"diagnostics": {"gap": 0.3}}
    p.with_suffix(".json").write_text("[1, 2")  # a half-written sidecar
    assert c.load_state("encoder", "k") is None
    assert not p.exists() and not p.with_suffix(".json").exists()


def test_pipeline_rebuilds_a_truncated_encoder_and_builds_under_the_lock(compose_cfg, monkeypatch):
    from securetl.pipeline import run

    built: list[tuple[str, str]] = []
    real = Cache.building

    def spy(self, kind, key):
        built.append((kind, key))
        return real(self, kind, key)

    monkeypatch.setattr(Cache, "building", spy)
    row = run(compose_cfg([]))
    key = row["cache_keys"]["encoder"]
    assert ("encoder", key) in built
    art = next(Path(os.environ["SECURETL_ROOT"]).glob(f".cache/securetl/encoder/{key}.safetensors"))
    art.write_bytes(art.read_bytes()[: art.stat().st_size // 2])
    again = run(compose_cfg(["resume=false"]))
    assert again["cache_keys"]["encoder"] == key
    assert art.with_name(art.name + ".corrupt").exists()
    assert Cache(art.parents[1]).load_state("encoder", key) is not None  # rebuilt, and readable


# --------------------------------------------------------------------------- cache: one atomic commit
class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler on the way may swallow it."""


@pytest.mark.parametrize("kill_at", [1, 2, 3])
def test_a_writer_killed_between_steps_never_leaves_weights_without_metadata(tmp_path, monkeypatch, kill_at):
    """Interrupt the writer at its k-th rename: whatever is visible afterwards is complete."""
    real_replace = os.replace
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise Killed
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    c = Cache(tmp_path)
    meta = {"diagnostics": {"gap": 0.25}}
    try:
        c.save_state("implanted", "k", {"w": torch.arange(3.0)}, meta)
    except Killed:
        pass
    monkeypatch.setattr(os, "replace", real_replace)
    if c.load_state("implanted", "k") is not None:
        assert c.load_meta("implanted", "k") == meta


def test_save_flushes_the_temp_file_before_the_rename(tmp_path, monkeypatch):
    order: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b))[1])
    Cache(tmp_path).save_state("encoder", "k", {"w": torch.ones(1)}, {})
    assert "fsync" in order and order.index("fsync") < order.index("replace")


def test_stale_temp_files_of_a_killed_writer_are_removed(tmp_path):
    c = Cache(tmp_path)
    d = tmp_path / "encoder"
    d.mkdir()
    stale, fresh = d / ".k.safetensors.abc123.tmp", d / ".j.safetensors.def456.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    old = time.time() - 2 * cache_mod.STALE_TMP_S
    os.utime(stale, (old, old))
    c.save_state("encoder", "k", {"w": torch.ones(1)}, {})
    assert not stale.exists() and fresh.exists()  # a live writer's file is left alone
    assert c.load_state("encoder", "k") is not None


# --------------------------------------------------------------------------- cache: concurrent builders
def _load_or_build(root: str, log_file: str, barrier) -> None:
    """What obtain does for one artifact, in another process."""
    c = Cache(root)
    barrier.wait()
    with c.building("encoder", "shared"):
        if c.load_state("encoder", "shared") is None:
            with open(log_file, "a") as f:
                f.write(f"{os.getpid()}\n")
            time.sleep(0.5)  # a build takes a while: the other job must wait, not build too
            c.save_state("encoder", "shared", {"w": torch.ones(4)}, {"by": os.getpid()})
    assert c.load_state("encoder", "shared") is not None


def test_two_processes_needing_one_artifact_build_it_once(tmp_path):
    ctx = mp.get_context("spawn")  # no fork of a process that may hold OpenMP threads
    barrier = ctx.Barrier(2)
    log_file = tmp_path / "builds.txt"
    procs = [
        ctx.Process(target=_load_or_build, args=(str(tmp_path), str(log_file), barrier)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(log_file.read_text().split()) == 1


# --------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        c = Cache(tmp_path)
        p = c.save_state("encoder", "k", {"w": torch.ones(1)}, {})
        atomic_write_json(tmp_path / "row.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "row.json").stat().st_mode) == mode


# --------------------------------------------------------------------------- rows that are not rows
NOT_ROWS = {
    "list": b"[]",
    "empty": b"{}",
    "no_metrics": json.dumps({"choices": {}, "seed": 0}).encode(),
    "metrics_not_a_dict": json.dumps({"choices": {}, "seed": 0, "metrics": [1]}).encode(),
    "binary": bytes(range(256)),
    "latin1": '{"metrics": {"acc": 0.5}, "note": "caf\xe9"}'.encode("latin-1"),
    "truncated": b'{"run_id": "x", "metrics": {"acc": 0.',
}


@pytest.mark.parametrize("what", sorted(NOT_ROWS))
def test_resume_moves_a_file_that_is_not_a_row_aside(tmp_path, caplog, what):
    from securetl.results import load_row

    p = tmp_path / "abc.json"
    p.write_bytes(NOT_ROWS[what])
    with caplog.at_level(logging.WARNING, logger="securetl.results"):
        assert load_row(tmp_path, "abc") is None
    assert str(p) in caplog.text
    assert not p.exists() and (tmp_path / "abc.json.bad").read_bytes() == NOT_ROWS[what]


def test_a_sweep_resumes_past_a_row_file_that_is_not_a_row(compose_cfg):
    from securetl.pipeline import run

    first = run(compose_cfg([]))
    p = Path(compose_cfg([]).paths.results_dir) / "raw" / f"{first['run_id']}.json"
    p.write_text("[]")
    row = run(compose_cfg([]))  # resume=true: reads the file, reports it, recomputes
    assert "skipped" not in row and row["metrics"] == first["metrics"]
    assert json.loads(p.read_text())["run_id"] == first["run_id"]
    assert p.with_name(p.name + ".bad").read_text() == "[]"


def test_the_table_tool_skips_files_that_are_not_rows_with_one_warning_each(tmp_path, caplog):
    from securetl.tables import render

    (tmp_path / "conf" / "table").mkdir(parents=True)
    (tmp_path / "conf" / "table" / "t.yaml").write_text(
        "hydra:\n  sweeper:\n    params:\n      data_attack: badnets\n      seed: 0\n"
        "report:\n  rows: [data_attack]\n  metrics: [acc]\n"
    )
    raw = tmp_path / "results" / "raw"
    raw.mkdir(parents=True)
    good = {"choices": {"data_attack": "badnets"}, "seed": 0, "metrics": {"acc": 0.75}}
    (raw / "good.json").write_text(json.dumps(good))
    for what, data in NOT_ROWS.items():
        (raw / f"{what}.json").write_bytes(data)
    with caplog.at_level(logging.WARNING):
        md = render("t", tmp_path / "results", conf_dir=tmp_path / "conf")
    assert re.search(r"\|\s*badnets\s*\|\s*75(\.00)?\s*\|", md)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == len(NOT_ROWS)
    for what in NOT_ROWS:
        assert sum(f"{what}.json" in w for w in warnings) == 1
    assert all((raw / f"{what}.json").exists() for what in NOT_ROWS)  # the table tool only reads


# --------------------------------------------------------------------------- peak memory per run
def test_peak_memory_is_this_runs_not_the_processs():
    import resource

    from securetl.results import PeakMemory

    def hold(mb: int) -> None:
        buf = torch.ones(mb * 2**20 // 4)  # touched: resident
        time.sleep(0.3)  # longer than the sampling interval
        del buf

    hold(300)  # an earlier cell of the sweep
    lifetime_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    quiet = PeakMemory(torch.device("cpu")).start().stop()
    assert quiet["cpu_rss_peak_mb"] < lifetime_mb - 200
    m = PeakMemory(torch.device("cpu")).start()
    hold(100)
    busy = m.stop()
    assert busy["cpu_rss_peak_mb"] >= busy["cpu_rss_start_mb"] + 80


# --------------------------------------------------------------------------- bad input: one line, no work
class WorkStarted(AssertionError):
    pass


@pytest.fixture
def no_work(monkeypatch):
    """Making the data or obtaining the encoder means validation has let the config through."""
    import securetl.data.synthetic as synthetic
    import securetl.pipeline as pipeline

    def refuse(*args, **kwargs):
        raise WorkStarted("data or model work started")

    monkeypatch.setattr(synthetic, "_build_splits", refuse)
    monkeypatch.setattr(pipeline, "obtain", refuse)


BAD_INPUT = [
    (["seed=abc"], "seed='abc' must be an integer"),
    (["seed=1.5"], "seed=1.5"),
    (["encoder.width=0"], "encoder.width=0"),
    (["encoder.arch=bogus"], "encoder.arch='bogus'"),
    (["encoder.ssl=bogus"], "encoder.ssl='bogus'"),
    (["encoder.augment.jitter=abc"], "encoder.augment.jitter='abc'"),
    (["encoder.checkpoint=/nonexistent/enc.safetensors"], "encoder.checkpoint="),
    (["dataset.n_train=0"], "dataset.n_train=0"),
    (["dataset.n_test=0"], "dataset.n_test=0"),
    (["dataset.num_classes=abc"], "dataset.num_classes='abc'"),
    (["probe.epochs=abc"], "probe.epochs='abc'"),
    (["probe.epochs=-1"], "probe.epochs=-1"),
    (["probe.batch_size=0"], "probe.batch_size=0"),
    (["+probe.bogus=1"], "probe.bogus is not a setting"),
    (["+foo=1"], "'foo'"),
    (["resume=maybe"], "resume='maybe'"),
    (["encoder_attack=badencoder", "encoder_attack.lr=fast"], "encoder_attack.lr='fast'"),
    (["encoder_attack=badencoder", "encoder_attack.n_reference=10"], "encoder_attack.n_reference=10"),
    (["encoder_attack=badencoder", "encoder_attack.batch_size=1000"], "encoder_attack.batch_size=1000"),
    (["encoder_attack=ctrl", "encoder_attack.poison_ratio=0.5"], "encoder_attack.poison_ratio=0.5"),
    (["encoder_attack=corruptencoder", "encoder_attack.n_reference=100"], "encoder_attack.n_reference=100"),
    (["data_attack=badnets", "data_attack.poison_rate=abc"], "data_attack.poison_rate='abc'"),
    (["data_attack=badnets", "data_attack.poison_rate=0.95"], "data_attack.poison_rate=0.95"),
    (["data_attack=badnets", "data_attack.target=99"], "data_attack.target=99"),
    (["data_attack=badnets", "data_attack.trigger.size=abc"], "data_attack.trigger.size='abc'"),
    (["data_attack=sig", "data_attack.poison_rate=0.5"], "data_attack.poison_rate=0.5"),
    (["data_attack=tact", "data_attack.poison_rate=0.9"], "data_attack.poison_rate=0.9"),
    (["data_attack=wanet", "data_attack.poison_rate=0.95", "data_attack.cross_ratio=0"], "poison_rate=0.95"),
    (["data_attack=adap_blend", "data_attack.poison_rate=0.92", "data_attack.cover_rate=0.05"], "rate=0.92"),
]


@pytest.mark.parametrize("overrides,needle", BAD_INPUT, ids=[" ".join(o) for o, _ in BAD_INPUT])
def test_bad_input_is_one_line_naming_the_key_before_any_work(compose_cfg, no_work, overrides, needle):
    from securetl.pipeline import run
    from securetl.validate import ConfigError

    with pytest.raises(ConfigError) as e:
        run(compose_cfg(overrides))
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides", [["data_attack=badnets", "data_attack.poison_rate=0.9"], []])
def test_a_feasible_config_passes_validation(compose_cfg, no_work, overrides):
    """0.9 of 300 is 270 poisons: exactly the non-target images there are."""
    from securetl.pipeline import run

    with pytest.raises(WorkStarted):
        run(compose_cfg(overrides))


def test_feasibility_is_checked_on_the_built_splits_before_training(compose_cfg, monkeypatch):
    """A dataset whose class counts only its data tell (every real dataset): checked once it is built,
    before the encoder is pre-trained."""
    import securetl.pipeline as pipeline
    import securetl.validate as validate
    from securetl.validate import ConfigError

    monkeypatch.setattr(validate, "PLANNED_SIZES", {})
    monkeypatch.setattr(pipeline, "obtain", lambda *a, **k: pytest.fail("the encoder was obtained"))
    with pytest.raises(ConfigError, match="encoder_attack.n_reference=10"):
        pipeline.run(compose_cfg(["encoder_attack=badencoder", "encoder_attack.n_reference=10"]))


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_a_results_dir_that_cannot_take_rows_is_refused_before_any_work(compose_cfg, no_work, tmp_path, kind):
    from securetl.pipeline import run
    from securetl.validate import ConfigError

    if kind == "file":
        target = tmp_path / "results_file"
        target.write_text("not a folder")
    else:
        if os.geteuid() == 0:
            target = Path("/proc/securetl_results")  # not even root can make a folder there
        else:
            ro = tmp_path / "ro"
            ro.mkdir(mode=0o555)
            target = ro / "results"
    with pytest.raises(ConfigError, match="paths.results_dir"):
        run(compose_cfg([f"paths.results_dir={target}"]))
