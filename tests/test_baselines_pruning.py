"""The removal baselines that prune (issue 21, part 1): FT/Fine-Pruning, ANP and RNP, and the shared channel machinery
(defenses/_pruning.py) T-Core's channel filter now uses. Pruning zeroes exactly what its scores select; ANP's noise
stays in its box; the masked BN computes what T-Core's did; every method runs end to end through the real pipeline,
sees no test data, and refuses to run without clean data."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from securetl.defenses._features import Scope, accuracy, clean_split, epochs_for, require_clean
from securetl.defenses._pruning import (
    MaskedBN,
    bn_weights,
    mask_bns,
    masked_bns,
    masks,
    prune,
    recover_masks,
    select,
    sweep,
    unlearn,
    unmask,
    within,
)
from securetl.defenses.anp import ANP, optimize_masks
from securetl.defenses.fp import FinePruning
from securetl.defenses.rnp import RNP
from securetl.encoders.resnet import cifar_resnet18
from securetl.interfaces import LabeledSet, Model, RunContext
from securetl.pipeline import run
from securetl.probe import Probe, _lr_schedule, _Tail, make_head, train_loop
from securetl.validate import ConfigError


def _encoder(width: int = 4, seed: int = 0) -> nn.Module:
    """A small encoder with BN weights and statistics that are not the initial ones (so a zero is a pruned channel,
    and running statistics matter)."""
    torch.manual_seed(seed)
    enc = cifar_resnet18(width).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return enc


def _tail(width: int = 4, classes: int = 3, n_stages: int = 2, seed: int = 0) -> _Tail:
    """The top stages of `_encoder` + a linear head."""
    enc = _encoder(width, seed)
    return _Tail(enc, len(enc.stages) - n_stages, nn.Linear(enc.feat_dim, classes)).eval()


def _acts(tail: _Tail, n: int, seed: int = 0) -> torch.Tensor:
    """Inputs of the tail's first stage for a width-4 CIFAR ResNet (stage 3 reads 8 x 16 x 16)."""
    first = tail.stages[0]
    c_in = next(m for m in first.modules() if isinstance(m, nn.Conv2d)).in_channels
    return torch.randn(n, c_in, 16, 16, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- pruning
def test_prune_by_threshold_zeroes_exactly_the_selected_channels_and_nothing_else():
    tail = _tail()
    g = torch.Generator().manual_seed(1)
    weights = bn_weights(tail)
    scores = {n: torch.rand(w.numel(), generator=g) for n, w in weights.items()}
    before = copy.deepcopy(tail.state_dict())
    chosen = prune(weights, scores, threshold=0.3)
    after = tail.state_dict()
    n_zeroed = 0
    for name, w in weights.items():
        want = scores[name] <= 0.3  # both codes' rule: mask <= threshold
        assert torch.equal(chosen[name], want)
        assert (w.detach()[want] == 0).all()
        assert torch.equal(w.detach()[~want], before[f"{name}.weight"][~want])  # bit-identical
        n_zeroed += int(want.sum())
    assert 0 < n_zeroed < sum(w.numel() for w in weights.values())
    pruned_keys = {f"{n}.weight" for n in weights}
    for key, value in before.items():  # every other tensor: biases, statistics, convs, head
        if key not in pruned_keys:
            assert torch.equal(after[key], value), key


def test_prune_by_number_takes_the_lowest_scores_over_all_layers():
    tail = _tail()
    weights = bn_weights(tail)
    g = torch.Generator().manual_seed(2)
    scores = {n: torch.rand(w.numel(), generator=g) for n, w in weights.items()}
    before = {n: w.detach().clone() for n, w in weights.items()}
    chosen = prune(weights, scores, number=17)
    flat = torch.cat(list(scores.values()))
    cut = flat.sort().values[16]
    for name, w in weights.items():
        assert torch.equal(chosen[name], scores[name] <= cut)
        assert torch.equal(w.detach()[~chosen[name]], before[name][~chosen[name]])
        assert (w.detach()[chosen[name]] == 0).all()
    assert sum(int(c.sum()) for c in chosen.values()) == 17
    assert sum(int((w.detach() == 0).sum()) for w in weights.values()) == 17
    with pytest.raises(ValueError):
        select(scores)  # neither a threshold nor a number
    with pytest.raises(ValueError):
        select(scores, threshold=0.1, number=3)


def test_prune_columns_of_a_linear_layer():
    lin = nn.Linear(6, 3)
    before = lin.weight.detach().clone()
    bias = lin.bias.detach().clone()
    scores = {"w": torch.tensor([0.5, 0.1, 0.9, 0.0, 0.3, 0.7])}
    chosen = prune({"w": lin.weight}, scores, number=3, dim=1)["w"]
    assert chosen.tolist() == [False, True, False, True, True, False]
    assert (lin.weight.detach()[:, chosen] == 0).all()
    assert torch.equal(lin.weight.detach()[:, ~chosen], before[:, ~chosen])
    assert torch.equal(lin.bias.detach(), bias)


def test_holdout_rule_and_sweep():
    assert within(0.82, 0.9, 0.1) and not within(0.80, 0.9, 0.1)  # relative: 10 % of 0.9 = 0.09
    assert within(0.95, 0.9, 0.0) and within(0.0, 0.0, 0.1)  # a rise always passes
    accs = {0: 0.9, 1: 0.85, 2: 0.7, 3: 0.84, 4: 0.6}
    # ANP / RNP: the most pruning that passes anywhere in the sweep
    assert sweep(list(accs), accs.get, 0.9, 0.1, stop_at_failure=False) == (3, list(accs.values()))
    # Fine-Pruning: pruning stops at the first failing step
    assert sweep(list(accs), accs.get, 0.9, 0.1, stop_at_failure=True) == (1, [0.9, 0.85, 0.7])
    assert sweep([1, 2], {1: 0.1, 2: 0.2}.get, 0.9, 0.1, stop_at_failure=False)[0] is None


# --------------------------------------------------------------------------- masked BN
def test_masked_bn_computes_what_tcores_did():
    from securetl.defenses.tcore import channels

    assert channels.MaskedBN is MaskedBN and channels.unmask is unmask  # one implementation
    tail = _tail()
    bn = next(m for m in tail.modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.randn(6, bn.num_features, 5, 5)
    for mask_bias in (True, False):
        m = MaskedBN.from_bn(bn, mask_bias=mask_bias)
        assert torch.equal(m.mask, torch.ones(bn.num_features)) and not m.mask.requires_grad
        for mode in (False, True):  # mask 1 = the BN itself, bit for bit, in eval and train mode
            ref, msk = copy.deepcopy(bn).train(mode), copy.deepcopy(m).train(mode)
            assert torch.equal(msk(x), ref(x))
        m.eval()
        with torch.no_grad():
            m.mask.uniform_(0, 1)
        bias = bn.bias * m.mask if mask_bias else bn.bias
        want = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight * m.mask, bias, False, 0.1, bn.eps)
        assert torch.equal(m(x), want)
        holder = nn.Sequential(m)
        folded = unmask(holder)[0]
        assert type(folded) is nn.BatchNorm2d
        assert torch.allclose(folded(x), want, atol=1e-6)
    # T-Core's Tail masks weight and bias, as before
    t = channels.Tail([tail.stages[-1]], 32, 3)
    assert all(m.mask_bias for _, m in t.bns()) and t.n_channels() > 0


def test_mask_bns_keeps_timms_bn_act_and_refuses_what_it_cannot_mask():
    """timm's BatchNormAct2d subclasses BatchNorm2d and applies dropout + an activation after the normalisation: the
    masked copy keeps them (masks at 1 = the same function) and unmask gives the BatchNormAct2d back. A BN without
    gamma (affine=False) or an unknown subclass is refused with a one-line error, not swapped for a plain BN."""
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # negative pre-activations, so that a dropped ReLU would show
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.copy_(torch.randn(4, generator=g))
                m.running_mean.copy_(torch.randn(4, generator=g))
    x = torch.randn(2, 3, 6, 6, generator=g)
    want = net(x)
    masked = mask_bns(
        copy.deepcopy(net), mask_bias=False, noise=True
    ).eval()  # new modules start in train mode
    assert isinstance(masked[1], MaskedBN) and masked[1].carries_act and isinstance(masked[1].act, nn.ReLU)
    assert isinstance(masked[3], MaskedBN) and not masked[3].carries_act
    assert torch.equal(masked(x), want)
    assert masked[1](torch.full((1, 4, 2, 2), -100.0)).max() == 0  # the ReLU is there
    assert set(masks(masked)) == {"1", "3"} and set(bn_weights(masked)) == {"1", "3"}
    back = unmask(masked)
    assert type(back[1]) is BatchNormAct2d and isinstance(back[1].act, nn.ReLU)
    assert type(back[3]) is nn.BatchNorm2d
    assert torch.equal(back(x), want)

    class OwnBN(nn.BatchNorm2d):
        pass

    for bad, match in ((nn.BatchNorm2d(4, affine=False), "affine=False"), (OwnBN(4), "cannot mask OwnBN")):
        with pytest.raises(ValueError, match=match) as e:
            mask_bns(nn.Sequential(bad))
        assert "\n" not in str(e.value)


def test_recover_masks_touches_only_masks_and_keeps_them_in_unit_interval():
    work = mask_bns(copy.deepcopy(_tail()), mask_bias=False)
    acts, y = _acts(work, 48), torch.randint(0, 3, (48,), generator=torch.Generator().manual_seed(3))
    before = {k: v.clone() for k, v in work.state_dict().items() if not k.endswith(".mask")}
    ms = recover_masks(work, acts, y, torch.Generator().manual_seed(0), epochs=3, lr=5.0, alpha=0.2)
    assert set(ms) == {n for n, _ in masked_bns(work)}
    flat = torch.cat(list(ms.values()))
    assert flat.min() >= 0 and flat.max() <= 1 and (flat < 1).any()
    after = work.state_dict()
    for k, v in before.items():
        if "running" in k or "num_batches" in k:
            continue  # train mode (RNP's codes) moves the statistics of this throwaway copy
        assert torch.equal(after[k], v), k


def test_unlearn_per_epoch_stops_at_the_threshold_and_restores_requires_grad():
    work = mask_bns(copy.deepcopy(_tail(classes=2)), mask_bias=False)
    acts = _acts(work, 64, seed=4)
    y = (acts.mean(dim=(1, 2, 3)) > 0).long()
    # fit the toy first, so there is something to unlearn
    opt = torch.optim.SGD([p for n, p in work.named_parameters() if not n.endswith(".mask")], lr=0.05)
    for _ in range(60):
        loss = F.cross_entropy(work.train()(acts), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    flags = {n: p.requires_grad for n, p in work.named_parameters()}
    weights = [p for n, p in work.named_parameters() if not n.endswith(".mask")]
    ctx = RunContext(device=torch.device("cpu"), seed=0, num_classes=2, progress=False)
    info = unlearn(
        work,
        acts,
        y,
        ctx,
        torch.Generator().manual_seed(0),
        weights,
        epochs=30,
        threshold=0.2,
        lr=0.05,
        batch_size=16,
    )
    assert info["acc"] <= 0.2 and info["epochs"] < 30
    assert info["steps"] == info["epochs"] * 4  # 64 samples at batch 16
    assert {n: p.requires_grad for n, p in work.named_parameters()} == flags
    assert all(float(m) == 1.0 for m in torch.cat(list(masks(work).values())))  # masks are not unlearned


# --------------------------------------------------------------------------- shared pieces (defenses/_features.py, train_loop)
CPU_CTX = RunContext(device=torch.device("cpu"), seed=0, num_classes=3, progress=False)


def _m0(seed: int = 0) -> Model:
    """A small 'trained' M0: an encoder (frozen, as the pipeline hands it out) + a head on its features."""
    enc = _encoder(seed=seed).requires_grad_(False)
    return Model(enc, make_head("linear", torch.randn(20, enc.feat_dim), 3, 16)).eval()


def test_scope_of_model_copies_m0s_part_and_puts_the_trained_part_back():
    m0 = _m0()
    before = copy.deepcopy(m0.state_dict())
    x = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    probe = Probe("finetune", trainable="last2", lr=0.1, encoder_lr=0.01)
    scope = Scope.of_model(m0, probe, x, CPU_CTX)
    n = len(m0.encoder.stages)
    assert scope.start == n - 2 and scope.head is m0.head
    assert torch.equal(scope.inputs, m0.encoder.forward_until(x.float() / 255, n - 2))
    module = scope.module(3, CPU_CTX)
    assert isinstance(module, _Tail) and len(module.stages) == 2
    assert all(p.requires_grad for p in module.parameters())
    # a copy: the same function as M0's part, no shared tensors
    with torch.no_grad():
        assert torch.equal(module(scope.inputs), m0.head(m0.encoder.forward_from(scope.inputs, n - 2)))
    shared = {p.data_ptr() for p in m0.parameters()} & {p.data_ptr() for p in module.parameters()}
    assert not shared
    groups = Scope.groups(module, probe, scale=0.5)
    assert [gr["lr"] for gr in groups] == [0.005, 0.05]
    assert sum(len(gr["params"]) for gr in groups) == len(list(module.parameters()))
    with torch.no_grad():
        for q in module.parameters():
            q.add_(1.0)
    model = scope.model(module)
    assert model.head is module.head and all(
        model.encoder.stages[n - 2 + i] is s for i, s in enumerate(module.stages)
    )
    for i in range(n - 2):  # the stages below the scope are M0's, copied
        for a, b in zip(model.encoder.stages[i].parameters(), m0.encoder.stages[i].parameters()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert not any(q.requires_grad for q in model.encoder.parameters())  # frozen, as encoders are handed out
    after = m0.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # M0 is not touched
    # a frozen-encoder probe: the head alone, on the encoder's features; `stages`: M0's top stages whatever the probe
    lin = Scope.of_model(m0, Probe("linear"), x, CPU_CTX)
    head = lin.module(3, CPU_CTX)
    assert lin.start is None and not isinstance(head, _Tail) and head is not m0.head
    assert lin.model(head).encoder is m0.encoder and lin.model(head).head is head
    top3 = Scope.of_model(m0, Probe("linear"), x, CPU_CTX, stages=3)
    assert top3.start == n - 3 and len(top3.module(3, CPU_CTX).stages) == 3


def test_accuracy_and_the_clean_share_checks():
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2))
        lin.bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 0, 0, 0, 1, 1])
    assert accuracy(lin, x, y, CPU_CTX) == 5 / 7  # the exact ratio (not a float32 mean)
    assert accuracy(lin, x, y, batch=2) == 5 / 7
    assert math.isnan(accuracy(lin, x[:0], y[:0], CPU_CTX))
    # every method's refusal is one line, the detectors' text unchanged
    for method in ("ASSET", "SCAn", "CT", "rnp"):
        with pytest.raises(ValueError) as e:
            require_clean(CPU_CTX, method)
        assert str(e.value) == f"{method} needs the clean reserve (defense.clean_fraction > 0)"
    clean = LabeledSet(torch.zeros(6, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 0, 1, 1, 2, 2]))
    ctx = dataclasses.replace(CPU_CTX, clean=clean)
    fit, held = clean_split(ctx, "x", 0.2, torch.Generator().manual_seed(0))
    assert torch.bincount(held.y).tolist() == [1, 1, 1] and len(fit) == 3
    one = dataclasses.replace(CPU_CTX, clean=LabeledSet(clean.x[:3], torch.arange(3)))
    fit, held = clean_split(one, "x", 0.2, torch.Generator().manual_seed(0), strict=False)
    assert len(fit) == 3 and len(held) == 0  # a caller with a fallback rule gets the empty holdout
    assert epochs_for(40, 10, 64) == 40 and epochs_for(1000, 200, 256) == 1000 and epochs_for(3, 500, 64) == 1


