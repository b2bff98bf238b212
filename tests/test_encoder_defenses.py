"""Encoder-level defenses (issue 22): DECREE and distillation.

DECREE: on a toy encoder with a planted trigger (a 3 x 3 white patch sends every image to one embedding) the inverted
trigger sits on the patch and collapses a batch of clean images, and the statistic (PL1) is far lower than for the
same toy without the backdoor; the inversion is cached; its threshold calibration (scripts/decree_calibrate.py) reads
clean encoders only and writes a delta. Distillation: every loss term is smallest between identical networks; the
attention loss brings the student's attention maps closer to the teacher's; the student options build what they say.
Both run end to end through the pipeline at tiny sizes under probe=linear and probe=finetune, see nothing of the test
split, act on the verdict as configured, and refuse clean_fraction=0."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from conftest import ROOT, load_script
from securetl.cache import Cache
from securetl.defenses import decree as decree_mod
from securetl.defenses.decree import DECREE, Abstain, pl1, self_cosine
from securetl.defenses.distill import (
    LOSSES,
    Distillation,
    attention_distance,
    distillation_term,
    reinitialised,
    state_digest,
)
from securetl.encoders.resnet import Encoder, cifar_resnet18
from securetl.interfaces import LabeledSet, RunContext, to_uint8
from securetl.pipeline import run
from securetl.probe import Probe
from securetl.ssl.methods import SimCLR
from securetl.tables import build_table, flatten, load_preset
from securetl.validate import ConfigError


def _ctx(clean: LabeledSet | None = None, cache: Cache | None = None, num_classes: int = 10) -> RunContext:
    return RunContext(
        device=torch.device("cpu"), seed=0, num_classes=num_classes, progress=False, clean=clean, cache=cache
    )


# --------------------------------------------------------------------------- DECREE on a toy encoder
SIDE, ROW, COL = 16, 11, 11  # the planted 3 x 3 patch covers rows and columns 11-13


def _images(n: int, g: torch.Generator) -> torch.Tensor:
    """Pixel noise in [0, 0.5]: every region of an image varies, so collapsing clean images takes most of them."""
    return 0.5 * torch.rand(n, 3, SIDE, SIDE, generator=g)


class ToyEncoder(nn.Module):
    """Per-pixel bounded features, randomly projected to 32 dimensions and centred on clean images (a batch's clean
    embeddings are near-orthogonal). With `backdoor`, a bright patch at (ROW, COL) blends the embedding into one fixed
    direction: the planted trigger, as BadEncoder makes it (triggered inputs -> one target embedding)."""

    def __init__(self, backdoor: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.proj = nn.Linear(16 * SIDE * SIDE, 32)
        self.register_buffer("armed", torch.tensor(float(backdoor)))  # in the state: the cache key sees it
        self.register_buffer("target", F.normalize(torch.randn(32), dim=0))
        with torch.no_grad():
            self.register_buffer(
                "centre", self.features(_images(256, torch.Generator().manual_seed(99))).mean(0)
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(20 * self.conv(x - 0.25)).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x) - self.centre
        s = (
            self.armed
            * torch.sigmoid(12 * (x[:, :, ROW : ROW + 3, COL : COL + 3].mean((1, 2, 3)) - 0.6))[:, None]
        )
        return (1 - s) * z + s * 10 * self.target


def _toy_decree(**kw) -> DECREE:
    return DECREE(**({"threshold": 0.2, "steps": 400, "batch_size": 64} | kw))


@pytest.fixture(scope="module")
def toy_inversions():
    """DECREE on the backdoored and on the clean toy encoder (64 clean images, the same for both)."""
    images = to_uint8(_images(64, torch.Generator().manual_seed(0)))
    out = {}
    for backdoor in (True, False):
        d = _toy_decree()
        d.detect(ToyEncoder(backdoor).eval(), images, _ctx())
        out[backdoor] = d
    return out


def test_self_cosine_is_one_for_a_collapsed_batch_and_near_zero_for_orthogonal_embeddings():
    v = torch.randn(1, 8)
    assert float(self_cosine(v.repeat(5, 1))) == pytest.approx(1.0, abs=1e-6)
    assert float(self_cosine(3 * torch.eye(6))) == pytest.approx(0.0, abs=1e-6)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # pairs: 0, 1/sqrt 2, 1/sqrt 2
    assert float(self_cosine(a)) == pytest.approx(2**0.5 / 3, abs=1e-6)


def test_the_inverted_trigger_sits_on_the_planted_patch_and_drives_the_batch_together(toy_inversions):
    inv = toy_inversions[True].inverted
    assert inv.found and inv.score > 0.99
    mask = inv.mask
    assert float(mask[ROW : ROW + 3, COL : COL + 3].sum()) / float(mask.sum()) > 0.8, mask
    # on images the inversion never saw: clean embeddings are spread out, stamped ones collapse onto one direction
    enc = ToyEncoder(True).eval()
    fresh = _images(64, torch.Generator().manual_seed(5))
    with torch.no_grad():
        clean_cos = float(self_cosine(enc(fresh)))
        stamped_cos = float(self_cosine(enc((1 - mask) * fresh + mask * inv.pattern)))
    assert clean_cos < 0.2 and stamped_cos > 0.98, (clean_cos, stamped_cos)


def test_the_statistic_is_far_lower_for_the_backdoored_toy_than_for_the_clean_one(toy_inversions):
    bd, clean = toy_inversions[True].diagnostics, toy_inversions[False].diagnostics
    assert bd["decree/found"] and clean["decree/found"]
    assert bd["decree/pl1"] < 0.25 * clean["decree/pl1"], (bd["decree/pl1"], clean["decree/pl1"])
    # at most the patch for the backdoored toy; far more for the clean one
    assert bd["decree/pl1"] < 9 / SIDE**2 < clean["decree/pl1"]
    # the verdict at a threshold between them (0.2, as calibrated on clean encoders only)
    assert bd["decree/flagged"] is True and clean["decree/flagged"] is False
    # PL1 is the 3-channel L1 over the 3HW input values
    assert bd["decree/pl1"] == pytest.approx(bd["decree/l1"] / (3 * SIDE * SIDE))


def test_statistic_of_an_inversion_that_never_succeeded_is_the_whole_image():
    inv = decree_mod.Inverted(torch.full((4, 4), 0.01), torch.zeros(3, 4, 4), 0.48, 0.3, False, 10, 1e-5)
    assert pl1(inv, (3, 4, 4)) == 1.0
    found = dataclasses.replace(inv, found=True)
    assert pl1(found, (3, 4, 4)) == pytest.approx(0.48 / 48)
    square = decree_mod.square_mask(32, 32)
    assert (
        float(square.sum()) == pytest.approx(22 * 22, abs=1e-3) and square[5, 5] == 1 and square[4, 4] < 1e-6
    )


def test_the_inversion_is_cached_on_the_encoder_the_images_and_the_settings(tmp_path, monkeypatch):
    images = to_uint8(_images(32, torch.Generator().manual_seed(1)))
    ctx = _ctx(cache=Cache(tmp_path))
    first = _toy_decree(steps=30)
    first.detect(ToyEncoder(True).eval(), images, ctx)
    # the verdict's settings are not part of the key
    again = _toy_decree(steps=30, threshold=0.5, action="continue")

    def no_inversion(*a, **k):
        raise AssertionError("inverted again")

    monkeypatch.setattr(again, "invert", no_inversion)
    again.detect(ToyEncoder(True).eval(), images, ctx)
    assert again.diagnostics["decree/pl1"] == first.diagnostics["decree/pl1"]
    assert torch.equal(again.inverted.mask, first.inverted.mask)
    assert again.diagnostics["decree/threshold"] == 0.5
    # another encoder, or other inversion settings: inverted again
    for other, enc in ((_toy_decree(steps=30), ToyEncoder(False)), (_toy_decree(steps=31), ToyEncoder(True))):
        monkeypatch.setattr(other, "invert", no_inversion)
        with pytest.raises(AssertionError, match="inverted again"):
            other.detect(enc.eval(), images, ctx)


def test_decree_settings_are_checked_before_any_work():
    with pytest.raises(ValueError, match="decree_calibrate") as e:
        DECREE(threshold=None, action="refuse")
    assert "\n" not in str(e.value)
    DECREE(threshold=None, action="continue")  # the statistic alone needs no threshold
    with pytest.raises(ValueError, match="action"):
        DECREE(threshold=0.1, action="ignore")
    with pytest.raises(ValueError, match="lr_steps"):
        DECREE(threshold=0.1, lr_steps=(1, 2), lr_values=(0.1,))
    assert DECREE(threshold=0.1, action="distill").knowledge.trains_encoder
    assert not DECREE(threshold=0.1).knowledge.trains_encoder


def test_a_refused_encoder_answers_no_class():
    logits = Abstain(4)(torch.randn(3, 7))
    assert logits.shape == (3, 5) and (logits.argmax(1) == 4).all()


# --------------------------------------------------------------------------- distillation: losses and student
def _stages(enc: Encoder, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    outs = enc.eval().forward_stages(x)
    return [outs[i] for i in (1, 2, 3, 4)], Encoder.pool(outs[-1])


@pytest.mark.parametrize("loss", LOSSES)
def test_every_distillation_term_is_smallest_between_identical_networks(loss):
    torch.manual_seed(0)
    a, b = cifar_resnet18(width=4), cifar_resnet18(width=4)
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hs, es = _stages(a, x)
        ho, eo = _stages(b, x)
        same = float(distillation_term(loss, hs, hs, es, es))
        other = float(distillation_term(loss, hs, ho, es, eo))
    floor = -1.0 if loss == "clone" else 0.0  # minus the cosine of an embedding with itself
    assert same == pytest.approx(floor, abs=1e-5) and other > same + 1e-6, (loss, same, other)


def _distil(loss_weight: float | None, ssl_weight: float, steps: int = 30):
    """A random student distilled from a random teacher on 64 noise images (views: flips only, so that the maps the
    loss compares are those of the images the distance is measured on); (distance before, after, teacher)."""
    torch.manual_seed(0)
    teacher = cifar_resnet18(width=4).eval().requires_grad_(False)
    student = cifar_resnet18(width=4)
    images = to_uint8(torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(2)))
    ctx = _ctx()
    flips_only = {"crop_scale_min": 1.0, "jitter": 0.0, "hue": 0.0, "gray_prob": 0.0}
    d = Distillation(loss="attention", loss_weight=loss_weight, ssl_weight=ssl_weight, clone_weight=0.0,
                     steps=steps, batch_size=32, lr=1e-2, augment=flips_only)  # fmt: skip
    before = attention_distance(student, teacher, images, ctx, [1, 2, 3, 4])
    torch.manual_seed(1)
    history = d.distillation_loop(
        SimCLR(student), teacher, images, ctx, torch.Generator().manual_seed(3), steps
    )
    assert (
        len(history) == 2
    )  # 64 images at batch 32, two steps an epoch: read after 26 steps, then at the end
    return before, attention_distance(student, teacher, images, ctx, [1, 2, 3, 4]), teacher


def test_attention_distillation_brings_the_students_maps_to_the_teachers():
    before, after, teacher = _distil(loss_weight=None, ssl_weight=0.0)  # AT at MIMIC's 1000 per stage
    assert after < 0.7 * before, (before, after)
    assert all(not q.requires_grad for q in teacher.parameters())  # the teacher only shows the way
    # the student's own SSL loss alone does not do it: the attention term does
    _, control, _ = _distil(loss_weight=0.0, ssl_weight=1.0)
    assert after < 0.7 * control, (after, control)


def test_student_options_build_what_they_say():
    torch.manual_seed(0)
    received = cifar_resnet18(width=4).eval()
    ctx = _ctx()
    fresh = Distillation(student="warmup").student_init(received, ctx)
    assert state_digest(fresh) != state_digest(received)
    assert state_digest(Distillation(student="random").student_init(received, ctx)) == state_digest(fresh)
    assert state_digest(Distillation(student="received").student_init(received, ctx)) == state_digest(
        received
    )
    assert all(q.requires_grad for q in fresh.parameters())
    wide = Distillation(student_width=8).student_init(received, ctx)
    assert wide.feat_dim == 64 and torch.equal(wide.mean, received.mean)
    # reinitialised: the same architecture, other weights, the same draw for the same seed
    again = reinitialised(received, 3)
    assert state_digest(again) == state_digest(reinitialised(received, 3)) != state_digest(received)
    # what a loss cannot compare is refused before any training (one line)
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ConfigError, match="clone") as e:
        Distillation(student_width=8)._check(wide, received, x, ctx)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="hint"):
        Distillation(loss="hint", clone_weight=0.0)._check(wide, received, x, ctx)
    maps = Distillation(loss="sp", clone_weight=0.0)._check(wide, received, x, ctx)  # widths may differ
    assert maps == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="stages"):
        Distillation(stages=(1, 7))._check(fresh, received, x, ctx)


def test_distillation_settings_are_checked_before_any_work():
    for bad in ({"loss": "kl"}, {"teacher": "pruned"}, {"student": "scratch"}, {"steps": -1},
                {"student": "received", "student_width": 8}, {"augment": {"not_a_key": 1}}):  # fmt: skip
        with pytest.raises((ValueError, TypeError)):
            Distillation(**bad)
    assert (
        Distillation(loss="sp").s.loss_weight == 3000.0 and Distillation(loss_weight=5).s.loss_weight == 5.0
    )


# --------------------------------------------------------------------------- end to end, knowledge
# The tiny encoder is pre-trained for 3 epochs, not TINY's 1, under probe=finetune (at 1 some features are dead and the
# fine-tuned weights turn NaN; tests/test_baselines_nad_nc.py).
FT = ["probe=finetune", "encoder.epochs=3"]
DECREE_TINY = ["defense=decree", "defense.steps=20"]
DISTILL_TINY = [
    "defense.teacher_steps=2",
    "defense.warmup_steps=2",
    "defense.steps=3",
    "defense.batch_size=16",
]
CASES = {
    # threshold 1.01 > any PL1: always flagged, so every action's path runs
    "decree_refuse_linear": [*DECREE_TINY, "defense.threshold=1.01"],
    "decree_fallback_finetune": [*DECREE_TINY, *FT, "defense.threshold=1.01", "defense.action=fallback"],
    "decree_distill_linear": [
        *DECREE_TINY, "defense.threshold=1.01", "defense.action=distill",
        *(o.replace("defense.", "defense.distill.") for o in DISTILL_TINY),
    ],
    "distill_linear": ["defense=distill", *DISTILL_TINY],
    # Threat-1 (a BadEncoder-implanted encoder, next to the spy's BadNets data): the setting the paper defends
    "distill_badencoder_linear": [
        "encoder_attack=badencoder", "encoder_attack.epochs=1", "defense=distill", *DISTILL_TINY,
    ],
    "distill_finetune": ["defense=distill", *DISTILL_TINY, *FT, "defense.loss=sp"],
}  # fmt: skip


@pytest.fixture
def shared_cache(tmp_path_factory, monkeypatch):
    """One encoder cache for this file's runs (the same tiny encoder configs every time)."""
    path = tmp_path_factory.getbasetemp() / "encoder_defenses_cache"
    yield lambda: monkeypatch.setenv("SECURETL_CACHE_DIR", str(path))


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r.numpy().tobytes()) for r in x}


