"""SSL losses on hand-checkable cases; MoCo v2 and BYOL run through the shared trainer and learn."""

from __future__ import annotations

import math

import pytest
import torch

from securetl.data.synthetic import build_synthetic
from securetl.encoders.resnet import build_encoder
from securetl.interfaces import RunContext
from securetl.ssl import trainer
from securetl.ssl.augment import SimCLRAugment, random_resized_crop
from securetl.ssl.losses import info_nce_queue, normalized_mse, nt_xent
from securetl.ssl.methods import BYOL, SSL_METHODS, MoCoV2, build_method, check_method, ema_update

TINY_METHOD_KW = {
    "mocov2": dict(proj_dim=16, queue_size=32, momentum=0.9, key_bn_groups=2),
    "byol": dict(proj_dim=16, hidden_dim=32, tau=0.9),
}


@pytest.fixture(scope="module")
def images():
    """64 small pre-training images (16x16 keeps a width-4 ResNet-18 step well under a second)."""
    return build_synthetic(n_train=10, n_test=10, n_pretrain=64, n_reference=10, size=16).pretrain.x


# --------------------------------------------------------------------------- losses, by hand
@pytest.mark.parametrize("n,t", [(2, 0.5), (4, 0.5), (3, 0.1)])
def test_nt_xent_of_identical_orthogonal_views(n, t):
    # view i of both batches is the unit vector e_i: its pair has similarity 1, every other view 0, so
    # each of the 2n rows is -log(e^{1/t} / (e^{1/t} + (2n - 2) e^0))
    z = torch.eye(n, 8) * 3.0  # scale must not matter: NT-Xent normalises
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / t))
    assert nt_xent(z, z.clone(), t).item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_nt_xent_of_collapsed_views_is_log_of_candidates():
    # every view identical: the positive is one of 2n - 1 equally likely candidates
    z = torch.ones(5, 4)
    assert nt_xent(z, z, 0.5).item() == pytest.approx(math.log(9), rel=1e-5)


def test_info_nce_with_orthogonal_queue():
    # q = k = e_0, K queued keys orthogonal to it: -log(e^{1/t} / (e^{1/t} + K))
    t, k = 0.2, 5
    q = torch.eye(1, 8)
    queue = torch.eye(8)[1 : 1 + k]
    expected = math.log(1 + k * math.exp(-1 / t))
    assert info_nce_queue(q, q.clone(), queue, t).item() == pytest.approx(expected, rel=1e-5)


def test_normalized_mse_is_two_minus_two_cos():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert normalized_mse(z * 5, z).item() == pytest.approx(0.0, abs=1e-6)
    assert normalized_mse(-z, z).item() == pytest.approx(4.0)
    assert normalized_mse(z.flip(1), z).item() == pytest.approx(2.0)  # orthogonal


def test_ema_update_moves_target_towards_online():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    ema_update(a, b, 0.75)
    assert torch.allclose(a.weight, 0.75 * before + 0.25 * b.weight)


# --------------------------------------------------------------------------- registry and checks
def test_methods_are_registered_and_checked():
    assert {"simclr", "mocov2", "byol"} <= set(SSL_METHODS)
    enc = build_encoder("cifar_resnet18", 4)
    with pytest.raises(ValueError, match="unknown"):
        build_method("swav", enc)
    with pytest.raises(ValueError, match="do not fit"):
        build_method("byol", enc, temperature=0.2)  # a SimCLR/MoCo key under BYOL
    with pytest.raises(ValueError):
        build_method("mocov2", enc, momentum=1.5)


def test_momentum_networks_are_frozen_and_outside_the_optimiser():
    for name in ("mocov2", "byol"):
        m = build_method(name, build_encoder("cifar_resnet18", 4), **TINY_METHOD_KW[name])
        twin = m.key_net if name == "mocov2" else m.target
        assert not any(p.requires_grad for p in twin.parameters())
        trainable = {id(p) for p in m.parameters() if p.requires_grad}
        assert trainable and not trainable & {id(p) for p in twin.parameters()}