def _loop(schedule=None, on_epoch_end=None, epochs: int = 4, lr: float = 0.1):
    """A linear model trained by train_loop on a fixed toy set, the same draws every call."""
    torch.manual_seed(0)
    module = nn.Linear(4, 3)
    x, y = torch.randn(40, 4, generator=torch.Generator().manual_seed(1)), torch.arange(40) % 3
    g = torch.Generator().manual_seed(2)
    train_loop(
        module,
        x,
        y,
        CPU_CTX,
        [{"params": list(module.parameters()), "lr": lr}],
        epochs=epochs,
        batch_size=8,
        g=g,
        schedule=schedule,
        on_epoch_end=on_epoch_end,
    )
    return module


def test_train_loop_schedules_and_epoch_hook():
    plain = _loop()
    # the hooks, when they do nothing, leave training bit-identical to the plain loop
    inert = _loop(schedule=[], on_epoch_end=lambda e: None)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), inert.parameters()))
    assert not all(
        torch.equal(a, b) for a, b in zip(plain.parameters(), _loop(schedule="cosine").parameters())
    )
    # the lr after each epoch: cosine (FP, FT: BackdoorBench's CosineAnnealingLR over the epochs) and x0.1 steps
    # (RNP, ABL: MultiStepLR)
    for schedule, want in (
        ("cosine", [0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(1, 5)]),
        ([2, 3], [0.1, 0.01, 0.001, 0.001]),
    ):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        step = _lr_schedule(opt, schedule, 4)
        lrs = []
        for e in range(1, 5):
            opt.step()  # an epoch's updates (no gradients here), then the epoch's schedule step
            step(e)
            lrs.append(opt.param_groups[0]["lr"])
        assert lrs == pytest.approx(want, abs=1e-12), schedule
    with pytest.raises(ValueError, match="schedule"):
        _lr_schedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), "linear", 4)
    # True from the hook stops the loop after that epoch (RNP's unlearning threshold)
    done = []
    _loop(on_epoch_end=lambda e: done.append(e) or e == 2)
    assert done == [1, 2]