@pytest.mark.parametrize("case", list(CASES))
def test_runs_end_to_end_with_no_handle_on_test_data(spy_run, shared_cache, case):
    shared_cache()
    row, seen, splits = spy_run(CASES[case])
    d, k = row["diagnostics"], row["knowledge"]
    assert k["needs_clean"] is True and k["n_clean"] == 20  # 0.05 x 300 -> 2 a class
    assert 0.0 <= row["metrics"]["acc"] <= 1.0
    if case.startswith("decree"):
        assert d["decree/flagged"] is True and d["decree/threshold"] == 1.01 and 0 <= d["decree/pl1"] <= 1
        assert d["decree/n_images"] == 20 and d["decree/action"] == case.split("_")[1]
    if case == "decree_refuse_linear":
        assert row["metrics"]["acc"] == 0.0 and row["metrics"]["asr"] == 0.0  # nothing deployed
    if "distill" in case:
        assert d["distill/distilled"] is True and k["trains_encoder"] is True
        assert np.isfinite(d["distill/at_distance_after"]) and d["distill/n_clean"] == 20
    # what the defense received: the encoder, D as a bare LabeledSet, the probe and its own context; nothing in
    # them is (a view of) the test images, and its clean share is disjoint from them
    train, ctx = seen["train"], seen["ctx"]
    assert type(train) is LabeledSet and [f.name for f in dataclasses.fields(train)] == ["x", "y"]
    assert not {f.name for f in dataclasses.fields(RunContext)} & {"test", "splits", "poison_idx", "target"}
    test_ptr = splits.test.x.untyped_storage().data_ptr()
    tensors = [
        train.x,
        train.y,
        ctx.clean.x,
        ctx.clean.y,
        *seen["encoder"].parameters(),
        *seen["encoder"].buffers(),
    ]
    assert all(t.untyped_storage().data_ptr() != test_ptr for t in tensors)
    assert not _rows(ctx.clean.x) & _rows(splits.test.x)


