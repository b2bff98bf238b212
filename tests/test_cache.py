"""Cache keys change when a relevant value changes and not otherwise; artifacts round-trip."""

from __future__ import annotations

import torch

from securetl.cache import Cache, config_hash
from securetl.pipeline import run
from securetl.results import run_id


def test_config_hash_is_stable_and_sensitive():
    a = {"width": 16, "epochs": 10}
    assert config_hash(a) == config_hash({"epochs": 10, "width": 16})
    assert config_hash(a) != config_hash({"width": 16, "epochs": 11})
    assert config_hash(a) != config_hash(a, version=999)


def test_cache_round_trip(tmp_path):
    c = Cache(tmp_path)
    assert c.load_state("encoder", "k") is None
    c.save_state("encoder", "k", {"w": torch.arange(4.0)}, {"note": 1})
    assert torch.equal(c.load_state("encoder", "k")["w"], torch.arange(4.0))
    assert c.load_meta("encoder", "k") == {"note": 1}
    assert not list((tmp_path / "encoder").glob("*.tmp"))


def test_encoder_key_follows_relevant_config_only(compose_cfg):
    base = run(compose_cfg([]))["cache_keys"]["encoder"]
    # downstream-only changes and the run seed reuse the encoder
    assert run(compose_cfg(["dataset.n_train=250"]))["cache_keys"]["encoder"] == base
    assert run(compose_cfg(["seed=1"]))["cache_keys"]["encoder"] == base
    # what the encoder is trained with changes it
    assert run(compose_cfg(["encoder.lr=0.002"]))["cache_keys"]["encoder"] != base
    assert run(compose_cfg(["dataset.n_pretrain=192"]))["cache_keys"]["encoder"] != base


def test_encoder_keys_follow_the_numerics(compose_cfg):
    """An encoder pre-trained (or implanted) under 1 CPU thread differs from one made under 2: a row must not
    depend on which of its sweep's jobs filled the cache, so the thread count is part of the key."""
    # one run_id (the numerics stay out of it, the row records them): resume=false computes the second
    one = run(compose_cfg(["threads=1", "encoder_attack=badencoder"]))["cache_keys"]
    two = run(compose_cfg(["threads=2", "encoder_attack=badencoder", "resume=false"]))["cache_keys"]
    assert one["encoder"] != two["encoder"] and one["implanted"] != two["implanted"]
    again = run(compose_cfg(["threads=1", "encoder_attack=badencoder", "seed=1"]))["cache_keys"]
    assert {k: again[k] for k in ("encoder", "implanted")} == {k: one[k] for k in ("encoder", "implanted")}


def test_run_id_ignores_where_results_go(compose_cfg):
    a = compose_cfg([])
    b = compose_cfg(["progress=true", "logger=none", "resume=false"])
    assert run_id(a) == run_id(b)
    assert run_id(a) != run_id(compose_cfg(["seed=5"]))