# --------------------------------------------------------------------------- ANP
def test_anp_perturbation_stays_within_eps_and_masks_within_unit_interval():
    eps = 0.3
    work = mask_bns(copy.deepcopy(_tail()), mask_bias=False, noise=True)
    acts, y = _acts(work, 40), torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(5))
    seen = []

    def record(module, inputs, output):
        if module.perturbed:
            seen.append(float(torch.cat([module.noise_weight, module.noise_bias]).detach().abs().max()))

    for _, m in masked_bns(work):
        m.register_forward_hook(record)
    # three signed steps of eps / 3 from a random start in the box would reach 2 eps unprojected
    info = optimize_masks(
        work, acts, y, torch.Generator().manual_seed(0), eps=eps, steps=3, lr=1.0, iterations=6, batch_size=16
    )
    assert seen and max(seen) <= eps + 1e-7 and info["max_noise"] <= eps + 1e-7
    assert max(seen) > 0.9 * eps  # the noise is used, up to its bound
    flat = torch.cat(list(masks(work).values()))
    assert flat.min() >= 0 and flat.max() <= 1 and (flat < 1).any()
    assert not any(m.perturbed for _, m in masked_bns(work))
    # the perturbed coefficients: gamma (m + delta) and beta (1 + xi), as the reference NoisyBatchNorm2d
    _, bn = next(masked_bns(work))
    bn.eval()
    with torch.no_grad():
        bn.noise_weight.uniform_(-eps, eps)
        bn.noise_bias.uniform_(-eps, eps)
    bn.perturbed = True
    x = torch.randn(4, bn.num_features, 3, 3)
    want = F.batch_norm(
        x,
        bn.running_mean,
        bn.running_var,
        bn.weight * (bn.mask + bn.noise_weight),
        bn.bias * (1 + bn.noise_bias),
        False,
        0.1,
        bn.eps,
    )
    assert torch.allclose(bn(x), want)


