"""Per-dataset deltas (conf/deltas/<dataset>.yaml): merged for the chosen options, never over the user's keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from securetl import results
from securetl.deltas import apply_deltas, overridden_keys
from securetl.validate import ConfigError

DELTAS = sorted((Path(__file__).resolve().parents[1] / "conf" / "deltas").glob("*.yaml"))


def _apply(cfg, overrides):
    choices = results.choices_of(cfg)
    return apply_deltas(cfg, choices, overrides), choices


def test_synthetic_delta_replaces_the_paper_rate_with_the_paper_count(compose_cfg):
    cfg = compose_cfg(["data_attack=tact"])
    assert cfg.data_attack.poison_rate == pytest.approx(0.003)  # the YAML keeps the paper's rate
    applied, _ = _apply(cfg, [])
    assert cfg.data_attack.poison_rate == pytest.approx(0.0375)
    assert applied["data_attack.poison_rate"] == pytest.approx(0.0375)


def test_a_key_the_user_sets_wins_over_the_delta(compose_cfg):
    over = ["data_attack=tact", "data_attack.poison_rate=0.01"]
    cfg = compose_cfg(over)
    applied, _ = _apply(cfg, over)
    assert cfg.data_attack.poison_rate == pytest.approx(0.01)
    assert "data_attack.poison_rate" not in applied
    assert cfg.data_attack.cover_rate == pytest.approx(0.0375)  # the key the user left alone still moves


def test_no_delta_file_or_no_entry_changes_nothing(compose_cfg):
    for over in (["data_attack=tact", "dataset=cifar10"], ["data_attack=badnets"]):
        cfg = compose_cfg(over)
        before = OmegaConf.to_container(cfg.data_attack)
        applied, _ = _apply(cfg, over)
        assert applied == {} and OmegaConf.to_container(cfg.data_attack) == before


def test_the_run_id_follows_the_effective_values_not_the_delta_node(compose_cfg):
    """Same effective config, with or without the delta doing the work, hashes the same."""
    via_delta = compose_cfg(["data_attack=tact"])
    _apply(via_delta, [])
    by_hand = ["data_attack=tact", "data_attack.poison_rate=0.0375", "data_attack.cover_rate=0.0375"]
    explicit = compose_cfg(by_hand)
    choices = results.choices_of(explicit)
    _apply(explicit, by_hand)
    assert results.run_id(via_delta, choices) == results.run_id(explicit, choices)


def test_a_delta_naming_a_missing_key_is_a_clear_error(compose_cfg):
    cfg = compose_cfg(["data_attack=tact"])
    with open_dict(cfg):
        cfg.deltas.data_attack.tact.not_a_key = 1
    with pytest.raises(ConfigError, match="not_a_key"):
        _apply(cfg, [])


def test_override_parsing_covers_hydras_forms():
    assert overridden_keys(["a.b=1", "+c.d=2", "++e=3", "~f.g", "h=1,2", "seed=0"]) == {
        "a.b",
        "c.d",
        "e",
        "f.g",
        "h",
        "seed",
    }


@pytest.mark.parametrize("path", DELTAS, ids=lambda p: p.stem)
def test_every_delta_names_real_options_and_keys(path, compose_cfg):
    """A typo in a delta file fails here, not after a sweep."""
    delta = OmegaConf.load(path)
    for group, per_option in delta.items():
        for option, keys in per_option.items():
            cfg = compose_cfg([f"dataset={path.stem}", f"{group}={option}"])
            missing = set(keys) - set(cfg[group])
            assert not missing, f"{path.name}: {group}={option} lacks {missing}"


@pytest.mark.parametrize("defense,node", [("distill", "defense"), ("decree", "defense.distill")])
def test_distillation_uses_the_synthetic_encoders_views_on_synthetic_data(compose_cfg, defense, node):
    """The SimCLR views of distillation (alone, or as DECREE's action) are the synthetic encoders' own there."""
    cfg = compose_cfg([f"defense={defense}"])
    assert OmegaConf.select(cfg, f"{node}.augment") is None  # the method YAML keeps SimCLR's CIFAR views
    _apply(cfg, [])
    views = OmegaConf.to_container(OmegaConf.select(cfg, f"{node}.augment"))
    assert views == OmegaConf.to_container(cfg.encoder.augment)
    # the node's other keys stay (no node replaced)
    assert OmegaConf.select(cfg, f"{node}.loss") == "attention"
    over = [f"defense={defense}", f"{node}.loss=sp"]
    cfg = compose_cfg(over)
    _apply(cfg, over)
    assert OmegaConf.select(cfg, f"{node}.loss") == "sp"
    assert OmegaConf.select(cfg, f"{node}.augment") is not None
    over = [f"defense={defense}", f"{node}.augment={{jitter:0.4}}"]  # the user's views win over the delta's
    cfg = compose_cfg(over)
    _apply(cfg, over)
    assert OmegaConf.to_container(OmegaConf.select(cfg, f"{node}.augment")) == {"jitter": 0.4}
