"""M0 (the probe trained on all of D) is cached per sweep cell: a hit must give the run a miss gives, bit for bit,
including what the defense draws from the global RNG after M0 (the artifact carries the RNG state)."""

from __future__ import annotations

import pytest
import torch

from securetl.build import build
from securetl.cache import Cache
from securetl.defenses._features import reference_model
from securetl.encoders.resnet import build_encoder
from securetl.interfaces import LabeledSet, RunContext
from securetl.numerics import Numerics
from securetl.pipeline import run


def _ctx(root, cache=True) -> RunContext:
    dev = torch.device("cpu")
    return RunContext(
        device=dev,
        seed=3,
        num_classes=4,
        cache=Cache(root, enabled=cache),
        progress=False,
        numerics=Numerics.resolve(dev, "auto", False, 1),
    )


@pytest.mark.parametrize("kind", ["linear", "finetune"])
def test_a_cached_m0_is_the_trained_one_and_leaves_the_same_rng(tmp_path, kind):
    torch.manual_seed(0)
    encoder = build_encoder("cifar_resnet18", width=4).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    train = LabeledSet(
        torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(64) % 4
    )
    probe = build(
        {"_target_": "securetl.probe.Probe", "kind": kind, "epochs": 1, "lr": 1e-3, "encoder_lr": 1e-4}
    )
    runs = []
    for _ in range(2):  # a miss (trains and saves), then a hit (loads)
        m = reference_model(encoder, train, probe, _ctx(tmp_path))
        runs.append((m.state_dict(), torch.get_rng_state(), torch.rand(3)))
    assert list((tmp_path / "m0").glob("*.safetensors")), "M0 was not cached"
    (a, rng_a, draw_a), (b, rng_b, draw_b) = runs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(rng_a, rng_b) and torch.equal(draw_a, draw_b)
    fresh = reference_model(encoder, train, probe, _ctx(tmp_path / "off", cache=False))
    assert all(torch.equal(fresh.state_dict()[k], a[k]) for k in a)
    # the received encoder is handed back untouched under a frozen probe, a trained copy under fine-tuning
    assert (m.encoder is encoder) == (kind == "linear")


def test_a_detector_run_is_the_same_with_m0_from_the_cache(compose_cfg):
    over = ["data_attack=badnets", "defense=spectral", "resume=false"]
    cold = run(compose_cfg(over))
    warm = run(compose_cfg(over))  # the same root: M0 now comes from the cache
    off = run(compose_cfg([*over, "cache=false"]))

    def results(row):
        return {k: v for k, v in row["diagnostics"].items() if not k.startswith("m0/")}

    for other in (warm, off):
        assert other["metrics"] == cold["metrics"]
        assert results(other) == results(cold)
    # what M0 cost is charged to every run, whichever trained it: the hit carries the miss's training time
    assert [r["diagnostics"]["m0/cached"] for r in (cold, warm, off)] == [False, True, False]
    assert warm["diagnostics"]["m0/seconds"] == cold["diagnostics"]["m0/seconds"] > 0