def test_anp_and_rnp_mask_every_stage_and_refuse_a_number_sweep_of_thresholds():
    """Both codes mask every BN: the default `stages` is null (every stage). pruning_by=number counts channels:
    the threshold defaults (0.9, 0.05) would sweep range(0, int(0.9) + 1) = [0], pruning nothing, so they are
    refused at construction (before any work), as a threshold beyond the masks' [0, 1] is."""
    for cls in (ANP, RNP):
        assert cls().stages is None and cls(stages=2).stages == 2
        with pytest.raises(ValueError, match="stages"):
            cls(stages=0)
        with pytest.raises(ValueError, match="pruning_by=number counts channels") as e:
            cls(pruning_by="number")
        msg = str(e.value)
        assert "pruning_max=0.9" in msg and "pruning_step=0.05" in msg and "\n" not in msg
        for bad in (
            {"pruning_by": "number", "pruning_max": 1000, "pruning_step": 2.5},
            {"pruning_by": "number", "pruning_number": 0.2},
            {"pruning_max": 1000, "pruning_step": 20},  # counts under pruning_by=threshold
            {"pruning_number": 24},
        ):
            with pytest.raises(ValueError, match="pruning_by="):
                cls(**bad)
        cls(pruning_by="number", pruning_max=1000, pruning_step=20)  # the ANP recipe's number sweep
        cls(pruning_by="number", pruning_number=24)  # a fixed number: the sweep's values are not used
    # the number sweep: counts in steps of pruning_step, capped at the channels there are
    anp = ANP(pruning_by="number", pruning_max=10, pruning_step=2)
    scores = {"a": torch.tensor([0.5, 0.1, 0.9]), "b": torch.tensor([0.2, 0.3])}
    seen: list[dict] = []
    by, accs = anp._choose(scores, lambda by: seen.append(by) or 0.9, 0.9)
    assert seen == [{"number": k} for k in (0, 2, 4)] and by == {"number": 4} and accs == [0.9] * 3


