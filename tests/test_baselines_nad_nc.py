"""NAD and Neural Cleanse (issue 21, part 2): the attention-transfer loss vanishes for identical networks and not
for different ones; trigger inversion finds a planted 3x3 patch's place on a toy CNN and the MAD test flags its
target; the inversion's adaptive lambda and early stop move as the reference codes do; both run end to end through
the pipeline at tiny sizes, see nothing of the test split, and refuse to run without clean data."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from securetl.defenses._attention import align_betas, attention_loss, attention_map, attention_transfer
from securetl.defenses._features import epochs_for
from securetl.defenses._inversion import EarlyStop, LambdaSchedule, _Best, _Lambda, invert_trigger, stamp
from securetl.defenses.nad import NAD, _Selection, nad_loss
from securetl.defenses.nc import NeuralCleanse, outliers, unlearning_set
from securetl.encoders.resnet import cifar_resnet18
from securetl.interfaces import LabeledSet, RunContext, to_uint8
from securetl.pipeline import run
from securetl.probe import Probe, _Tail, make_head, train_loop
from securetl.validate import ConfigError


def _ctx(num_classes: int = 6, clean: LabeledSet | None = None) -> RunContext:
    return RunContext(
        device=torch.device("cpu"), seed=0, num_classes=num_classes, progress=False, clean=clean
    )


# --------------------------------------------------------------------------- attention transfer
def test_attention_maps_are_unit_norm_and_the_loss_separates_networks():
    g = torch.Generator().manual_seed(0)
    fm = torch.randn(4, 8, 6, 6, generator=g)
    am = attention_map(fm)
    assert am.shape == (4, 1, 6, 6)
    assert torch.allclose(am.flatten(1).norm(dim=1), torch.ones(4), atol=1e-5)
    # the map is (|F|^2 summed over channels) / its norm: scaling the features leaves it unchanged
    assert torch.allclose(attention_map(3 * fm), am, atol=1e-6)
    assert float(attention_loss(fm, fm.clone())) == 0.0
    assert float(attention_loss(fm, torch.randn(4, 8, 6, 6, generator=g))) > 0.0
    # betas weigh the LAST stages; a zero beta is not computed
    assert align_betas([0, 0, 5000], 2) == [0.0, 5000.0]
    assert align_betas([1, 2], 4) == [0.0, 0.0, 1.0, 2.0]
    other = torch.randn(4, 8, 6, 6, generator=g)
    assert float(attention_transfer([other, fm], [fm, fm], [0.0, 5.0])) == 0.0


def test_nad_attention_term_is_zero_for_identical_networks_and_positive_for_different_ones():
    enc = cifar_resnet18(width=4).eval()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    start = len(enc.stages) - 2
    h = enc.forward_until(x, start).detach()
    y = torch.arange(8) % 3
    feats = enc.forward_from(h, start).detach()
    student = _Tail(enc, start, make_head("linear", feats, 3, 16))
    teacher = _Tail(enc, start, make_head("linear", feats, 3, 16)).eval()  # the same stages: identical maps
    student.eval()
    ce = F.cross_entropy(student(h), y)
    loss = nad_loss(teacher, [5000.0, 5000.0], 2.0)(student, h, y)
    assert torch.allclose(loss, ce, atol=1e-6)  # CE + 0
    other = cifar_resnet18(width=4).eval()  # different weights
    teacher2 = _Tail(other, start, make_head("linear", feats, 3, 16)).eval()
    loss2 = nad_loss(teacher2, [5000.0, 5000.0], 2.0)(student, h, y)
    assert float((loss2 - ce).detach()) > 0.0
    loss2.backward()
    assert all(p.grad is None for p in teacher2.parameters())  # the teacher only shows the way
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.stages.parameters())


def test_nad_selection_keeps_the_last_epoch_above_the_floor_checked_at_every_epoch_end():
    # the schedule: steps -> epochs on the clean share (at least `steps` updates)
    assert epochs_for(800, 160, 64) == 267 and epochs_for(5, 1000, 64) == 1
    # NAD's check runs at train_loop's on_epoch_end: after every epoch's last step, the last epoch included, in one
    # run of the optimiser, and training resumes in train mode after a check that evaluated the module
    seen, steps, modes = [], [0], []

    def loss_fn(m, xb, yb):
        steps[0] += 1
        modes.append(m.training)
        return F.cross_entropy(m(xb), yb)

    def check(epoch):
        seen.append((epoch, steps[0]))
        module.eval()

    module = nn.Linear(2, 2)
    x, y = torch.randn(10, 2, generator=torch.Generator().manual_seed(0)), torch.arange(10) % 2
    groups = [{"params": list(module.parameters()), "lr": 0.1}]
    g = torch.Generator().manual_seed(0)
    train_loop(
        module, x, y, _ctx(2), groups, epochs=3, batch_size=4, g=g, loss_fn=loss_fn, on_epoch_end=check
    )
    assert seen == [(1, 3), (2, 6), (3, 9)]  # three epochs of ceil(10 / 4) = 3 batches
    assert all(modes) and not module.training
    module = nn.Linear(1, 1)
    rule = _Selection(floor=0.5)
    for epoch, acc in enumerate([0.6, 0.7, 0.4, 0.55, 0.3], start=1):
        module.weight.data.fill_(epoch)
        rule.observe(epoch, acc, module)
    epoch, state = rule.choice()
    assert epoch == 4 and float(state["weight"]) == 4.0  # the LAST epoch at or above the floor, not the best
    low = _Selection(floor=0.9)
    for epoch, acc in enumerate([0.6, 0.7, 0.7, 0.3], start=1):
        low.observe(epoch, acc, module)
    assert low.choice()[0] == 3  # none reaches the floor: the best, the later one on ties


# --------------------------------------------------------------------------- trigger inversion
def test_lambda_moves_up_and_down_as_the_codes_count():
    nc = _Lambda(LambdaSchedule(init=1e-3, up=2.0, down=2.0**1.5, patience=5))
    for _ in range(4):
        nc.update(True)
    assert nc.value == 1e-3
    nc.update(True)  # the 5th success in a row
    assert nc.value == pytest.approx(2e-3) and nc.went_up and not nc.went_down
    for _ in range(5):
        nc.update(False)
    assert nc.value == pytest.approx(2e-3 / 2**1.5) and nc.went_down
    # DECREE: more than `patience`, x5 and / 5, floor with reset to the initial value
    dec = _Lambda(
        LambdaSchedule(init=1e-3, up=5.0, down=5.0, patience=2, strict=True, floor=1e-4, reset_patience=1)
    )
    for _ in range(2):
        dec.update(True)
    assert dec.value == 1e-3
    dec.update(True)
    assert dec.value == pytest.approx(5e-3)
    for _ in range(3 * 3):
        dec.update(False)
    assert dec.value == pytest.approx(5e-3 / 125)  # 4e-5: below the floor, no further division
    for _ in range(3):
        dec.update(False)
    assert dec.value == pytest.approx(4e-5)
    dec.update(True)
    assert dec.value == pytest.approx(4e-5)
    dec.update(True)  # more than reset_patience successes in a row below the floor: back to the initial value
    assert dec.value == 1e-3


def test_early_stop_counts_checks_without_a_1_percent_improvement():
    best = _Best(success=0.9, stop=EarlyStop(threshold=0.99, patience=3))
    lam = _Lambda(LambdaSchedule())
    m, p = torch.ones(2, 2), torch.ones(3, 2, 2)
    best.record(0.5, 10.0, m, p)  # not successful: nothing kept, nothing counted
    assert best.mask is None and best.stale == 0
    best.record(0.95, 10.0, m, p)  # the first successful check: nothing to compare with yet
    best.record(0.95, 9.95, m, p)  # 0.5 % better: kept, but stale
    assert best.l1 == 9.95 and best.stale == 1
    best.record(0.95, 9.0, m, p)  # 10 % better: the count restarts
    assert best.stale == 0
    for _ in range(3):
        best.record(0.95, 9.0, m, p)
    assert best.stale == 3 and not best.should_stop(lam, 1.0)  # lambda has not moved both ways yet
    lam.went_up = lam.went_down = True
    assert best.should_stop(lam, 1.0)


@pytest.mark.parametrize("per_step", [False, True], ids=["per_epoch_nc", "per_step_decree"])
def test_inversion_finds_the_smallest_mask_an_objective_needs(per_step):
    # objective: make the top-left 2x2 corner of every image bright; the smallest mask that does it is that corner
    g = torch.Generator().manual_seed(0)
    images = to_uint8(0.3 * torch.rand(64, 3, 8, 8, generator=g))

    def corner(xs):
        v = xs[:, :, :2, :2].mean()
        return -v, v

    inv = invert_trigger(
        corner, images, _ctx(), torch.Generator().manual_seed(1), epochs=60, batch_size=16, success=0.9,
        per_step=per_step, stop=EarlyStop(patience=None),
    )  # fmt: skip
    assert inv.found and inv.score >= 0.9
    assert float(inv.mask[:2, :2].sum()) / float(inv.mask.sum()) > 0.8, inv.mask
    assert inv.l1 < 8.0  # a 2x2 corner, not the 64-pixel image
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(
        stamp(x, torch.zeros(8, 8), inv.pattern), x
    )  # an empty mask leaves the image as it was


def test_inversion_recovers_from_a_non_finite_loss_and_records_it():
    """The shared inversion (NC, DECREE) is guarded like every training loop: a NaN loss in one epoch sends the mask
    and pattern back to the last finite state with a smaller step, the row records it, and the result is finite."""
    g = torch.Generator().manual_seed(0)
    images = to_uint8(0.3 * torch.rand(64, 3, 8, 8, generator=g))
    calls = {"n": 0}

    def corner(xs):
        calls["n"] += 1
        v = xs[:, :, :2, :2].mean()
        poison = float("nan") if 18 <= calls["n"] < 20 else 0.0  # two bad batches of epoch 5 (4 a epoch)
        return -v + poison, v

    ctx = _ctx()
    inv = invert_trigger(
        corner, images, ctx, torch.Generator().manual_seed(1), epochs=40, batch_size=16, success=0.9,
        stop=EarlyStop(patience=None), desc="nc/invert",
    )  # fmt: skip
    assert ctx.diagnostics["guard/nc/invert/triggers"] == 1
    assert ctx.diagnostics["guard/nc/invert"][0]["what"] == "non-finite loss"
    assert torch.isfinite(inv.mask).all() and torch.isfinite(inv.pattern).all()
    assert inv.found and inv.score >= 0.9


K, SIDE, TARGET, ROW, COL = 6, 16, 2, 12, 12  # the planted 3x3 patch covers rows 12-14, columns 12-14


def _gratings(n_per: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Toy images: class c is a sinusoidal grating at angle c pi / K with a random phase, plus noise. Telling one
    class for another needs much of the image changed; a backdoor patch needs 9 pixels."""
    y = torch.arange(K).repeat_interleave(n_per)
    rows, cols = torch.meshgrid(torch.arange(SIDE).float(), torch.arange(SIDE).float(), indexing="ij")
    theta = y.float() * math.pi / K
    u = cols[None] * torch.cos(theta)[:, None, None] + rows[None] * torch.sin(theta)[:, None, None]
    phase = torch.rand(len(y), generator=g) * 2 * math.pi
    base = 0.5 + 0.3 * torch.sin(u * 2 * math.pi / 6 + phase[:, None, None])
    x = base[:, None].repeat(1, 3, 1, 1) + 0.05 * torch.randn(len(y), 3, SIDE, SIDE, generator=g)
    return x.clamp(0, 1), y


