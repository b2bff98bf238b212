"""Triggers and the BadNets attack: shape/range kept, counts and labels as stated."""

from __future__ import annotations

import pytest
import torch

from securetl.attacks.data.badnets import BadNets
from securetl.data.synthetic import build_synthetic
from securetl.interfaces import LabeledSet
from securetl.triggers.patch import PatchTrigger


@pytest.fixture(scope="module")
def data():
    return build_synthetic(n_train=200, n_test=50, n_pretrain=20, n_reference=20)


@pytest.mark.parametrize("pattern", ["checkerboard", "white", "black", "random", "htba"])
def test_patch_trigger_changes_image_keeps_shape_and_range(data, pattern):
    x = data.train.floats(slice(0, 16))
    t = PatchTrigger(size=3, pattern=pattern)
    y = t.apply(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    assert not torch.equal(x, y)
    changed = (x != y).any(dim=1)  # (N, H, W)
    assert changed[:, :-3, :].sum() == 0 and changed[:, :, :-3].sum() == 0  # only the bottom-right 3x3
    assert torch.equal(t.apply(x), y)  # deterministic


def test_htba_pattern_is_colour_blobs_not_pixel_noise():
    """HTBA's triggers: a random 4 x 4 colour matrix resized bilinearly, so neighbouring pixels are close
    (unlike `random`, one colour per pixel), the colours still span the range, and a seed fixes them."""
    from securetl.triggers.patch import patch_pattern

    def roughness(p):
        return (p[:, :, 1:] - p[:, :, :-1]).abs().mean()

    htba, noise = patch_pattern("htba", 16, seed=3), patch_pattern("random", 16, seed=3)
    assert htba.shape == (3, 16, 16) and 0.0 <= float(htba.min()) and float(htba.max()) <= 1.0
    assert roughness(htba) < roughness(noise) / 3 and float(htba.max() - htba.min()) > 0.3
    assert torch.equal(htba, patch_pattern("htba", 16, seed=3))
    assert not torch.equal(htba, patch_pattern("htba", 16, seed=4))


def test_trigger_rejects_bad_settings():
    with pytest.raises(ValueError, match="location"):
        PatchTrigger(location="middle")
    with pytest.raises(ValueError):
        PatchTrigger(size=40).apply(torch.rand(1, 3, 32, 32))


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.1, 0.37])
def test_badnets_poisons_round_rate_n_all_relabelled(data, rate):
    attack = BadNets(PatchTrigger(), target=3, poison_rate=rate)
    out = attack.poison(data.train, torch.Generator().manual_seed(0))
    n = len(data.train)
    assert len(out.poison_idx) == round(rate * n)
    assert len(out.train) == n
    assert (out.train.y[out.poison_idx] == 3).all()
    assert (data.train.y[out.poison_idx] != 3).all()  # drawn from non-target classes
    clean = torch.ones(n, dtype=torch.bool)
    clean[out.poison_idx] = False
    assert torch.equal(out.train.x[clean], data.train.x[clean])
    assert torch.equal(out.train.y[clean], data.train.y[clean])
    if len(out.poison_idx):
        assert not torch.equal(out.train.x[out.poison_idx], data.train.x[out.poison_idx])


def test_badnets_rejects_rates_outside_unit_interval():
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="poison_rate"):
            BadNets(PatchTrigger(), poison_rate=bad)


def test_badnets_validates_target_against_dataset():
    with pytest.raises(ValueError, match="target=42"):
        BadNets(PatchTrigger(), target=42).validate(10)


def test_labeled_set_checks_dtype():
    with pytest.raises(TypeError):
        LabeledSet(torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))


def test_synthetic_splits_are_built_once_per_configuration(data):
    same = build_synthetic(n_train=200, n_test=50, n_pretrain=20, n_reference=20)
    assert same is data  # a multirun's jobs share one build
    other = build_synthetic(n_train=200, n_test=50, n_pretrain=20, n_reference=20, seed=1)
    assert other is not data and not torch.equal(other.train.x, data.train.x)
    again = build_synthetic(n_train=200, n_test=50, n_pretrain=20, n_reference=20)
    assert torch.equal(again.train.x, data.train.x)  # the rebuilt splits are the same images
    # a multirun's poisoning must not leak into the shared splits
    before = data.train.x.clone()
    BadNets(PatchTrigger(size=3), target=0, poison_rate=0.1).poison(
        data.train, torch.Generator().manual_seed(0)
    )
    assert torch.equal(data.train.x, before)