def _same_metrics(row: dict, ref: dict) -> bool:
    """The same ACC and ASR: bit for bit on CPU; within 1 point on CUDA (autotuned kernels need not repeat)."""
    tol = 0.0 if row["device"] == "cpu" else 0.01
    return all(abs(row["metrics"][m] - ref["metrics"][m]) <= tol for m in ("acc", "asr"))


def test_decree_continue_and_an_unflagged_encoder_change_nothing(compose_cfg, shared_cache):
    shared_cache()
    none = run(compose_cfg(["data_attack=badnets"]))
    for extra in (["defense.action=continue"], ["defense.threshold=0"]):  # no verdict / never flagged
        row = run(compose_cfg(["data_attack=badnets", *DECREE_TINY, *extra]))
        assert row["diagnostics"]["decree/action"] == "continue" and _same_metrics(row, none)
    assert row["diagnostics"]["decree/flagged"] is False
    # distillation with no steps is the received encoder too (the "before" column of distill_synthetic)
    row = run(compose_cfg(["data_attack=badnets", "defense=distill", "defense.steps=0"]))
    assert row["diagnostics"]["distill/distilled"] is False and _same_metrics(row, none)


def test_decree_needs_a_calibrated_threshold_to_act(compose_cfg):
    with pytest.raises(ConfigError, match="decree_calibrate") as e:
        run(compose_cfg(["defense=decree"]))  # the YAML's threshold is null until calibrated
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "method,make", [("decree", lambda: DECREE(threshold=0.1)), ("distill", Distillation)]
)
def test_refuses_clean_fraction_zero(compose_cfg, method, make):
    calibrated = ["defense.threshold=0.1"] if method == "decree" else []
    with pytest.raises(ConfigError, match="needs clean") as e:
        run(compose_cfg([f"defense={method}", "defense.clean_fraction=0", *calibrated]))
    assert "\n" not in str(e.value)
    # called directly without a clean share, the method itself refuses, before any work
    with pytest.raises(ValueError, match="clean reserve") as e:
        make().train(None, None, Probe("linear"), _ctx())
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- calibration and the tables
def _script():
    return load_script("decree_calibrate")


