"""Every data attack in conf/data_attack/: counts, classes, labels, covers, triggers and bad input.

Attacks are discovered from the config folder and built exactly as a run builds them (Hydra compose +
securetl.build.build), so a new attack YAML is tested here as soon as it is added to EXPECT.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import CONF
from securetl.build import build
from securetl.data.synthetic import generate
from securetl.interfaces import to_float, to_uint8
from securetl.validate import ConfigError

ATTACKS = sorted(p.stem for p in (CONF / "data_attack").glob("*.yaml") if p.stem != "none")
TRIGGERS = sorted(p.stem for p in (CONF / "trigger").glob("*.yaml"))


def _trigger_of(attack: str) -> str | None:
    for entry in yaml.safe_load((CONF / "data_attack" / f"{attack}.yaml").read_text()).get("defaults", []):
        if isinstance(entry, dict) and "/trigger@trigger" in entry:
            return entry["/trigger@trigger"]
    return None


# the trigger nodes the data attacks use (other groups may add triggers with narrower support)
ATTACK_TRIGGERS = sorted({t for t in map(_trigger_of, ATTACKS) if t} | {"blend_noise"})


@dataclass(frozen=True)
class Spec:
    """What an attack promises. poison_from: which original classes poisons come from
    (non_target | target | source); cover_from: None (no covers) | any | cover_classes."""

    poison_from: str
    relabel: bool
    cover_from: str | None = None


EXPECT = {
    "badnets": Spec("non_target", relabel=True),
    "blended": Spec("non_target", relabel=True),
    "sig": Spec("target", relabel=False),
    "wanet": Spec("non_target", relabel=True, cover_from="any"),
    "tact": Spec("source", relabel=True, cover_from="cover_classes"),
    "adap_blend": Spec("non_target", relabel=True, cover_from="any"),
    "adap_patch": Spec("non_target", relabel=True, cover_from="any"),
}

N = 400  # 40 images per class
SMALL_DATA = ["dataset.n_train=50", "dataset.n_test=20", "dataset.n_pretrain=20", "dataset.n_reference=10"]


@pytest.fixture(scope="module")
def train():
    return generate(N, "downstream", seed=0)


@pytest.fixture(scope="module")
def nodes():
    """The composed data_attack node of every option (composed once per module)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        out = {a: compose("run", overrides=[f"data_attack={a}"]).data_attack for a in ATTACKS}
    GlobalHydra.instance().clear()
    return out


@pytest.fixture(scope="module")
def trigger_nodes():
    return {t: OmegaConf.load(CONF / "trigger" / f"{t}.yaml") for t in TRIGGERS}


def make(nodes, name: str, **changes):
    node = OmegaConf.merge(nodes[name], changes) if changes else nodes[name]
    return build(node)


# rates raised above the (tiny) paper defaults so that counts and classes are checked on many samples
RAISED = {"poison_rate": 0.05, "cover_rate": 0.04}


def raised(nodes, name: str) -> dict:
    return {k: v for k, v in RAISED.items() if k in nodes[name]}


def expected_counts(attack, n: int) -> tuple[int, int]:
    n_poison = round(attack.poison_rate * n)
    if hasattr(attack, "cross_ratio"):
        return n_poison, round(attack.poison_rate * attack.cross_ratio * n)
    return n_poison, round(getattr(attack, "cover_rate", 0.0) * n)


def test_every_attack_states_what_it_promises():
    assert set(ATTACKS) == set(EXPECT), "add the new attack's promises to EXPECT"
    assert len(ATTACKS) == 7


