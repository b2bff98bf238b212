"""The clean reserve and the knowledge a defense declares (issue 19, item 1): the reserve is disjoint from train and
test, class-balanced and the same for every run; only a defense that declares clean data receives it; a method
that needs it refuses clean_fraction=0 before any work; a defense reaches no test split, poison index, poison rate
or target class."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from securetl.data.real import finish
from securetl.data.synthetic import build_synthetic
from securetl.interfaces import Defense, Knowledge, LabeledSet, RunContext
from securetl.knowledge import clean_share
from securetl.pipeline import run
from securetl.validate import ConfigError

SMALL = dict(n_train=300, n_test=200, n_pretrain=100, n_reference=20)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r.numpy().tobytes()) for r in x}


def test_synthetic_reserve_is_disjoint_balanced_fixed_and_leaves_the_other_splits_as_they_were():
    s = build_synthetic(**SMALL)
    train_x, test_x, pre_x = s.train.x.clone(), s.test.x.clone(), s.pretrain.x.clone()
    assert s.clean is not None and len(s.clean) == 30  # a tenth of n_train, whole classes
    assert torch.bincount(s.clean.y, minlength=10).tolist() == [3] * 10
    assert not _rows(s.clean.x) & _rows(s.train.x)
    assert not _rows(s.clean.x) & _rows(s.test.x)
    again = build_synthetic(**SMALL, n_clean=0)  # another configuration: rebuilt, without a reserve
    assert again.clean is None
    assert torch.equal(again.train.x, train_x) and torch.equal(again.test.x, test_x)
    assert torch.equal(again.pretrain.x, pre_x)
    third = build_synthetic(**SMALL)
    assert torch.equal(third.clean.x, s.clean.x) and torch.equal(third.clean.y, s.clean.y)


def test_real_reserve_is_carved_from_test_balanced_and_independent_of_n_test():
    g = torch.Generator().manual_seed(0)
    train = LabeledSet(
        torch.randint(0, 256, (200, 3, 4, 4), generator=g, dtype=torch.uint8), torch.arange(200) % 4
    )
    test = LabeledSet(
        torch.randint(0, 256, (100, 3, 4, 4), generator=g, dtype=torch.uint8), torch.arange(100) % 4
    )
    names = ["a", "b", "c", "d"]
    s = finish("fake", train, test, names, n_reference=8, n_clean=20)
    assert len(s.clean) == 20 and torch.bincount(s.clean.y).tolist() == [5] * 4
    assert len(s.test) == 80
    assert not _rows(s.clean.x) & _rows(s.test.x)
    assert _rows(s.clean.x) <= _rows(test.x)  # from the official test split, never from train
    sub = finish("fake", train, test, names, n_reference=8, n_clean=20, n_test=30)
    assert torch.equal(sub.clean.x, s.clean.x) and len(sub.test) == 30
    plain = finish("fake", train, test, names, n_reference=8, n_clean=0)
    assert torch.equal(plain.train.x, s.train.x) and torch.equal(plain.reference.x, s.reference.x)


def test_clean_share_is_class_balanced_and_refuses_more_than_the_reserve():
    s = build_synthetic(**SMALL)
    share = clean_share(s, Knowledge(clean_fraction=0.1))
    assert torch.bincount(share.y, minlength=10).tolist() == [3] * 10
    assert clean_share(s, Knowledge(clean_fraction=0.0)) is None
    with pytest.raises(ConfigError, match="n_clean"):
        clean_share(s, Knowledge(clean_fraction=0.5))


class _Spy(Defense):
    """Records what the pipeline hands a defense."""

    name = "spy"
    seen: list = []

    def train(self, encoder, train, probe, ctx):
        _Spy.seen.append((train, ctx))
        _Spy.diagnostics_at_entry = dict(ctx.diagnostics)
        return super().train(encoder, train, probe, ctx)


class _CleanSpy(_Spy):
    knowledge = Knowledge(clean_fraction=0.1)


def _run_with(compose_cfg, monkeypatch, spy_cls, overrides=()):
    import securetl.pipeline as pipeline

    real_build = pipeline.build
    built = {}

    def build(node, **kw):
        target = str(node.get("_target_", ""))
        if target.endswith("NoDefense"):
            return spy_cls()
        out = real_build(node, **kw)
        if target.endswith("build_synthetic"):
            built["splits"] = out
        return out

    monkeypatch.setattr(pipeline, "build", build)
    _Spy.seen.clear()
    row = run(compose_cfg(["data_attack=badnets", *overrides]))
    (seen,) = _Spy.seen
    return row, seen, built["splits"]


def test_defense_declaring_no_clean_data_never_receives_it_and_sees_nothing_of_the_attack(
    compose_cfg, monkeypatch
):
    row, (train, ctx), splits = _run_with(compose_cfg, monkeypatch, _Spy)
    assert ctx.clean is None
    assert row["knowledge"] == {
        "clean_fraction": 0.0,
        "needs_clean": False,
        "n_clean": 0,
        "trains_encoder": False,
        "reads_poison_idx": False,
    }
    # a LabeledSet and a RunContext: no test split, no poison indices, no rate, no target by construction
    assert type(train) is LabeledSet and [f.name for f in dataclasses.fields(train)] == ["x", "y"]
    fields = {f.name for f in dataclasses.fields(RunContext)}
    assert not fields & {"test", "splits", "poison_idx", "poisoned", "poison_rate", "target", "attack"}
    assert _Spy.diagnostics_at_entry == {}  # the attacks' diagnostics stay in the pipeline's own context
    for value in vars(ctx).values():  # nothing in it is (a view of) the test images
        if isinstance(value, torch.Tensor):
            assert value.data_ptr() != splits.test.x.data_ptr()


def test_defense_declaring_clean_data_gets_a_balanced_share_disjoint_from_train_and_test(
    compose_cfg, monkeypatch
):
    row, (train, ctx), splits = _run_with(compose_cfg, monkeypatch, _CleanSpy)
    assert ctx.clean is not None and len(ctx.clean) == 30  # 0.1 x 300, 3 per class
    assert torch.bincount(ctx.clean.y, minlength=10).tolist() == [3] * 10
    assert not _rows(ctx.clean.x) & _rows(train.x)
    assert not _rows(ctx.clean.x) & _rows(splits.test.x)
    assert row["knowledge"]["n_clean"] == 30 and row["knowledge"]["clean_fraction"] == 0.1


def test_a_method_needing_clean_data_refuses_clean_fraction_zero_before_any_work(compose_cfg, monkeypatch):
    import securetl.pipeline as pipeline

    real_build = pipeline.build

    def build(node, **kw):
        assert not str(node.get("_target_", "")).endswith("build_synthetic"), "the data were built"
        return real_build(node, **kw)

    monkeypatch.setattr(pipeline, "build", build)
    for method in ("scan", "ct", "asset"):
        with pytest.raises(ConfigError, match="needs clean labelled data") as e:
            run(compose_cfg([f"defense={method}", "defense.clean_fraction=0"]))
        assert "\n" not in str(e.value)