def test_threshold_rules_and_the_delta_they_write(tmp_path):
    cal = _script()
    pl1s = [0.30, 0.32, 0.28, 0.31, 0.29]
    mad = cal.threshold_from(pl1s, "mad", 2.0)
    assert mad["median"] == pytest.approx(0.30) and mad["mad"] == pytest.approx(0.01 * 1.4826)
    assert mad["threshold"] == pytest.approx(0.30 - 2 * 0.014826)
    assert cal.threshold_from(pl1s, "min")["threshold"] == pytest.approx(0.28)
    # the default reads log PL1: positive however wide the spread, the median's geometric scale
    wide = [0.002, 0.05, 0.3, 0.31, 0.6]
    assert cal.threshold_from(wide, "mad")["threshold"] < 0 < cal.threshold_from(wide)["threshold"] < 0.3
    logmad = cal.threshold_from(pl1s)
    assert logmad["rule"] == "logmad" and 0.27 < logmad["threshold"] < mad["threshold"] + 0.005
    # into a delta file: its other entries and comments stay, a second calibration replaces the first
    delta = tmp_path / "synthetic.yaml"
    delta.write_text(
        "# keep me\ndata_attack:\n  tact: {poison_rate: 0.0375}\ndefense:\n  anp: {nb_iter: 300}\n"
    )
    cal.write_delta(delta, 0.2512345, "first")
    cal.write_delta(delta, 0.125, "second")
    node = OmegaConf.load(delta)
    assert node.defense.decree.threshold == 0.125 and node.defense.anp.nb_iter == 300
    assert node.data_attack.tact.poison_rate == 0.0375 and delta.read_text().startswith("# keep me")
    bare = tmp_path / "other.yaml"
    cal.write_delta(bare, 0.5, "new file")
    assert OmegaConf.load(bare).defense.decree.threshold == 0.5
    # the report: AUROC of PL1 per attack against the clean encoders of the same SSL method
    assert cal.auroc([0.3, 0.4], [0.01, 0.02]) == 1.0 and cal.auroc([0.3], [0.3]) == 0.5