@pytest.mark.parametrize("rates", ["default", "raised"])
@pytest.mark.parametrize("name", ATTACKS)
def test_poisons_the_stated_count_from_the_stated_classes(nodes, train, name, rates):
    spec = EXPECT[name]
    attack = make(nodes, name, **(raised(nodes, name) if rates == "raised" else {}))
    x0, y0 = train.x.clone(), train.y.clone()
    out = attack.poison(train, torch.Generator().manual_seed(0))
    assert torch.equal(train.x, x0) and torch.equal(train.y, y0), "poison() must not modify its input"

    n_poison, n_cover = expected_counts(attack, N)
    p, c = out.poison_idx, out.cover_idx
    assert len(p) == n_poison and len(c) == n_cover
    assert len(out.train) == N and out.train.x.dtype == torch.uint8 and out.train.x.shape == train.x.shape
    assert len(torch.unique(torch.cat([p, c]))) == len(p) + len(c), "poisons and covers are distinct samples"
    assert spec.cover_from is not None or len(c) == 0

    # only the stated classes
    source = {"non_target": y0[p] != attack.target, "target": y0[p] == attack.target}
    if spec.poison_from == "source":
        source["source"] = y0[p] == attack.source_class
    assert source[spec.poison_from].all()
    if spec.cover_from == "cover_classes":
        assert torch.isin(y0[c], torch.tensor(attack.cover_classes)).all()

    # labels: poisons relabelled (or not, for clean label); covers always keep theirs
    assert (out.train.y[p] == (attack.target if spec.relabel else y0[p])).all()
    assert torch.equal(out.train.y[c], y0[c])

    # images: poisons and covers carry a trigger; every other sample is untouched
    touched = torch.zeros(N, dtype=torch.bool)
    touched[torch.cat([p, c])] = True
    assert torch.equal(out.train.x[~touched], x0[~touched]) and torch.equal(
        out.train.y[~touched], y0[~touched]
    )
    if touched.any():
        changed = (out.train.x[touched] != x0[touched]).flatten(1).any(1)
        assert changed.float().mean() >= 0.9


@pytest.mark.parametrize("name", [a for a in ATTACKS if not EXPECT[a].relabel])
def test_clean_label_attacks_never_change_a_label(nodes, train, name):
    for seed, rate in itertools.product(range(3), [0.0, 0.02, 0.1]):
        out = make(nodes, name, poison_rate=rate).poison(train, torch.Generator().manual_seed(seed))
        assert torch.equal(out.train.y, train.y)


