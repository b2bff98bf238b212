"""Encoder attacks: the poisoned pre-training sets have the stated size and composition, the triggers do
what they claim, DRUPE implants a backdoor that keeps clean embeddings, and artifacts come from cache."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from securetl.attacks.encoder import drupe as drupe_mod
from securetl.attacks.encoder._common import offdiag_mean_cos, sliced_wasserstein
from securetl.attacks.encoder.badencoder import BadEncoder, cos
from securetl.attacks.encoder.corruptencoder import CorruptEncoder
from securetl.attacks.encoder.ctrl import CTRL
from securetl.attacks.encoder.drupe import DRUPE
from securetl.attacks.encoder.sslbackdoor import SSLBackdoor
from securetl.data.synthetic import build_synthetic
from securetl.encoders import obtain as obtain_mod
from securetl.encoders.resnet import build_encoder
from securetl.interfaces import LabeledSet, RunContext, to_float, to_uint8
from securetl.pipeline import run
from securetl.ssl.augment import random_resized_crop
from securetl.triggers.frequency import FrequencyTrigger, block_dct, dct_matrix
from securetl.triggers.patch import PatchTrigger
from securetl.triggers.random_patch import RandomPatchTrigger

TARGET = 3


@pytest.fixture(scope="module")
def data():
    return build_synthetic(n_train=10, n_test=10, n_pretrain=400, n_reference=40)


def changed_rows(a: LabeledSet, b: LabeledSet) -> torch.Tensor:
    return torch.nonzero((a.x != b.x).flatten(1).any(1)).squeeze(1)


# --------------------------------------------------------------------------- triggers
def test_dct_is_orthonormal_and_block_dct_inverts():
    d = dct_matrix(8)
    assert torch.allclose(d @ d.t(), torch.eye(8), atol=1e-6)
    x = torch.rand(2, 3, 16, 32)
    assert torch.allclose(block_dct(block_dct(x, 8), 8, inverse=True), x, atol=1e-5)


def test_frequency_trigger_touches_only_its_chroma_coefficients():
    x = 0.3 + 0.4 * torch.rand(4, 3, 32, 32)  # mid-range, so clamping does not interfere
    # YCbCr is inverted exactly (kornia's YUV pair, the default, is not: see the next test)
    t = FrequencyTrigger(
        window=16, channels=(1, 2), positions=((7, 7), (15, 15)), magnitude=30.0, color_space="ycbcr"
    )
    y = t.apply(x)
    assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1
    assert torch.equal(t.apply(x), y)
    to_c = lambda z: torch.einsum("ij,njhw->nihw", t.rgb2c, z * 255)  # noqa: E731
    diff = block_dct(to_c(y), 16) - block_dct(to_c(x), 16)
    expected = torch.zeros_like(diff)
    for r in (0, 16):
        for c in (0, 16):
            for u, v in ((7, 7), (15, 15)):
                expected[:, 1:, r + u, c + v] = 30.0
    assert torch.allclose(diff, expected, atol=1e-2)  # luma and every other coefficient untouched
    assert float((y - x).abs().max()) < 12 / 255  # invisible: a few grey levels


def _smooth_rgb() -> torch.Tensor:
    """A fixed 32x32 RGB image, written out so that it needs no random generator."""
    i, j = torch.arange(32.0).view(32, 1), torch.arange(32.0).view(1, 32)
    r = 0.5 + 0.3 * torch.sin(i / 5.0) * torch.cos(j / 7.0)
    g = 0.4 + 0.25 * torch.cos((i + 2 * j) / 9.0)
    b = 0.6 - 0.2 * torch.sin((2 * i - j) / 6.0)
    return torch.stack([r, g, b]).unsqueeze(0)


# (channel, row, column) -> value of the poisoned image, from the authors' own code (meet-cjli/CTRL
# utils/frequency.py, PoisonFre(..., window 32, positions 15 31, channels 1 2, rgb2yuv=True)
# .Poison_Frequency_Diff(x, y, 100.0), with kornia 0.6.5's rgb_to_yuv / yuv_to_rgb), run in float64
CTRL_REFERENCE = {
    "plain": {
        (0, 0, 0): 0.5153922175,
        (1, 0, 0): 0.6368389704,
        (2, 0, 0): 0.6273794180,
        (0, 5, 7): 0.6457446913,
        (1, 15, 15): 0.4362217989,
        (2, 31, 31): 0.8066065978,
        (0, 16, 3): 0.4827200732,
        (2, 9, 30): 0.7798409450,
    },
    "bright": {  # 0.85 + 0.2 x: the trigger is clipped at 1 in 379 of the 3072 values
        (0, 0, 0): 0.9654042175,
        (2, 31, 31): 1.0,
        (1, 15, 15): 0.9094940389,
        (2, 9, 30): 0.9983935818,
    },
}


@pytest.mark.parametrize("case", ["plain", "bright"])
def test_ctrl_trigger_matches_the_authors_code_on_a_fixed_image(case):
    x = _smooth_rgb()
    if case == "bright":
        x = (x * 0.2 + 0.85).clamp(0, 1)
    y = FrequencyTrigger().apply(x)  # the defaults are the authors' CIFAR-10 command
    for (c, r, col), want in CTRL_REFERENCE[case].items():
        assert float(y[0, c, r, col]) == pytest.approx(want, abs=2e-6), (c, r, col)
    if case == "plain":
        assert float((y - x).abs().sum()) == pytest.approx(60.841941, abs=1e-3)
        assert float((y - x).abs().max()) * 255 == pytest.approx(21.712167, abs=1e-3)
    else:
        assert int((y == 1).sum()) == 379 and float((y - x).abs().sum()) == pytest.approx(52.966122, abs=1e-3)
    # the JPEG YCbCr of the paper's wording gives visibly different poisons (up to ~3 grey levels here)
    assert float((FrequencyTrigger(color_space="ycbcr").apply(x) - y).abs().max()) * 255 > 1.0


def test_ctrl_config_uses_the_authors_colour_pair():
    from omegaconf import OmegaConf

    from conftest import CONF

    assert OmegaConf.load(CONF / "trigger" / "ctrl_freq.yaml").color_space == "yuv"
    assert FrequencyTrigger().color_space == "yuv"  # the Python default is the YAML's


def test_frequency_trigger_rejects_bad_settings():
    with pytest.raises(ValueError, match="positions"):
        FrequencyTrigger(window=8, positions=((8, 1),))
    with pytest.raises(ValueError, match="color_space"):
        FrequencyTrigger(color_space="lab")
    with pytest.raises(ValueError, match="tiled"):
        FrequencyTrigger(window=32).apply(torch.rand(1, 3, 24, 24))


def test_random_patch_trigger_places_one_patch_per_image_inside_its_range():
    x = torch.full((64, 3, 32, 32), 0.5)
    t = RandomPatchTrigger(size=5, pattern="white", location_min=0.25, location_max=0.75, seed=1)
    y = t.apply(x)
    assert torch.equal(t.apply(x), y)
    changed = (y != x).any(1)
    assert (changed.flatten(1).sum(1) == 25).all()
    rows, cols = changed.any(2), changed.any(1)
    first_r, first_c = rows.float().argmax(1), cols.float().argmax(1)
    assert first_r.min() >= 8 and first_r.max() + 5 <= 24 and first_c.min() >= 8 and first_c.max() + 5 <= 24
    assert len(set(zip(first_r.tolist(), first_c.tolist()))) > 10  # places differ between images


# --------------------------------------------------------------------------- pre-training-data attacks
@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.05])
def test_ctrl_poisons_ratio_of_whole_set_from_target_class_only(data, ratio):
    attack = CTRL(FrequencyTrigger(), target=TARGET, poison_ratio=ratio)
    out = attack.poison_pretraining(data.pretrain, torch.Generator().manual_seed(0))
    n = len(data.pretrain)
    assert len(out) == n and torch.equal(out.y, data.pretrain.y)
    assert len(attack.poison_idx) == round(ratio * n)
    assert (data.pretrain.y[attack.poison_idx] == TARGET).all()
    assert torch.equal(changed_rows(out, data.pretrain), attack.poison_idx)  # exactly those, all of them


def test_ctrl_refuses_more_poisons_than_target_images(data):
    with pytest.raises(ValueError, match="poison_ratio"):
        CTRL(FrequencyTrigger(), target=TARGET, poison_ratio=0.5).poison_pretraining(
            data.pretrain, torch.Generator()
        )


def test_sslbackdoor_pastes_patch_on_target_category_within_train_range(data):
    trig = RandomPatchTrigger(size=7, pattern="white", seed=10)
    attack = SSLBackdoor(trig, target=TARGET, poison_ratio=0.05)
    out = attack.poison_pretraining(data.pretrain, torch.Generator().manual_seed(0))
    n = len(data.pretrain)
    assert len(out) == n and torch.equal(out.y, data.pretrain.y)
    assert len(attack.poison_idx) == round(0.05 * n)
    assert (data.pretrain.y[attack.poison_idx] == TARGET).all()
    assert set(changed_rows(out, data.pretrain).tolist()) <= set(attack.poison_idx.tolist())
    # the white patch sits inside the central [0.25, 0.75] band of each side (pixels 8..23)
    white = (out.x[attack.poison_idx] == 255).all(1)
    for i in range(len(white)):
        r, c = torch.nonzero(white[i], as_tuple=True)
        inside = (r >= 8) & (r < 24) & (c >= 8) & (c < 24)
        assert inside.sum() >= 49
    with pytest.raises(ValueError, match="RandomPatchTrigger"):
        SSLBackdoor(PatchTrigger(), target=TARGET)


@pytest.mark.parametrize("scenes", [True, False], ids=["object-free-backgrounds", "other-class-backgrounds"])
def test_corruptencoder_injects_composed_images(data, scenes):
    """Poisons are twice as wide as tall, as the authors': a target-class reference at its own size at one
    end, the trigger in the other half, on an enlarged object-free scene (or, for a dataset without scenes,
    an enlarged pre-training image of another class). They come as a second set beside the clean one."""
    trig = RandomPatchTrigger(size=6, pattern="white", seed=10)
    attack = CorruptEncoder(trig, target=TARGET, poison_ratio=0.05, n_reference=3)
    background = data.background if scenes else None
    assert data.background is not None and data.background.dtype == torch.uint8
    clean, poisons = attack.poison_pretraining(
        data.pretrain, torch.Generator().manual_seed(0), background=background
    )
    n, k = len(data.pretrain), round(0.05 * len(data.pretrain))
    assert clean is data.pretrain
    assert poisons.x.shape == (k, 3, 32, 64) and (poisons.y == TARGET).all()
    assert torch.equal(attack.poison_idx, torch.arange(n, n + k))
    assert len(attack.reference_idx) == 3 and (data.pretrain.y[attack.reference_idx] == TARGET).all()
    assert len(attack.background_idx) == k
    if scenes:
        assert int(attack.background_idx.max()) < len(data.background)
    else:
        assert (data.pretrain.y[attack.background_idx] != TARGET).all()
    pool = data.background if scenes else data.pretrain.x
    refs = data.pretrain.x[attack.reference_idx]
    slack = int(0.05 * 64)
    for j in range(k):
        img = poisons.x[j]
        # the bottom band of the scene enlarged to 64 x 64
        band = to_uint8(
            F.interpolate(to_float(pool[attack.background_idx[j]][None]), size=(64, 64), mode="bilinear")
        )[0, :, 32:]
        at = [
            c
            for c in list(range(0, slack + 1)) + list(range(32 - slack, 33))
            if any(torch.equal(img[:, :, c : c + 32], r) for r in refs)
        ]
        assert at, f"poison {j}: no reference at either end"
        obj = torch.zeros(32, 64, dtype=torch.bool)
        obj[:, at[0] : at[0] + 32] = True
        # off the object: the scene, but for a 6x6 white trigger away from the object
        trig_px = ((img.int() - band.int()).abs() > 1).any(0) & ~obj
        r, c = torch.nonzero(trig_px, as_tuple=True)
        assert len(r) >= 30 and (img[:, trig_px] == 255).all()
        assert r.max() - r.min() < 6 and c.max() - c.min() < 6
        assert c.min() >= at[0] + 32 or c.max() < at[0]


def test_pretrain_attacks_validate_target_against_classes():
    for attack in (
        CTRL(FrequencyTrigger(), target=12),
        SSLBackdoor(RandomPatchTrigger(), target=12),
        CorruptEncoder(RandomPatchTrigger(), target=12),
    ):
        assert attack.kind == "pretrain_data"
        with pytest.raises(ValueError, match="target=12"):
            attack.validate(10)
    with pytest.raises(ValueError, match="poison_ratio"):
        CTRL(FrequencyTrigger(), poison_ratio=1.5)


# --------------------------------------------------------------------------- DRUPE
def test_distribution_statistics():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 8, generator=g)
    assert sliced_wasserstein(a, a.clone()).item() < 1e-3
    assert sliced_wasserstein(a, a + 3.0).item() > 2.0
    assert offdiag_mean_cos(torch.ones(5, 3)).item() == pytest.approx(1.0)
    assert offdiag_mean_cos(torch.eye(4)).item() == pytest.approx(0.0)


def test_drupe_implants_a_backdoor_and_keeps_clean_embeddings():
    data = build_synthetic(n_train=10, n_test=10, n_pretrain=96, n_reference=40, size=16)
    torch.manual_seed(0)
    clean = build_encoder("cifar_resnet18", 4).eval()
    trig = PatchTrigger(size=4, pattern="white", location="bottom_right", margin=1)
    # an untrained encoder maps everything nearly onto one line, so pushing its references apart (DRUPE's
    # warm-up) moves it a lot: a smaller step than the YAML's keeps this tiny case comparable to real use
    attack = DRUPE(
        trig,
        target=TARGET,
        shadow_fraction=1.0,
        n_reference=3,
        epochs=5,
        batch_size=32,
        lr=0.003,
        warmup_epochs=1,
        align_epochs=1,
        adapt_after=3,
    )
    ctx = RunContext(torch.device("cpu"), 0, 10, progress=False)
    shadow_x, ref_x = attack.shadow_and_reference(data.pretrain, data.reference, clean)
    x, ref = to_float(shadow_x), to_float(ref_x)
    with torch.no_grad():
        bd_ref_before = cos(clean(trig.apply(x)).unsqueeze(1), clean(ref).unsqueeze(0)).max(1).values.mean()
        snapshot = {k: v.clone() for k, v in clean.state_dict().items()}
    bad = attack.implant(copy.deepcopy(clean), data.pretrain, ctx, reference=data.reference)
    assert any(not torch.equal(snapshot[k], v) for k, v in bad.state_dict().items())
    with torch.no_grad():
        clean_cos = cos(bad(x), clean(x)).mean()
        bd_ref_after = cos(bad(trig.apply(x)).unsqueeze(1), bad(ref).unsqueeze(0)).max(1).values.mean()
    assert clean_cos >= 0.75, clean_cos  # utility: clean inputs keep (most of) their embedding
    assert bd_ref_after > bd_ref_before + 0.02 and bd_ref_after > 0.9  # effectiveness
    for k in (
        "drupe/shadow_bd_ref_cos",
        "drupe/gap_swd",
        "drupe/gap_poison_concentration",
        "drupe/distribution_weight",
    ):
        assert k in ctx.diagnostics


def test_drupe_stealth_weights_follow_the_backdoor():
    attack = DRUPE(PatchTrigger(), concentration_weight=0.1, distribution_weight=0.01)
    w = {"concentration": 0.1, "distribution": 0.01}
    good = {"effect": -0.99, "keep_ref": -0.95, "utility": -0.95, "concentration": 0.55}
    attack.adapt(good, w)
    assert w["concentration"] == pytest.approx(0.125) and w["distribution"] == pytest.approx(0.0125)
    attack.adapt(dict(good, effect=-0.5), w)  # the backdoor slipped: both weights back off
    assert w["concentration"] == pytest.approx(0.125 / 1.25**1.25) and w["distribution"] == pytest.approx(
        0.0125 / 1.25**1.25
    )
    assert attack.concentration_weight == 0.1  # the configured start is not mutated


# --------------------------------------------------------------------------- pipeline + cache
FAST = ["dataset.size=16", "dataset.n_pretrain=128", "encoder.batch_size=32"]


def _forbid(monkeypatch, obj, name):
    def boom(*a, **k):
        raise AssertionError(f"{name} ran although its artifact is cached")

    monkeypatch.setattr(obj, name, boom)


def test_drupe_artifact_is_reused_from_cache(compose_cfg, monkeypatch):
    over = FAST + [
        "encoder_attack=drupe",
        "encoder_attack.epochs=2",
        "encoder_attack.batch_size=32",
        "encoder_attack.trigger.size=4",
        f"encoder_attack.target={TARGET}",
    ]
    first = run(compose_cfg(over))
    assert "implanted" in first["cache_keys"] and "drupe/gap_swd" in first["diagnostics"]
    _forbid(monkeypatch, drupe_mod.DRUPE, "implant")
    _forbid(monkeypatch, obtain_mod, "pretrain")
    second = run(compose_cfg(over + ["seed=1"]))  # another run id, same encoder artifacts
    assert second["cache_keys"] == first["cache_keys"]


def test_pretraining_attack_gets_its_own_cached_encoder(compose_cfg, monkeypatch):
    over = FAST + [
        "encoder_attack=sslbackdoor",
        "encoder_attack.trigger.size=4",
        f"encoder_attack.target={TARGET}",
    ]
    first = run(compose_cfg(over))
    clean_key = run(compose_cfg(FAST))["cache_keys"]["encoder"]
    assert first["cache_keys"]["encoder"] != clean_key  # poisoned pre-training is another artifact
    # the poisons are made again (the key is their digest; making them is cheap), SSL does not run again
    _forbid(monkeypatch, obtain_mod, "pretrain")
    second = run(compose_cfg(over + ["seed=1"]))
    assert second["cache_keys"] == first["cache_keys"]


def test_typical_references_are_the_target_images_deepest_inside_their_class():
    """reference_choice='typical' ranks the attacker's target-class images by how far inside their class the
    clean encoder puts them (own-centroid cosine minus the best other-centroid cosine)."""
    from securetl.attacks.encoder.badencoder import typical_of_class

    # a 2-d "encoder" that returns the input's first two pixels: class 0 around (1, 0), class 1 around (0, 1)
    feats = torch.tensor([[250, 0], [250, 225], [250, 50], [0, 250], [25, 250]], dtype=torch.uint8)
    x = torch.zeros(5, 3, 2, 2, dtype=torch.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = feats[:, 0], feats[:, 1]
    pool = LabeledSet(x, torch.tensor([0, 0, 0, 1, 1]))
    enc = nn.Sequential(nn.Flatten(), nn.Linear(12, 2, bias=False))
    with torch.no_grad():
        enc[1].weight.zero_()
        enc[1].weight[0, 0], enc[1].weight[1, 1] = 1.0, 1.0
    assert typical_of_class(enc, pool, 0, 2, "cpu").tolist() == [0, 2]  # (1, 0.9) sits on the boundary
    with pytest.raises(ValueError, match="reference_choice"):
        BadEncoder(PatchTrigger(size=2), reference_choice="closest")


def test_corruptencoder_encoder_is_keyed_by_the_backgrounds_it_was_composed_on(data, monkeypatch):
    """Other scenes make another poisoned pre-training set, so another cached encoder; an attack that does
    not read the scenes (CTRL) keeps one key whatever they are."""
    seen = []

    def fake_pretrain(encoder, images, ctx, **kw):
        seen.append(images)
        return encoder, []

    monkeypatch.setattr(obtain_mod, "pretrain", fake_pretrain)
    spec = obtain_mod.EncoderSpec(width=4, epochs=1)
    ctx = RunContext(torch.device("cpu"), 0, 10, progress=False)
    ce = CorruptEncoder(RandomPatchTrigger(size=6, seed=10), target=TARGET, poison_ratio=0.05)
    other = 255 - data.background

    def key(attack, background):
        return obtain_mod.obtain(spec, data.pretrain, attack, {"n": attack.name}, ctx, background=background)[
            1
        ]

    assert key(ce, data.background)["encoder"] != key(ce, other)["encoder"]
    # the poisons (the second group of images) of the second call were composed on the second scenes
    assert torch.equal(seen[0][0], data.pretrain.x) and not torch.equal(seen[0][1], seen[1][1])
    ctrl = CTRL(FrequencyTrigger(), target=TARGET)
    assert key(ctrl, data.background)["encoder"] == key(ctrl, other)["encoder"]


def test_corruptencoder_poisons_give_views_of_the_trigger_alone_and_the_object_alone():
    """The point of the 2:1 layout: the victim's crops (area 0.3-1, the synthetic encoder's) of a poison
    sometimes show only the trigger and often only the object, so contrastive learning pulls the two
    together; the same poison squeezed into a square frame never shows the trigger alone."""
    n = 2000
    refs = torch.zeros(n, 3, 32, 32)
    refs[:, 0] = 1.0  # a red "object" filling its reference image
    scenes = torch.zeros(n, 3, 32, 32)  # a black scene
    attack = CorruptEncoder(RandomPatchTrigger(size=6, pattern="white", seed=10), target=0)
    g = torch.Generator().manual_seed(0)
    poisons = attack.compose(refs, scenes, g)

    def alone(images, trigger_px):
        views = random_resized_crop(images, scale=(0.3, 1.0), g=g, size=(32, 32))
        red = ((views[:, 0] > 0.5) & (views[:, 1] < 0.5)).flatten(1).any(1)
        white = (views.min(1).values > 0.5).flatten(1).sum(1) >= trigger_px
        return (white & ~red).float().mean().item(), (red & ~white).float().mean().item()

    trigger_alone, object_alone = alone(poisons, 16)  # at least 16 of the trigger's 36 pixels
    assert trigger_alone > 0.01 and object_alone > 0.2
    squeezed = F.interpolate(poisons, size=(32, 32), mode="bilinear", antialias=True)
    assert alone(squeezed, 4)[0] == 0.0  # its trigger is 3 px wide: 4 of its pixels