def test_a_calibrated_threshold_reaches_decree_through_the_dataset_delta(compose_cfg):
    """What `--write` leaves in conf/deltas/<dataset>.yaml sets every DECREE run's threshold, in its config (run_id);
    the calibration runs' own `defense.threshold=null` wins over it."""
    from omegaconf import open_dict

    from securetl.deltas import apply_deltas
    from securetl.results import choices_of

    for over, expect in ((["defense=decree"], 0.123), (["defense=decree", "defense.threshold=null"], None)):
        cfg = compose_cfg(over, tiny=False)
        with open_dict(cfg):
            OmegaConf.update(cfg, "deltas.defense.decree", {"threshold": 0.123}, force_add=True)
        apply_deltas(cfg, choices_of(cfg), over)
        assert cfg.defense.threshold == expect


def test_calibration_runs_clean_encoders_only(compose_cfg, monkeypatch, shared_cache):
    """The script's runs: encoder_attack=none, action=continue, threshold null (the delta never applies)."""
    cal = _script()
    runs = cal.run_overrides(
        ["synthetic_simclr_resnet18", "synthetic_byol_resnet18"], [100, 101], ["device=cpu"]
    )
    assert len(runs) == 4 and all("encoder_attack=none" in r and "defense.action=continue" in r for r in runs)
    assert all("defense.threshold=null" in r and "data_attack=none" in r for r in runs)
    with pytest.raises(SystemExit, match="--encoders"):
        cal.main(["encoder_attack=badencoder"])
    # one tiny calibration run through the pipeline
    shared_cache()
    seen = []
    monkeypatch.setattr(cal, "compose", lambda o: seen.append(o) or compose_cfg(o))
    rows = cal.run_all(cal.run_overrides(["synthetic_simclr_resnet18"], [100], DECREE_TINY[1:]))
    assert rows[0]["choices"]["encoder_attack"] == "none" and rows[0]["config"]["encoder"]["seed"] == 100
    assert rows[0]["diagnostics"]["decree/flagged"] is None and 0 < rows[0]["diagnostics"]["decree/pl1"] <= 1