def test_ft_and_fp_defaults_are_the_references_steps():
    """FT and FP fine-tune for BackdoorBench's 100 epochs over 2 500 images at batch 256 (10 steps an epoch, no
    drop_last) = 1 000 optimiser steps, at the probe's learning rates, cosine; both YAMLs say the same as Python."""
    from omegaconf import OmegaConf

    from conftest import CONF

    ft = FinePruning(prune_step=0)
    assert ft.name == "ft" and ft.steps == 100 * math.ceil(2500 / 256) and ft.batch_size == 256
    assert ft.lr_scale == 1.0 and ft.schedule == "cosine" and ft.weight_decay == 5e-4
    assert epochs_for(ft.steps, 200, ft.batch_size) == 1000  # 200 clean images: 1 000 one-step epochs
    for option in ("ft", "fp"):
        node = OmegaConf.load(CONF / "defense" / f"{option}.yaml")
        assert "epochs" not in node and "lr" not in node, option
        for key in ("steps", "lr_scale", "schedule", "weight_decay", "batch_size"):
            assert node[key] == getattr(ft, key), (option, key)
    with pytest.raises(ValueError, match="steps"):
        FinePruning(steps=0)


# --------------------------------------------------------------------------- end to end
FAST = {
    "ft": ["defense.steps=2"],
    "fp": ["defense.steps=2"],
    "anp": ["defense.nb_iter=4", "defense.batch_size=16"],
    "rnp": ["defense.unlearning_epochs=2", "defense.recovering_epochs=2"],
}
CLASS = {"ft": FinePruning, "fp": FinePruning, "anp": ANP, "rnp": RNP}
# probe=finetune at TINY sizes: the one-epoch width-4 encoder has dead features, which the head's standardisation
# blows up at the probe's learning rates (NaN); these keep M0 finite
FINETUNE = ["probe=finetune", "probe.lr=0.001", "probe.encoder_lr=0.0001"]
KEYS = {
    "ft": ["ft/n_clean", "ft/steps", "ft/epochs"],
    "fp": ["fp/channels", "fp/pruned", "fp/holdout_acc_m0", "fp/holdout_acc_pruned", "fp/sweep_holdout_acc"]
    + ["fp/steps", "fp/epochs"],
    "anp": ["anp/channels", "anp/pruned", "anp/pruned_per_stage", "anp/max_noise", "anp/holdout_acc_m0"],
    "rnp": ["rnp/channels", "rnp/pruned", "rnp/unlearn_epochs", "rnp/unlearn_acc", "rnp/holdout_acc"],
}


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r.numpy().tobytes()) for r in x}