@pytest.mark.parametrize("name", ATTACKS)
def test_poisoning_is_deterministic_for_a_seed(nodes, train, name):
    attack = make(nodes, name, **raised(nodes, name))
    a = attack.poison(train, torch.Generator().manual_seed(1))
    b = make(nodes, name, **raised(nodes, name)).poison(train, torch.Generator().manual_seed(1))
    c = attack.poison(train, torch.Generator().manual_seed(2))
    for f in ("poison_idx", "cover_idx"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert not torch.equal(a.poison_idx, c.poison_idx)


@pytest.mark.parametrize("name", ATTACKS)
def test_test_trigger_keeps_shape_dtype_range_and_is_deterministic(nodes, train, name):
    x = train.floats(slice(0, 16))
    x0 = x.clone()
    t = make(nodes, name).apply_test(x)
    assert torch.equal(x, x0), "a trigger must not modify its input"
    assert t.shape == x.shape and t.dtype == x.dtype
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    assert (t != x).flatten(1).any(1).all(), "the test trigger changes every input"
    assert torch.equal(make(nodes, name).apply_test(x), t), "rebuilt from its config, the trigger is the same"
    u = make(nodes, name).trigger.apply_uint8(train.x[:16])
    assert u.dtype == torch.uint8 and u.shape == train.x[:16].shape


@pytest.mark.parametrize("name", TRIGGERS)
def test_trigger_nodes_keep_shape_dtype_range_and_are_deterministic(trigger_nodes, train, name):
    x = train.floats(slice(0, 8))
    for dtype in (torch.float32, torch.float64):
        t = build(trigger_nodes[name]).apply(x.to(dtype))
        assert t.shape == x.shape and t.dtype == dtype
        assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
        assert torch.equal(build(trigger_nodes[name]).apply(x.to(dtype)), t)


@pytest.mark.parametrize("name", ATTACK_TRIGGERS)
def test_data_attack_triggers_fit_any_image(trigger_nodes, name):
    """Real datasets differ from the synthetic 32x32 RGB: other sizes and grayscale work too."""
    for shape in [(2, 3, 64, 48), (2, 1, 32, 32), (2, 3, 96, 96)]:
        x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
        t = build(trigger_nodes[name]).apply(x)
        assert t.shape == x.shape and not torch.equal(t, x)
        assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0


def test_triggers_differ_from_each_other(trigger_nodes, train):
    x = train.floats(slice(0, 8))
    out = {name: build(node).apply(x) for name, node in trigger_nodes.items()}
    for a, b in itertools.combinations(out, 2):
        assert not torch.allclose(out[a], out[b]), f"triggers {a} and {b} do the same thing"


def _seeded(t: str) -> bool:
    node = OmegaConf.load(CONF / "trigger" / f"{t}.yaml")
    return "seed" in node and node.get("pattern") != "kitty"  # the drawn kitty does not depend on a seed


@pytest.mark.parametrize("name", [t for t in ATTACK_TRIGGERS if _seeded(t)])
def test_seeded_triggers_follow_their_seed(trigger_nodes, train, name):
    node = trigger_nodes[name]
    x = train.floats(slice(0, 4))
    same = build(node).apply(x), build(node).apply(x)
    other = build(OmegaConf.merge(node, {"seed": int(node.seed) + 1})).apply(x)
    assert torch.equal(*same)
    assert not torch.equal(same[0], other)


def test_attacks_with_a_weaker_training_trigger_poison_with_it(nodes, train):
    """Adap-Blend/Adap-Patch train on partial, fainter triggers; test uses the full one."""
    for name in ("adap_blend", "adap_patch"):
        attack = make(nodes, name, **raised(nodes, name))
        out = attack.poison(train, torch.Generator().manual_seed(0))
        idx = torch.cat([out.poison_idx, out.cover_idx])
        full = to_uint8(attack.apply_test(to_float(train.x[idx])))
        assert (out.train.x[idx] != full).flatten(1).any(1).all(), name


def test_adap_blend_masks_the_stated_number_of_pieces(nodes, train):
    attack = make(nodes, "adap_blend", **raised(nodes, "adap_blend"))
    out = attack.poison(train, torch.Generator().manual_seed(0))
    idx = torch.cat([out.poison_idx, out.cover_idx])
    diff = (out.train.x[idx] != train.x[idx]).any(1)  # (n, 32, 32)
    side = int(attack.pieces**0.5)
    cells = diff.unflatten(1, (side, -1)).unflatten(3, (side, -1)).any(4).any(2)  # (n, side, side)
    assert (cells.flatten(1).sum(1) <= attack.pieces - attack.masked).all()
    assert (cells.flatten(1).sum(1) >= (attack.pieces - attack.masked) // 2).all()


def test_adap_patch_stamps_one_patch_per_sample_in_equal_shares(nodes, train):
    attack = make(nodes, "adap_patch", **raised(nodes, "adap_patch"))
    out = attack.poison(train, torch.Generator().manual_seed(0))
    idx = out.poison_idx
    diff = (out.train.x[idx] != train.x[idx]).any(1)
    corners = torch.stack(
        [
            diff[:, :8, :8].flatten(1).any(1),
            diff[:, :8, -8:].flatten(1).any(1),
            diff[:, -8:, :8].flatten(1).any(1),
            diff[:, -8:, -8:].flatten(1).any(1),
        ],
        1,
    )
    assert (corners.sum(1) == attack.patches_per_sample).all()
    share = corners.sum(0)
    assert int(share.max() - share.min()) <= 1


def test_wanet_noise_mode_differs_from_the_trigger(nodes, train):
    attack = make(nodes, "wanet")
    out = attack.poison(train, torch.Generator().manual_seed(0))
    c = out.cover_idx
    warped = attack.trigger.apply_uint8(train.x[c])
    assert (out.train.x[c] != warped).flatten(1).any(1).float().mean() > 0.9


def test_sig_adds_the_sinusoid_to_target_images(nodes, train):
    attack = make(nodes, "sig")
    out = attack.poison(train, torch.Generator().manual_seed(0))
    p = out.poison_idx
    expected = to_uint8(to_float(train.x[p]) + attack.trigger.signal(32))
    assert (out.train.x[p].int() - expected.int()).abs().max() <= 1


def test_asr_follows_each_attacks_definition(nodes):
    y = torch.arange(10).repeat(3)
    for name in ATTACKS:
        attack = make(nodes, name)
        mask = attack.asr_mask(y)
        if name == "tact":
            assert torch.equal(mask, y == attack.source_class)
            assert "source" in attack.asr_definition
        else:
            assert torch.equal(mask, y != attack.target)


@pytest.mark.parametrize("name", ATTACKS)
def test_threat3_composes_sharing_the_trigger(compose_cfg, name):
    """The encoder attack takes the data attack's trigger by interpolation: one ASR is reported."""
    from securetl.pipeline import triggers_in_play

    cfg = compose_cfg(
        ["encoder_attack=badencoder", f"data_attack={name}", "encoder_attack.trigger=${data_attack.trigger}"]
    )
    data_attack, encoder_attack = build(cfg.data_attack), build(cfg.encoder_attack)
    data_attack.validate(10)
    encoder_attack.validate(10)
    assert [t.source for t in triggers_in_play(data_attack, encoder_attack, cfg)] == ["shared"]


# --------------------------------------------------------------------------- bad input
def _cases():
    out = []
    for name in ATTACKS:
        for bad in (-0.1, 1.5):
            out.append((name, f"data_attack.poison_rate={bad}", "poison_rate"))
        if "cover_rate" in OmegaConf.load(CONF / "data_attack" / f"{name}.yaml"):
            for bad in (-0.01, 2.0):
                out.append((name, f"data_attack.cover_rate={bad}", "cover_rate"))
    out += [
        ("blended", "data_attack.test_alpha=0", "alpha"),
        ("blended", "data_attack.test_alpha=1.5", "alpha"),
        ("blended", "data_attack.train_alpha=-0.2", "alpha"),
        ("blended", "data_attack.trigger.alpha=0", "alpha"),
        ("adap_blend", "data_attack.train_alpha=0", "alpha"),
        ("adap_blend", "data_attack.train_alpha=1.01", "alpha"),
        ("adap_blend", "data_attack.test_alpha=2", "alpha"),
        ("adap_blend", "data_attack.pieces=15", "pieces"),
        ("adap_blend", "data_attack.mask_rate=1.0", "mask_rate"),
        ("adap_patch", "data_attack.train_alphas=[0.5,0.2,0.5,1.5]", "alpha"),
        ("adap_patch", "data_attack.train_alphas=[0.5,0.2]", "train_alphas"),
        ("adap_patch", "data_attack.trigger.alpha=0", "alpha"),
        ("adap_patch", "data_attack.patches_per_sample=0", "patches_per_sample"),
        ("tact", "data_attack.source_class=0", "source_class"),
        ("tact", "data_attack.cover_classes=[0,5]", "cover_classes"),
        ("tact", "data_attack.cover_classes=[1,5]", "cover_classes"),
        ("wanet", "data_attack.cross_ratio=-1", "cross_ratio"),
        ("wanet", "data_attack.cross_ratio=10", "cross_ratio"),
        ("wanet", "data_attack.trigger.k=1", "k"),
        ("sig", "data_attack.test_delta=0", "delta"),
        ("sig", "data_attack.trigger.delta=1.5", "delta"),
        ("adap_blend", "data_attack.trigger=${eval.reference_trigger}", "blend trigger"),
        ("wanet", "data_attack.trigger=${eval.reference_trigger}", "warp trigger"),
    ]
    return out


@pytest.mark.parametrize(
    "name,override,match", _cases(), ids=[f"{n}:{o.split('.', 1)[1]}" for n, o, _ in _cases()]
)
def test_bad_settings_raise_a_clear_error_when_built(compose_cfg, name, override, match):
    cfg = compose_cfg([f"data_attack={name}", override])
    with pytest.raises(ConfigError, match=match):
        build(cfg.data_attack)


@pytest.mark.parametrize(
    "override,match",
    [
        ("data_attack.source_class=0", "source_class"),  # source == target: fails in the constructor
        ("data_attack.source_class=10", "source_class=10"),  # not a class of this dataset: fails in validate
    ],
)
def test_bad_input_fails_before_any_training(compose_cfg, monkeypatch, override, match):
    import securetl.pipeline as pipeline

    def no_training(*args, **kwargs):
        raise AssertionError("the encoder was obtained before the configuration was checked")

    monkeypatch.setattr(pipeline, "obtain", no_training)
    with pytest.raises(ConfigError, match=match):
        pipeline.run(compose_cfg(["data_attack=tact", override, *SMALL_DATA]))


@pytest.mark.parametrize(
    "override,match",
    [
        ({"source_class": 10}, "source_class=10"),
        ({"cover_classes": [5, 12]}, "cover_classes=12"),
        ({"target": 11, "source_class": 1}, "target=11"),
    ],
)
def test_tact_checks_its_classes_against_the_dataset(nodes, override, match):
    attack = make(nodes, "tact", **override)
    with pytest.raises(ValueError, match=match):
        attack.validate(10)
    make(nodes, "tact").validate(10)


def test_clean_label_attack_says_when_the_target_class_is_too_small(nodes, train):
    attack = make(nodes, "sig", poison_rate=0.5)
    with pytest.raises(ValueError, match="target-class"):
        attack.poison(train, torch.Generator().manual_seed(0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ATTACKS)
def test_test_triggers_run_on_cuda_like_on_cpu(nodes, train, name):
    x = train.floats(slice(0, 16))
    attack = make(nodes, name)
    cpu = attack.apply_test(x)
    gpu = attack.apply_test(x.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4)
