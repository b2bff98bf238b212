"""`securetl-plot` (issue 23, the pictures): ACC vs ASR from a preset's rows, per-epoch curves of clean vs
poisoned samples, and 2-D feature embeddings before and after a defense, on rows and runs at tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from securetl import plots

PRESET = """\
hydra:
  sweeper:
    params:
      threat: t2_badnets,t2_blended
      defense: none,ac
      seed: range(2)
report:
  title: "Detectors on synthetic data"
  rows: [threat]
  cols: [defense]
  metrics: [acc, asr]
  where: {dataset: synthetic}
"""


def write_rows(raw: Path) -> None:
    raw.mkdir(parents=True)
    i = 0
    for threat, base in (("t2_badnets", 0.9), ("t2_blended", 0.8)):
        for defense, asr in (("none", 0.95), ("ac", 0.2)):
            for seed in (0, 1):
                ch = {"dataset": "synthetic", "threat": threat, "defense": defense, "ablation": "None"}
                m = {"acc": base - 0.01 * seed, "asr": asr + 0.02 * seed}
                (raw / f"r{i}.json").write_text(json.dumps({"choices": ch, "seed": seed, "metrics": m}))
                i += 1


def test_acc_vs_asr_has_a_point_per_defense_and_threat(tmp_path):
    (tmp_path / "conf" / "table").mkdir(parents=True)
    (tmp_path / "conf" / "table" / "det.yaml").write_text(PRESET)
    write_rows(tmp_path / "results" / "raw")
    long, keys, _ = plots.acc_asr_points("det", tmp_path / "results", [tmp_path / "conf"])
    assert keys == ["threat", "defense"] and len(long) == 4
    assert set(long[("acc", "count")]) == {2}
    none = long.xs("none", level="defense")
    assert none[("asr", "mean")].round(2).tolist() == [0.96, 0.96]
    out = tmp_path / "figures" / "det.png"
    plots.main(["acc-asr", "det", "-cd", str(tmp_path / "conf"), "--results-dir", str(tmp_path / "results"),
                "--out", str(out)])  # fmt: skip
    assert out.stat().st_size > 10_000


def test_pca_is_centred_and_two_dimensional():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(50, 8, generator=g) * torch.tensor([5.0, 1, 1, 1, 1, 1, 1, 0.1]) + 3
    z = plots.pca_2d(f)
    assert z.shape == (50, 2) and z.mean(0).abs().max() < 1e-4
    assert z[:, 0].var() > z[:, 1].var()


def test_replay_reproduces_the_rows_model_and_draws_curves_and_embeddings(compose_cfg, tmp_path):
    """The replayed cell scores the row's ACC (replay mirrors pipeline.run); the curves cover every epoch of
    the training on the poisoned set, and both figures are written."""
    from securetl.metrics import accuracy
    from securetl.pipeline import run
    from securetl.probe import predict

    cfg = compose_cfg(["data_attack=badnets", "probe.epochs=3"])
    row = run(cfg)
    rep = plots.replay(compose_cfg(["data_attack=badnets", "probe.epochs=3"]))
    assert rep.run_id == row["run_id"]
    acc = accuracy(predict(rep.model, rep.splits.test.x, rep.ctx), rep.splits.test.y)
    assert acc == pytest.approx(row["metrics"]["acc"], abs=1e-9)

    record = plots.record_curves(compose_cfg(["data_attack=badnets", "probe.epochs=3"]))
    assert [e["epoch"] for e in record["epochs"]] == [0, 1, 2, 3]
    assert record["n_poison"] == row["diagnostics"]["n_poison"] > 0
    for e in record["epochs"]:
        assert {"loss_clean", "loss_poison", "acc_clean", "acc_poison"} <= set(e)
    assert record["epochs"][-1]["loss_clean"] < record["epochs"][0]["loss_clean"]
    side = Path(cfg.paths.results_dir) / "curves" / f"{row['run_id']}.json"
    assert json.loads(side.read_text())["epochs"] == record["epochs"]
    assert plots.plot_curves(record, tmp_path / "c.png").stat().st_size > 10_000
    assert plots.plot_embeddings(rep, tmp_path / "e.png").stat().st_size > 10_000


def test_acc_vs_asr_of_many_defenses_is_one_panel_per_threat_with_distinct_styles():
    import pandas as pd

    defenses = [f"d{i}" for i in range(17)]
    threats = ["clean", "t1", "t2"]
    index = pd.MultiIndex.from_product([threats, defenses], names=["threat", "defense"])
    cols = pd.MultiIndex.from_product([["acc", "asr"], ["mean", "std"]])
    long = pd.DataFrame(0.5, index=index, columns=cols)
    fig = plots.acc_asr_figure(long, ["threat", "defense"], "many")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert sorted(ax.get_title() for ax in visible) == [f"threat={t}" for t in sorted(threats)]
    assert all(len(ax.lines) >= len(defenses) for ax in visible)  # every defense has its point in every panel
    (legend,) = fig.legends
    styles = {(tuple(h.get_color()), h.get_marker()) for h in legend.legend_handles}
    assert len(styles) == len(defenses) == len(legend.legend_handles)  # no two defenses look alike