def _patch(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, :, ROW : ROW + 3, COL : COL + 3] = 1.0
    return x


def test_nc_recovers_a_planted_patch_and_flags_its_target():
    g = torch.Generator().manual_seed(0)
    x, y = _gratings(60, g)
    poison = torch.randperm(len(y), generator=g)[: len(y) // 7]
    x[poison], y[poison] = _patch(x[poison]), TARGET
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 16, K),
    )  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(15):
        perm = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), 32):
            b = perm[s : s + 32]
            loss = F.cross_entropy(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    xt, yt = _gratings(20, g)
    with torch.no_grad():
        assert (net(xt).argmax(1) == yt).float().mean() > 0.9  # the toy model is accurate ...
        asr = (net(_patch(xt[yt != TARGET])).argmax(1) == TARGET).float().mean()
    assert asr > 0.9  # ... and backdoored

    clean, _ = _gratings(16, g)
    nc = NeuralCleanse(epochs=40, batch_size=32)
    triggers = nc.reverse_engineer(net, to_uint8(clean), _ctx(K))
    assert nc.detect(triggers) == [TARGET], nc.diagnostics
    assert nc.diagnostics["nc/anomaly_index"] > 2
    l1 = nc.diagnostics["nc/l1"]
    assert int(np.argmin(l1)) == TARGET and all(t.found for t in triggers)
    mask = triggers[TARGET].mask
    around = mask[ROW - 1 : ROW + 4, COL - 1 : COL + 4]  # the patch and a one-pixel border
    assert float(around.sum()) / float(mask.sum()) > 0.5, mask
    r, c = divmod(int(mask.argmax()), SIDE)
    assert ROW <= r < ROW + 3 and COL <= c < COL + 3
    # unlearning: fine-tuned on the clean images with 20 % stamped by the REVERSED trigger at their true labels,
    # the model forgets the planted one
    labels = torch.arange(K).repeat_interleave(16)
    mix = unlearning_set(
        LabeledSet(to_uint8(clean), labels), [triggers[TARGET]], 0.2, torch.Generator().manual_seed(3)
    )
    groups = [{"params": net.parameters(), "lr": 1e-2}]
    train_loop(
        net, mix.x, mix.y, _ctx(K), groups, epochs=10, batch_size=32, g=torch.Generator().manual_seed(4)
    )
    with torch.no_grad():
        assert (net(xt).argmax(1) == yt).float().mean() > 0.8
        assert (net(_patch(xt[yt != TARGET])).argmax(1) == TARGET).float().mean() < 0.3


def test_outliers_flag_only_small_norms():
    l1 = np.array([50.0, 52.0, 48.0, 51.0, 49.0, 5.0, 120.0])
    flagged, index = outliers(l1, 2.0)
    assert flagged == [5]  # 120 is anomalous too, but a large norm is not a backdoor
    assert index[6] > 2 and index[5] > 2
    assert outliers(np.full(5, 3.0), 2.0)[0] == []


def test_unlearning_set_stamps_a_share_of_the_clean_data_at_the_true_labels():
    g = torch.Generator().manual_seed(0)
    clean = LabeledSet(torch.zeros(20, 3, 4, 4, dtype=torch.uint8), torch.arange(20) % 5)
    from securetl.defenses._inversion import Inverted

    mask = torch.zeros(4, 4)
    mask[0, 0] = 1.0
    trig = Inverted(mask, torch.ones(3, 4, 4), 1.0, 1.0, True, 1, 1e-3)
    mix = unlearning_set(clean, [trig, trig], 0.2, g)
    assert len(mix) == 16 + 2 * 4  # 80 % clean, the other 20 % stamped once per flagged class
    stamped = mix.x[:, :, 0, 0].amax(1) == 255
    assert int(stamped.sum()) == 8 and torch.equal(
        mix.x[~stamped], torch.zeros(16, 3, 4, 4, dtype=torch.uint8)
    )
    assert torch.bincount(mix.y[stamped], minlength=5).sum() == 8
    assert sorted(mix.y[stamped][:4].tolist()) == sorted(
        mix.y[stamped][4:].tolist()
    )  # the same images, true labels


# --------------------------------------------------------------------------- end to end, knowledge
# The tiny encoder is pre-trained for 3 epochs, not TINY's 1: at 1 epoch some of its features are dead (std 0),
# the probe's standardisation divides by 1e-6 and probe=finetune's weights turn NaN within two epochs.
FT = ["probe=finetune", "encoder.epochs=3"]
CASES = {
    "nad_finetune": ["defense=nad", *FT, "defense.teacher_steps=6", "defense.student_steps=12"],
    # every below-median class is flagged, so the unlearning path runs
    "nc_finetune": [
        "defense=nc",
        *FT,
        "defense.epochs=3",
        "defense.unlearn_steps=4",
        "defense.anomaly_threshold=0",
    ],
    "nc_linear": ["defense=nc", "defense.epochs=3", "defense.unlearn_steps=4", "defense.anomaly_threshold=0"],
}
KEYS = {
    "nad": ["nad/at_stages", "nad/teacher_epochs", "nad/student_epochs", "nad/selected_epoch", "nad/holdout_acc_m0",
            "nad/holdout_acc_teacher", "nad/holdout_acc_student"],
    "nc": ["nc/l1", "nc/anomaly_index", "nc/anomaly_indices", "nc/flagged_classes", "nc/unlearned", "nc/n_stamped",
           "nc/inversion_found", "nc/unlearn_epochs"],
}  # fmt: skip


@pytest.fixture
def shared_cache(tmp_path_factory, monkeypatch):
    """One encoder cache for this file's runs (the same tiny encoder config every time)."""
    path = tmp_path_factory.getbasetemp() / "nad_nc_cache"
    yield lambda: monkeypatch.setenv("SECURETL_CACHE_DIR", str(path))


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r.numpy().tobytes()) for r in x}


