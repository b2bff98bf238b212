"""End-to-end behaviour through pipeline.run (called directly, as the CLI does)."""

from __future__ import annotations

import pytest

from securetl.pipeline import run


def test_same_seed_twice_gives_identical_metrics(compose_cfg):
    a = run(compose_cfg(["data_attack=badnets", "resume=false"]))
    b = run(compose_cfg(["data_attack=badnets", "resume=false"]))
    assert a["metrics"] == b["metrics"]
    assert a["run_id"] == b["run_id"]


def test_row_records_what_a_reader_needs(compose_cfg):
    row = run(compose_cfg(["data_attack=badnets"]))
    for key in (
        "run_id",
        "choices",
        "seed",
        "metrics",
        "diagnostics",
        "timings",
        "memory",
        "device",
        "git_sha",
        "config",
    ):
        assert key in row
    assert row["choices"]["data_attack"] == "badnets"
    assert 0.0 <= row["metrics"]["acc"] <= 1.0 and 0.0 <= row["metrics"]["asr"] <= 1.0
    assert row["diagnostics"]["n_poison"] == round(0.1 * 300)
    assert "knn_asr" not in row["metrics"]  # a clean encoder's kNN says nothing about a data attack


def test_threat1_run_scores_the_received_encoder_by_knn_too(compose_cfg):
    row = run(compose_cfg(["encoder_attack=badencoder", "encoder_attack.epochs=1"]))
    m = row["metrics"]
    assert 0.0 <= m["knn_acc"] <= 1.0 and m["knn_asr"] == m["knn_asr/encoder"]


def test_clean_run_reports_reference_asr(compose_cfg):
    row = run(compose_cfg([]))
    assert row["metrics"]["asr_source"] == "reference"
    assert "knn_asr/reference" in row["metrics"]  # the kNN floor of a clean encoder, too


def test_threat3_shared_trigger_reports_one_asr(compose_cfg):
    row = run(
        compose_cfg(
            [
                "encoder_attack=badencoder",
                "encoder_attack.epochs=1",
                "data_attack=badnets",
                "data_attack.trigger=${encoder_attack.trigger}",
            ]
        )
    )
    m = row["metrics"]
    assert m["asr_source"] == "shared"
    assert [k for k in m if k.startswith("asr/")] == ["asr/shared"]


def test_different_triggers_report_one_asr_each(compose_cfg):
    row = run(compose_cfg(["encoder_attack=badencoder", "encoder_attack.epochs=1", "data_attack=badnets"]))
    assert {"asr/data", "asr/encoder"} <= set(row["metrics"])


@pytest.mark.parametrize("probe", ["linear", "mlp", "finetune"])
def test_every_probe_trains(compose_cfg, probe):
    row = run(compose_cfg([f"probe={probe}", "probe.epochs=1"]))
    assert row["metrics"]["acc"] > 0.0
