"""The CUDA path end to end (`make test-gpu`; deselected elsewhere): the whole suite also runs with
`device=auto` on a GPU machine (../shared/GPU.md), these pin down what CPU tests cannot prove."""

from __future__ import annotations

import pytest
import torch

from securetl import pipeline
from securetl.data.synthetic import build_synthetic
from securetl.encoders.resnet import cifar_resnet18
from securetl.interfaces import RunContext
from securetl.numerics import Numerics
from securetl.probe import Probe
from securetl.ssl.trainer import pretrain

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make test-gpu on a GPU)"),
]

CUDA = ["device=cuda"]


def _ctx() -> RunContext:
    dev = torch.device("cuda")
    return RunContext(dev, 0, 10, progress=False, numerics=Numerics.resolve(dev))


def _on_cuda(m: torch.nn.Module) -> bool:
    return all(t.is_cuda for t in (*m.parameters(), *m.buffers()))


def test_tcore_end_to_end_on_cuda(compose_cfg):
    row = pipeline.run(compose_cfg([*CUDA, "data_attack=badnets", "defense=tcore", "probe=finetune"]))
    assert row["numerics"] == {
        "device": "cuda",
        "precision": "bf16",
        "deterministic": False,
        "threads": 1,
        "channels_last": True,
    }
    assert 0.0 <= row["metrics"]["acc"] <= 1.0
    assert row["diagnostics"]["kept/size"] > 0


@pytest.mark.parametrize("ssl", ["simclr", "mocov2", "byol"])
def test_ssl_pretraining_on_cuda(ssl):
    data = build_synthetic(n_train=10, n_test=10, n_pretrain=128, n_reference=10)
    kwargs = {"queue_size": 256} if ssl == "mocov2" else {}
    enc, history = pretrain(
        cifar_resnet18(4), data.pretrain.x, _ctx(), ssl=ssl, epochs=2, batch_size=32, method_kwargs=kwargs
    )
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(history)))
    assert _on_cuda(enc)


@pytest.mark.parametrize("trainable", ["last_stage", "last2", "all"])
def test_finetune_probe_on_cuda(trainable):
    data = build_synthetic(n_train=200, n_test=10, n_pretrain=10, n_reference=10)
    enc = cifar_resnet18(4).eval().cuda()
    for p in enc.parameters():
        p.requires_grad_(False)
    model = Probe(kind="finetune", trainable=trainable, epochs=2, batch_size=64).fit(enc, data.train, _ctx())
    assert _on_cuda(model)
    assert model(torch.rand(4, 3, 32, 32, device="cuda")).shape == (4, 10)


def test_badencoder_implant_on_cuda(compose_cfg):
    row = pipeline.run(compose_cfg([*CUDA, "encoder_attack=badencoder", "encoder_attack.epochs=1"]))
    assert "badencoder/shadow_bd_ref_cos" in row["diagnostics"]
    assert 0.0 <= row["metrics"]["asr"] <= 1.0


def test_mask_and_inversion_loops_read_inputs_left_in_pinned_host_memory(monkeypatch):
    """num.resident falls back to pinned host memory when a tensor does not fit on the device; the loops that index
    it with indices drawn on the device (ANP's masks, RNP's/T-Core's recovery, T-Core's unlearning, NC's and DECREE's
    inversion) move the index to the data (numerics.take) instead of raising a device mismatch."""
    import torch.nn.functional as F
    from torch import nn

    import securetl.numerics as numerics
    from securetl.defenses._inversion import invert_trigger
    from securetl.defenses._pruning import mask_bns, masked_bns, recover_masks, unlearn_per_step
    from securetl.defenses.anp import optimize_masks
    from securetl.probe import _Tail

    monkeypatch.setattr(numerics, "RESIDENT_SHARE", 0.0)  # nothing fits: resident = pinned host memory
    numerics.clear_resident()
    ctx = _ctx()
    num = ctx.num
    g = torch.Generator().manual_seed(0)
    enc = cifar_resnet18(4).eval()
    x, y = torch.rand(16, 3, 16, 16, generator=g), torch.arange(16) % 10
    with torch.no_grad():
        acts = enc.forward_until(x, 3)  # host activations entering the top two stages
    assert num.resident(acts).device.type == "cpu"  # the fallback under test
    tail = num.module(mask_bns(_Tail(enc, 3, nn.Linear(enc.feat_dim, 10)), mask_bias=False, noise=True))
    optimize_masks(tail, acts, y, g, iterations=2, batch_size=8, num=num)
    recover_masks(tail, acts, y, g, epochs=1, batch_size=8, num=num)
    params = [m.weight for _, m in masked_bns(tail)]
    unlearn_per_step(tail, acts, y, g, params, threshold=0.0, max_steps=2, batch_size=8, num=num)
    net = num.module(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)))

    def objective(xb):
        loss = F.cross_entropy(net(xb).float(), torch.zeros(len(xb), dtype=torch.long, device=xb.device))
        return loss, torch.zeros((), device=xb.device)

    inv = invert_trigger(objective, (x * 255).to(torch.uint8), ctx, g, epochs=1, batch_size=8, success=0.9)
    assert inv.epochs == 1 and torch.isfinite(inv.mask).all()
    numerics.clear_resident()