def test_moco_queue_wraps_around():
    m = MoCoV2(build_encoder("cifar_resnet18", 4), proj_dim=4, queue_size=6)
    keys = torch.nn.functional.normalize(torch.randn(4, 4), dim=1)
    m.enqueue(keys)
    m.enqueue(keys * -1)
    assert int(m.queue_ptr) == 8 % 6
    assert torch.allclose(m.queue[:2], -keys[2:]) and torch.allclose(m.queue[2:4], keys[2:])
    assert torch.allclose(m.queue[4:6], -keys[:2])


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", ["mocov2", "byol"])
def test_momentum_methods_train_through_the_shared_trainer(images, name, monkeypatch):
    built = {}
    real = trainer.build_method

    def capture(*args, **kwargs):
        built["m"] = real(*args, **kwargs)
        built["twin0"] = [
            p.detach().clone()
            for p in (built["m"].key_net if name == "mocov2" else built["m"].target).parameters()
        ]
        return built["m"]

    monkeypatch.setattr(trainer, "build_method", capture)
    torch.manual_seed(0)
    enc = build_encoder("cifar_resnet18", 4)
    before = [p.detach().clone() for p in enc.parameters()]
    ctx = RunContext(torch.device("cpu"), 0, 10, progress=False)
    out, history = trainer.pretrain(
        enc, images, ctx, ssl=name, epochs=2, batch_size=16, lr=3e-3, method_kwargs=TINY_METHOD_KW[name]
    )
    assert len(history) == 2 and all(math.isfinite(h) for h in history)
    assert out is enc and any(not torch.equal(a, b) for a, b in zip(before, enc.parameters()))
    m = built["m"]
    twin = m.key_net if name == "mocov2" else m.target
    # after_step ran: the momentum network moved, but lags the online one
    assert any(not torch.equal(a, b) for a, b in zip(built["twin0"], twin.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(twin[0].parameters(), enc.parameters()))
    if name == "mocov2":
        assert int(m.queue_ptr) == (8 * 16) % 32  # 8 steps of 16 keys went through a 32-slot queue
    else:
        assert m.tau == pytest.approx(1.0)  # cosine schedule reached its end after begin(8) and 8 steps


@pytest.mark.parametrize("name", ["mocov2", "byol"])
def test_momentum_methods_lower_their_loss(images, name):
    """The trainer's inner step (loss, backward, Adam, after_step) on two fixed batches of fixed views:
    the loss falls, with no NaN. MoCo's first step is skipped: its queue still holds random vectors."""
    x = images.float() / 255
    g = torch.Generator().manual_seed(0)
    aug = SimCLRAugment()
    views = [(aug(x[i : i + 32], g), aug(x[i : i + 32], g)) for i in (0, 32)]
    torch.manual_seed(0)
    m = build_method(name, build_encoder("cifar_resnet18", 4), **TINY_METHOD_KW[name])
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    m.begin(16)
    losses = []
    for step in range(16):
        loss = m.loss(*views[step % 2])
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    early, late = sum(losses[1:4]) / 3, sum(losses[-3:]) / 3
    assert late < early - 0.1, losses


def test_byol_is_symmetric():
    torch.manual_seed(0)
    m = BYOL(build_encoder("cifar_resnet18", 4), proj_dim=8, hidden_dim=16).eval()
    a, b = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)
    assert m.loss(a, b).item() == pytest.approx(m.loss(b, a).item(), rel=1e-5)