def _run_and_spy(compose_cfg, monkeypatch, method: str, overrides: list[str]):
    """Run the pipeline with `defense=method`; record what the method's train received and returned, and the
    splits the pipeline built."""
    import securetl.pipeline as pipeline

    cls, seen, built = CLASS[method], {}, {}
    real_train, real_build = cls.train, pipeline.build

    def train(self, encoder, train, probe, ctx):
        seen.update(train=train, ctx=ctx, probe=probe)
        before = copy.deepcopy(encoder.state_dict())
        seen["model"] = real_train(self, encoder, train, probe, ctx)
        after = encoder.state_dict()
        seen["encoder_untouched"] = all(torch.equal(after[k], v) for k, v in before.items())
        return seen["model"]

    def build(node, **kw):
        out = real_build(node, **kw)
        if str(node.get("_target_", "")).endswith("build_synthetic"):
            built["splits"] = out
        return out

    monkeypatch.setattr(cls, "train", train)
    monkeypatch.setattr(pipeline, "build", build)
    row = run(compose_cfg([f"defense={method}", "data_attack=badnets", *FAST[method], *overrides]))
    return row, seen, built["splits"]


def _check_no_test_data(seen, splits) -> None:
    train, ctx = seen["train"], seen["ctx"]
    assert type(train) is LabeledSet and [f.name for f in dataclasses.fields(train)] == ["x", "y"]
    fields = {f.name for f in dataclasses.fields(RunContext)}
    assert not fields & {"test", "splits", "poison_idx", "poisoned", "poison_rate", "target", "attack"}
    for value in vars(ctx).values():  # nothing in the context is (a view of) the test images
        if isinstance(value, torch.Tensor):
            assert value.data_ptr() != splits.test.x.data_ptr()
    assert ctx.clean is not None and len(ctx.clean) == 20  # 0.05 x 300: 2 per class
    assert not _rows(ctx.clean.x) & _rows(splits.test.x)
    assert not _rows(ctx.clean.x) & _rows(train.x)


