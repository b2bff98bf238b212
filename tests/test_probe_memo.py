"""The probe's memoised forward passes must never hand one run's features to another run's images."""

from __future__ import annotations

import gc

import pytest
import torch

from securetl.encoders.resnet import cifar_resnet18
from securetl.interfaces import RunContext
from securetl.probe import clear_memo, memo_forward


@pytest.fixture
def enc_ctx():
    torch.manual_seed(0)
    clear_memo()
    yield (
        cifar_resnet18(4).eval(),
        RunContext(device=torch.device("cpu"), seed=0, num_classes=10, progress=False),
    )
    clear_memo()


def test_memo_is_not_fooled_by_a_reused_address(enc_ctx):
    # A sweep frees one job's poisoned images and allocates the next job's; the allocator often hands out
    # the same address, with the same shape and the same (cached) encoder weights.
    enc, ctx = enc_ctx
    base = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    for i in range(12):
        x = base.clone()
        x[:, :, :4, :4] = (37 * i) % 256  # every "job" has different images of the same shape
        got = memo_forward(enc, x, ctx, stop=2)
        with torch.no_grad():
            want = enc.forward_until(x.float() / 255.0, 2)
        assert torch.allclose(got, want, atol=1e-5), f"stale features at round {i}"
        del x, got
        gc.collect()


def test_memo_hits_for_the_same_images_and_weights_and_misses_after_training(enc_ctx):
    enc, ctx = enc_ctx
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    before = memo_forward(enc, x, ctx)
    assert memo_forward(enc, x, ctx) is before
    with torch.no_grad():
        enc.stages[0][0].weight.add_(0.1)  # training touched the encoder: the entry must not be reused
        want = enc(x.float() / 255.0)
    after = memo_forward(enc, x, ctx)
    assert not torch.equal(after, before)
    assert torch.allclose(after, want, atol=1e-5)
