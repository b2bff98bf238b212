"""The validation protocol (docs/validation.md): dataset variants change the downstream data only, keep the
default's pre-training images and deltas, and the development and held-out halves stay apart."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import CONF
from securetl import pipeline, results
from securetl.build import build
from securetl.data.synthetic import DOWNSTREAM_KEYS, build_synthetic
from securetl.deltas import apply_deltas
from securetl.tables import build_table, flatten, load_preset
from securetl.validate import DataSizes, planned_sizes

VARIANTS = sorted(p.stem for p in (CONF / "variant").glob("*.yaml"))
DEV = [v for v in VARIANTS if v.startswith("dev_")]
HELDOUT = [v for v in VARIANTS if v.startswith("heldout_")]
SMALL = dict(n_train=120, n_test=40, n_pretrain=60, n_reference=20)


def variant_node(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / "variant" / f"{name}.yaml"))


def downstream_seed(name: str) -> int:
    return variant_node(name)["dataset"]["downstream"]["seed"]


def test_every_variant_is_in_one_half_and_its_header_says_which_and_what_it_changes():
    assert DEV and HELDOUT and sorted(DEV + HELDOUT) == VARIANTS
    for v in VARIANTS:
        lines = (CONF / "variant" / f"{v}.yaml").read_text().splitlines()
        assert lines[0] == "# @package _global_"
        half = "development" if v in DEV else "held-out"
        assert lines[1].startswith(f"# {half} variant (docs/validation.md)"), v
        assert any(line.startswith("# Changes") for line in lines), f"{v}: say what it changes"
        assert set(variant_node(v)) == {"dataset"}, f"{v}: a variant sets dataset keys only"


def test_the_halves_draw_disjoint_downstream_images():
    seeds = {v: downstream_seed(v) for v in VARIANTS}
    assert len(set(seeds.values())) == len(seeds), "two variants share a downstream seed"
    assert all(0 < seeds[v] < 10 for v in DEV)  # 0 is the default's, itself a development dataset
    assert all(seeds[v] >= 10 for v in HELDOUT)


def test_the_table_presets_sweep_one_half_each():
    heldout = load_preset("tcore_heldout_synthetic")
    assert sorted(heldout["sweep"]["variant"]) == HELDOUT  # every held-out variant, nothing else
    assert heldout["sweep"]["threat"] == [
        "clean",
        "t2_badnets",
        "t2_blended",
        "t2_adap_blend",
        "t3_badencoder_badnets",
    ]
    assert heldout["sweep"]["defense"] == ["none", "tcore"] and heldout["sweep"]["seed"] == ["0", "1", "2"]
    assert heldout["report"]["rows"] == ["variant", "threat"]
    sizes = {variant_node(v)["dataset"].get("n_train") for v in heldout["sweep"]["variant"]}
    assert {1000, 1500} <= sizes
    rates = load_preset("tcore_heldout_rates_synthetic")
    assert set(rates["sweep"]["variant"]) <= set(HELDOUT)
    assert rates["sweep"]["data_attack.poison_rate"] == ["0.05", "0.2"]
    dev = load_preset("tcore_dev_synthetic")
    assert sorted(dev["sweep"]["variant"]) == DEV
    assert {k: v for k, v in dev["sweep"].items() if k != "variant"} == {
        k: v for k, v in heldout["sweep"].items() if k != "variant"
    }


def test_the_default_splits_are_those_of_a_downstream_that_repeats_the_top_level_settings():
    plain = build_synthetic(**SMALL)
    top = {"seed": 0, "num_classes": 10, "noise": 0.03, "distractor_prob": 0.3, "low_contrast_prob": 0.1}
    top |= {"scale": [0.45, 0.8], "min_contrast": 0.35, "bg_contrast": 0.5, "pattern_strength": 0.8}
    top |= {"palette_size": 12}
    assert sorted(top) == sorted(DOWNSTREAM_KEYS)
    spelled = build_synthetic(**SMALL, downstream=top)  # another memo key: built again
    assert spelled is not plain
    for split in ("train", "test", "pretrain", "reference", "clean"):
        a, b = getattr(plain, split), getattr(spelled, split)
        assert a.x.equal(b.x) and a.y.equal(b.y), split
    assert plain.background.equal(spelled.background)


def test_without_a_variant_the_config_and_choices_are_as_before(compose_cfg):
    """So no existing row's run_id changes: no `downstream` key, no `variant` choice."""
    cfg = compose_cfg([])
    assert "downstream" not in cfg.dataset
    assert tuple(results.choices_of(cfg)) == results.GROUPS


def test_an_unknown_downstream_setting_is_refused():
    with pytest.raises(ValueError, match="n_train"):
        build_synthetic(**SMALL, downstream={"n_train": 10})


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_variant_keeps_the_default_pretraining_images_and_changes_the_downstream_ones(compose_cfg, variant):
    default = build(compose_cfg([]).dataset)
    default_pre, default_bg, default_train = default.pretrain, default.background, default.train
    cfg = compose_cfg([f"variant={variant}"])
    splits = build(cfg.dataset)
    assert splits.pretrain.x.equal(default_pre.x) and splits.pretrain.y.equal(default_pre.y)
    assert splits.background.equal(default_bg)
    assert not splits.train.x.equal(default_train.x)
    assert splits.num_classes == cfg.dataset.downstream.get("num_classes", 10)
    assert int(splits.train.y.max()) == splits.num_classes - 1
    assert planned_sizes(cfg.dataset) == DataSizes.of(splits)  # the pre-build checks count what is built


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_synthetic_deltas_apply_to_every_variant(compose_cfg, variant):
    delta = OmegaConf.load(CONF / "deltas" / "synthetic.yaml").data_attack.adap_blend
    cfg = compose_cfg([f"variant={variant}", "data_attack=adap_blend"])
    applied = apply_deltas(cfg, results.choices_of(cfg), [])
    assert applied["data_attack.poison_rate"] == delta.poison_rate == cfg.data_attack.poison_rate


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_runs_end_to_end_at_tiny_sizes(compose_cfg, variant):
    row = pipeline.run(compose_cfg([f"variant={variant}", "data_attack=badnets"]))
    assert row["choices"]["variant"] == variant and row["choices"]["dataset"] == "synthetic"
    assert row["config"]["dataset"]["n_train"] == 300  # the tiny size wins over a variant's own
    assert row["config"]["dataset"]["downstream"] == variant_node(variant)["dataset"]["downstream"]
    assert row["diagnostics"]["n_poison"] == 30
    assert 0.0 <= row["metrics"]["acc"] <= 1.0 and 0.0 <= row["metrics"]["asr"] <= 1.0


def test_variant_rows_stay_out_of_tables_that_do_not_sweep_variants():
    def row(variant, acc):
        choices = dict.fromkeys(results.GROUPS, "None") | {
            "dataset": "synthetic",
            "threat": "t2_badnets",
            "defense": "none",
            "probe": "finetune",
        }
        if variant:  # a row written before variants existed has no `variant` choice at all
            choices["variant"] = variant
        return {"choices": choices, "seed": 0, "metrics": {"acc": acc, "asr": 0.5}}

    rows = flatten([row(None, 0.9), row("heldout_seed11", 0.1)])
    for name, acc in (("tcore_synthetic", "90.00"), ("tcore_heldout_synthetic", "10.00")):
        preset = load_preset(name)
        disp, _, _ = build_table(rows, preset["report"], preset["sweep"])
        assert disp["none ACC"].tolist() == [acc], name