def test_byol_target_is_an_ema_of_the_online_network():
    """After every optimiser step: target <- tau * target + (1 - tau) * online, with tau raised from tau0 to
    1 on the paper's cosine schedule (tau_k = 1 - (1 - tau0)(cos(pi k / K) + 1) / 2)."""
    torch.manual_seed(0)
    m = BYOL(build_encoder("cifar_resnet18", 4), proj_dim=8, hidden_dim=16, tau=0.9).train()
    online = torch.nn.Sequential(m.encoder, m.projector)
    assert all(torch.equal(t, o) for t, o in zip(m.target.parameters(), online.parameters()))  # a copy
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    x = torch.rand(8, 3, 16, 16)
    m.begin(4)
    for k in range(4):
        tau = m.tau
        assert tau == pytest.approx(1 - 0.1 * (math.cos(math.pi * k / 4) + 1) / 2)
        before = [t.detach().clone() for t in m.target.parameters()]
        loss = m.loss(x, x.flip(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_step()
        for t, t0, o in zip(m.target.parameters(), before, online.parameters()):
            assert torch.allclose(t, tau * t0 + (1 - tau) * o.detach(), atol=1e-6)
        assert not any(
            torch.equal(t, o) for t, o in zip(m.target.parameters(), online.parameters()) if t.ndim > 1
        )
    assert m.tau == pytest.approx(1.0)


def test_byol_schedule_and_weight_decay_groups():
    enc = build_encoder("cifar_resnet18", 4)
    plain = BYOL(enc, proj_dim=8, hidden_dim=16)
    assert plain.lr_factor(0) is None and len(plain.param_groups(1e-4)) == 1  # as SimCLR / MoCo v2
    m = BYOL(enc, proj_dim=8, hidden_dim=16, lr_warmup=0.1, lr_schedule="cosine", decay_bias_and_norm=False)
    m.begin(100)
    assert [m.lr_factor(k) for k in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # 10 warm-up steps
    assert m.lr_factor(10) == pytest.approx(1.0) and m.lr_factor(55) == pytest.approx(0.5)
    assert m.lr_factor(99) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    decayed, free = m.param_groups(1e-4)
    assert decayed["weight_decay"] == 1e-4 and free["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in free["params"])
    # every BatchNorm scale and shift, and every bias, is free of weight decay; the target is in no group
    free_ids = {id(p) for p in free["params"]}
    bn = [
        p
        for mod in m.modules()
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)
        for p in mod.parameters()
    ]
    assert {id(p) for p in bn if p.requires_grad} <= free_ids
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert {id(p) for g in (decayed, free) for p in g["params"]} == trainable
    with pytest.raises(ValueError, match="lr_schedule"):
        BYOL(enc, lr_schedule="step")
    with pytest.raises(ValueError, match="lr_warmup"):
        BYOL(enc, lr_warmup=1.0)


def test_trainer_follows_the_methods_learning_rate_schedule(images, monkeypatch):
    """The trainer sets encoder.lr x method.lr_factor(step) before each step; SimCLR keeps encoder.lr."""
    seen = {}
    real_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        seen.setdefault(id(self), []).append([g["lr"] for g in self.param_groups])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    ctx = RunContext(torch.device("cpu"), 0, 10, progress=False)
    kw = dict(TINY_METHOD_KW["byol"], lr_warmup=0.25, lr_schedule="cosine", decay_bias_and_norm=False)
    for name, method_kwargs in (("byol", kw), ("simclr", {})):
        seen.clear()
        torch.manual_seed(0)
        _, history = trainer.pretrain(
            build_encoder("cifar_resnet18", 4), images, ctx, ssl=name, epochs=2, batch_size=16, lr=1e-2,
            method_kwargs=method_kwargs,
        )  # fmt: skip
        assert all(math.isfinite(h) for h in history)
        (lrs,) = seen.values()
        if name == "simclr":
            assert lrs == [[1e-2]] * 8
        else:  # 8 steps: 2 of warm-up, then a cosine over 6; both groups move together
            expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
            assert [g for g, _ in lrs] == pytest.approx([1e-2 * f for f in expected])
            assert all(a == b for a, b in lrs)


def test_every_encoder_yaml_has_method_keys_its_ssl_takes():
    # test_configs checks keys against EncoderSpec; `method:` is a free dict there, so check it here
    from omegaconf import OmegaConf

    from conftest import CONF

    for p in sorted((CONF / "encoder").glob("*.yaml")):
        node = OmegaConf.load(p)
        check_method(node.get("ssl", "simclr"), dict(node.get("method") or {}))


# --------------------------------------------------------------------------- images of another size
def test_crops_of_a_wide_image_are_drawn_in_pixels():
    """A 1:1 crop of half the area of a 2:1 image is one half of it (as torchvision's RandomResizedCrop on
    the raw image), resized to the size asked for."""
    ramp = torch.linspace(0, 1, 64).expand(8, 3, 32, 64).contiguous()  # value = horizontal position
    v = random_resized_crop(
        ramp, scale=(0.5, 0.5), ratio=(1.0, 1.0), g=torch.Generator().manual_seed(0), size=(16, 16)
    )
    assert v.shape == (8, 3, 16, 16)
    span = (v[..., -1] - v[..., 0]).abs()  # the crop covers half the width: a ramp step of ~0.5
    assert torch.allclose(span, torch.full_like(span, 0.5), atol=0.05)
    # a square image gets the same crops as before the size argument existed
    sq = torch.rand(4, 3, 16, 16)
    a = random_resized_crop(sq, g=torch.Generator().manual_seed(1))
    b = random_resized_crop(sq, g=torch.Generator().manual_seed(1), size=(16, 16))
    assert torch.equal(a, b)


def test_trainer_takes_groups_of_images_of_different_sizes(images, monkeypatch):
    """Batches mix both groups; every view comes out at the first group's size."""
    shapes = []
    real = trainer.SimCLRAugment.__call__

    def spy(self, x, g=None, size=None):
        out = real(self, x, g, size)
        shapes.append((tuple(x.shape[-2:]), tuple(out.shape[-2:])))
        return out

    monkeypatch.setattr(trainer.SimCLRAugment, "__call__", spy)
    wide = torch.cat([images[:16], images[16:32]], dim=-1)  # 16 images of 16 x 32
    enc = build_encoder("cifar_resnet18", 4)
    ctx = RunContext(torch.device("cpu"), 0, 10, progress=False)
    _, history = trainer.pretrain(enc, [images, wide], ctx, epochs=1, batch_size=40)
    assert len(history) == 1 and math.isfinite(history[0])
    assert {s for s, _ in shapes} == {(16, 16), (16, 32)} and {o for _, o in shapes} == {(16, 16)}