def _row(encoder: str, attack: str, enc_seed: int, pl1_value: float, flagged: bool) -> dict:
    return {
        "choices": {"dataset": "synthetic", "encoder": encoder, "encoder_attack": attack, "data_attack": "none",
                    "defense": "decree", "probe": "linear"},
        "seed": 0, "metrics": {"acc": 0.8, "asr": 0.1}, "timings": {"defense": 1.0},
        "diagnostics": {"decree/pl1": pl1_value, "decree/flagged": flagged, "decree/found": True},
        "config": {"encoder": {"seed": enc_seed}, "defense": {"action": "continue"}},
        "overrides": [f"encoder={encoder}", f"encoder.seed={enc_seed}", f"encoder_attack={attack}"],
    }  # fmt: skip


def test_decree_table_averages_a_cells_encoders_into_a_detection_rate():
    preset = load_preset("decree_synthetic")
    report, sweep = preset["report"], preset["sweep"]
    assert sweep["encoder_attack"] == ["none", "badencoder", "drupe", "ctrl", "sslbackdoor", "corruptencoder"]
    rows = [_row("synthetic_simclr_resnet18", "none", s, 0.3 + 0.01 * s, False) for s in range(3)]
    rows += [_row("synthetic_simclr_resnet18", "badencoder", s, 0.01, s < 2) for s in range(3)]
    keys = [*report["rows"], *report["where"], *sweep]
    disp, missing, long = build_table(flatten(rows, [k for k in keys if "." in k], set(keys)), report, sweep)
    rate = long[("diag:decree/flagged", "mean")]
    assert rate[("badencoder", "synthetic_simclr_resnet18")] == pytest.approx(2 / 3)
    assert rate[("none", "synthetic_simclr_resnet18")] == 0.0
    assert long[("diag:decree/pl1", "count")].tolist() == [3, 3]  # the three encoders of a cell
    assert not any("encoder_attack=none, encoder=synthetic_simclr_resnet18" in m for m in missing)