def _check_model(method: str, seen: dict, d: dict) -> None:
    """The returned model carries exactly the pruning the diagnostics report; the received encoder is not touched
    (the repaired model is a copy)."""
    model = seen["model"]
    assert seen["encoder_untouched"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if method in ("anp", "rnp"):
        start = d[f"{method}/first_stage"]
        zeros = [
            int((m.weight == 0).sum())
            for s in model.encoder.stages[start:]
            for m in s.modules()
            if isinstance(m, nn.BatchNorm2d)
        ]
        assert sum(zeros) == d[f"{method}/pruned"] == sum(d[f"{method}/pruned_per_stage"])
    if method == "fp":
        lin = next(m for m in model.head.modules() if isinstance(m, nn.Linear))
        assert not hasattr(lin, "weight_orig")  # the pruning mask is folded after fine-tuning
        assert int((lin.weight == 0).all(0).sum()) == d["fp/pruned"]


@pytest.mark.parametrize("method", list(FAST))
def test_runs_end_to_end_under_linear_probe_and_sees_no_test_data(compose_cfg, monkeypatch, method):
    row, seen, splits = _run_and_spy(compose_cfg, monkeypatch, method, [])
    d = row["diagnostics"]
    for key in KEYS[method]:
        assert key in d, key
    assert row["knowledge"]["needs_clean"] is True and row["knowledge"]["n_clean"] == 20
    assert 0.0 <= row["metrics"]["acc"] <= 1.0
    _check_no_test_data(seen, splits)
    assert seen["probe"].frozen
    _check_model(method, seen, d)
    if method in ("anp", "rnp"):  # every stage, the frozen encoder's too: both codes mask every BN
        assert d[f"{method}/first_stage"] == 0


@pytest.mark.parametrize("method", list(FAST))
def test_runs_end_to_end_under_finetune_probe(compose_cfg, monkeypatch, method):
    row, seen, splits = _run_and_spy(compose_cfg, monkeypatch, method, FINETUNE)
    d = row["diagnostics"]
    for key in KEYS[method]:
        assert key in d, key
    assert not seen["probe"].frozen
    _check_no_test_data(seen, splits)
    _check_model(method, seen, d)
    if method in ("anp", "rnp"):  # every stage, not only the probe's trainable ones (last2)
        assert d[f"{method}/first_stage"] == 0
        assert len(d[f"{method}/pruned_per_stage"]) == len(seen["model"].encoder.stages)


@pytest.mark.parametrize("method", ["ft", "fp"])
def test_ft_and_fp_fine_tune_with_nads_rule(compose_cfg, monkeypatch, method):
    """The fine-tuning is train_steps (NAD's and NC's rule): the YAML's optimiser steps as whole epochs of the clean
    share, SGD at the probe's learning rates (encoder_lr for the stages, lr for the head) x lr_scale, a cosine over
    those epochs, the reference's batch."""
    from securetl.defenses import _features

    calls, real = [], _features.train_loop

    def spy(module, inputs, y, ctx, groups, **kw):
        calls.append({"lrs": [g["lr"] for g in groups], "n": len(y), **kw})
        return real(module, inputs, y, ctx, groups, **kw)

    monkeypatch.setattr(_features, "train_loop", spy)
    row, seen, _ = _run_and_spy(compose_cfg, monkeypatch, method, [*FINETUNE, "defense.lr_scale=0.5"])
    probe, d = seen["probe"], row["diagnostics"]
    (call,) = calls  # one fine-tuning, and nothing else of the method goes through train_steps
    assert call["lrs"] == pytest.approx([0.5 * probe.encoder_lr, 0.5 * probe.lr])
    assert call["optimizer"] == "sgd" and call["schedule"] == "cosine" and call["batch_size"] == 256
    assert call["weight_decay"] == pytest.approx(5e-4)
    assert call["n"] == 20 and call["epochs"] == epochs_for(2, 20, 256) == 2  # FAST: defense.steps=2
    assert d[f"{method}/steps"] == 2 and d[f"{method}/epochs"] == call["epochs"]


@pytest.mark.parametrize("method", list(FAST))
def test_refuses_clean_fraction_zero(compose_cfg, monkeypatch, method):
    import securetl.pipeline as pipeline

    real_build = pipeline.build

    def build(node, **kw):
        assert not str(node.get("_target_", "")).endswith("build_synthetic"), "the data were built"
        return real_build(node, **kw)

    monkeypatch.setattr(pipeline, "build", build)
    with pytest.raises(ConfigError, match="needs clean labelled data") as e:
        run(compose_cfg([f"defense={method}", "defense.clean_fraction=0"]))
    assert "\n" not in str(e.value)
    # called directly without a clean share: a one-line ValueError before any training
    defense = CLASS[method](**({"prune_step": 0} if method == "ft" else {}))
    ctx = RunContext(device=torch.device("cpu"), seed=0, num_classes=3, progress=False)
    train = LabeledSet(torch.zeros(6, 3, 4, 4, dtype=torch.uint8), torch.arange(6) % 3)
    with pytest.raises(ValueError, match="needs the clean reserve") as e:
        defense.train(None, train, Probe("linear"), ctx)
    assert "\n" not in str(e.value)


def test_a_clean_share_too_small_for_a_holdout_is_refused():
    clean = LabeledSet(torch.zeros(3, 3, 4, 4, dtype=torch.uint8), torch.arange(3))  # one image per class
    ctx = RunContext(device=torch.device("cpu"), seed=0, num_classes=3, progress=False, clean=clean)
    with pytest.raises(ValueError, match="holdout"):
        clean_split(ctx, "rnp", 0.2, torch.Generator().manual_seed(0))


def test_unlearning_stops_when_the_model_predicts_only_the_most_frequent_label():
    """T-Core's majority stop: a model that predicts one class for everything is no better than the constant
    predictor; when that class holds more of D than the accuracy threshold (dirty-label poison: the target
    class), plain ascent would go on to max_steps (and to NaN), the majority stop ends it at once."""
    from securetl.defenses._pruning import unlearn_per_step

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor([5.0, 0.0, 0.0]))

        def forward(self, x):
            return self.bias.expand(len(x), 3) + 0 * x.flatten(1)[:, :1]

    y = torch.tensor([0] * 30 + [1] * 35 + [2] * 35)  # class 0 (30 %) is predicted; threshold 0.2
    acts = torch.randn(len(y), 4)
    kw = dict(threshold=0.2, lr=1e-6, batch_size=16, max_steps=25)
    model = Constant()
    plain = unlearn_per_step(model, acts, y, torch.Generator().manual_seed(0), list(model.parameters()), **kw)
    assert plain["steps"] == 25 and plain["acc"] == pytest.approx(0.3)
    model = Constant()
    stop = unlearn_per_step(
        model, acts, y, torch.Generator().manual_seed(0), list(model.parameters()), majority_stop=True, **kw
    )
    assert stop["steps"] == 0