@pytest.mark.parametrize("case", list(CASES))
def test_runs_end_to_end_with_no_handle_on_test_data(spy_run, shared_cache, case):
    shared_cache()
    row, seen, splits = spy_run(CASES[case])
    method = case.split("_")[0]
    d = row["diagnostics"]
    for key in KEYS[method]:
        assert key in d, (key, d)
    assert (
        row["knowledge"]["needs_clean"] is True and row["knowledge"]["n_clean"] == 20
    )  # 0.05 x 300 -> 2 a class
    assert 0.0 <= row["metrics"]["acc"] <= 1.0
    if method == "nad":
        assert d["nad/at_stages"] == [4]  # last2 = stages 3 and 4; the default betas weigh the last one
        assert d["nad/n_fit"] + d["nad/n_holdout"] == 20
    else:
        assert len(d["nc/l1"]) == 10 and d["nc/unlearned"] is True and d["nc/n_stamped"] > 0
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
    tensors += [v for v in vars(seen["probe"]).values() if isinstance(v, torch.Tensor)]
    assert all(t.untyped_storage().data_ptr() != test_ptr for t in tensors)
    assert not _rows(ctx.clean.x) & _rows(splits.test.x)


def test_nc_returns_m0_unchanged_when_no_class_is_flagged(compose_cfg, shared_cache):
    shared_cache()
    none = run(compose_cfg(["data_attack=badnets"]))
    nc = run(
        compose_cfg(
            ["data_attack=badnets", "defense=nc", "defense.epochs=2", "defense.anomaly_threshold=1e9"]
        )
    )
    assert nc["diagnostics"]["nc/unlearned"] is False and nc["diagnostics"]["nc/flagged_classes"] == []
    assert nc["metrics"]["acc"] == none["metrics"]["acc"] and nc["metrics"]["asr"] == none["metrics"]["asr"]


def test_nad_refuses_a_frozen_encoder():
    clean = LabeledSet(torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.arange(10) % 5)
    with pytest.raises(ConfigError, match="probe=finetune") as e:
        NAD().train(None, None, Probe("linear"), _ctx(5, clean))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method,cls", [("nad", NAD), ("nc", NeuralCleanse)])
def test_refuses_clean_fraction_zero(compose_cfg, method, cls):
    with pytest.raises(ConfigError, match="needs clean labelled data") as e:
        run(compose_cfg([f"defense={method}", "defense.clean_fraction=0"]))
    assert "\n" not in str(e.value)
    # called directly without a clean share, the method itself refuses, before any work
    with pytest.raises(ValueError, match="clean reserve") as e:
        cls().train(None, None, Probe("finetune"), _ctx(10, None))
    assert "\n" not in str(e.value)