def test_calibration_report_separates_attacks_from_clean_encoders_of_the_same_method():
    cal = _script()
    rows = [_row("synthetic_simclr_resnet18", "none", s, 0.3 + 0.01 * s, False) for s in (0, 1, 2, 100)]
    rows += [_row("synthetic_simclr_resnet18", "badencoder", s, 0.01, True) for s in range(3)]
    rows += [_row("synthetic_simclr_resnet18", "ctrl", s, 0.305, False) for s in range(3)]
    text = cal.report(rows, 0.2, exclude_seeds={100})
    lines = {line.split("|")[2].strip(): line for line in text.splitlines()[2:]}
    assert (
        "| 3 | 0.0100 | 1.00 | 1.00 |" in lines["badencoder"]
    )  # the calibration encoder (seed 100) left out
    assert "| 0.00 | 0.67 |" in lines["ctrl"] and "| 3 | 0.3100 | 0.00 | – |" in lines["none"]


def test_distill_table_puts_before_and_after_side_by_side():
    preset = load_preset("distill_synthetic")
    report, sweep = preset["report"], preset["sweep"]
    assert (
        sweep["defense.steps"][0] == "0"
        and len(sweep["defense.loss"]) >= 2
        and len(sweep["defense.clean_fraction"]) >= 2
    )
    assert report["cols"] == ["defense.steps"] and set(sweep["encoder_attack"]) == {"badencoder", "drupe"}
    # the SSL views are the synthetic encoders' own, from the dataset's deltas (tests/test_deltas.py applies them)
    encoder = OmegaConf.load(ROOT / "conf" / "encoder" / "synthetic_simclr_resnet18.yaml")
    deltas = OmegaConf.load(ROOT / "conf" / "deltas" / "synthetic.yaml")
    assert "defense.augment" not in sweep
    assert deltas.defense.distill.augment == encoder.augment
