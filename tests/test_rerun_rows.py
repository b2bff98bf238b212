"""scripts/rerun_rows.py: a row flagged as built from another machine's encoder is re-run in place."""

from __future__ import annotations

import json

from conftest import TINY, load_script


def test_a_row_from_another_encoder_build_is_rerun_in_place(compose_cfg, tmp_path):
    from securetl import pipeline

    overrides = [*TINY, "data_attack=badnets", "seed=0"]
    row = pipeline.run(compose_cfg(overrides, tiny=False), overrides=overrides)
    path = tmp_path / "results" / "raw" / f"{row['run_id']}.json"
    real_key = row["cache_keys"]["encoder"]
    # what another machine would have left: the same run_id, another encoder key and other numbers
    stale = row | {"cache_keys": {"encoder": "0ther"}, "metrics": {**row["metrics"], "acc": -1.0}}
    stale["overrides"] = overrides + ["resume=true"]
    path.write_text(json.dumps(stale))

    script = load_script("rerun_rows")
    assert [r["run_id"] for r in script.select(tmp_path / "results" / "raw", "0th", None)] == [row["run_id"]]
    assert script.select(tmp_path / "results" / "raw", "0th", "threat2_synthetic") == []
    assert script.rerun_overrides(stale)[
        -1
    ] == "resume=false" and "resume=true" not in script.rerun_overrides(stale)

    script.main(["--encoder-key", "0th", "--results-dir", str(tmp_path / "results")])
    again = json.loads(path.read_text())
    assert again["cache_keys"]["encoder"] == real_key
    assert again["metrics"]["acc"] == row["metrics"]["acc"]  # same config, same machine: the same numbers
    assert script.select(tmp_path / "results" / "raw", "0th", None) == []
