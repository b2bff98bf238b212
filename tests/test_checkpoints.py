"""Loading encoder checkpoints: safe (no code from a file ever runs), and in the layouts researchers have."""

from __future__ import annotations

import argparse
import pickle
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from securetl.build import build
from securetl.encoders.checkpoint import load_checkpoint, read_state
from securetl.encoders.obtain import EncoderSpec, obtain
from securetl.encoders.resnet import build_encoder, cifar_resnet18
from securetl.interfaces import NoEncoderAttack, RunContext
from securetl.validate import ConfigError

WIDTH = 8  # small ResNet-18: the key layout is the same as at width 64


def trained_like(width: int = WIDTH, seed: int = 0) -> torch.nn.Module:
    """A ResNet-18 with random (non-default) weights and BN statistics, so a load is visible."""
    torch.manual_seed(seed)
    enc = cifar_resnet18(width)
    with torch.no_grad():
        for name, t in enc.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t) * 0.1)
    return enc.eval()


def same_encoder(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def to_badencoder(state: dict) -> dict:
    """Our keys -> the BadEncoder/DRUPE SimCLR layout: SimCLR.f (SimCLRBase).f = Sequential(conv1, bn1, relu,
    layer1..layer4, avgpool), i.e. f.f.0 / f.f.1 / f.f.3..f.f.6 (see models/simclr_model.py of their release)."""
    out = {}
    for k, v in state.items():
        m = re.match(r"^stages\.(\d+)\.(.*)$", k)
        stage, rest = int(m[1]), m[2]
        if stage == 0:
            out[f"f.f.{rest}"] = v  # stem: 0 = conv1, 1 = bn1
        else:
            out[f"f.f.{stage + 2}.{rest}"] = v
    return out


def to_torchvision(state: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in state.items():
        k = k.replace("stages.0.0.", "conv1.").replace("stages.0.1.", "bn1.")
        k = re.sub(r"^stages\.([1-4])\.", r"layer\1.", k)
        out[prefix + k] = v
    return out


# --------------------------------------------------------------------------- safety
class Payload:
    """Unpickling this would create `marker` — the stand-in for arbitrary code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("fmt", ["torch_zip", "torch_legacy", "pickle_p2", "pickle_p4"])
def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, fmt):
    marker = tmp_path / "pwned"
    obj = {"state_dict": trained_like().state_dict(), "epoch": 3, "payload": Payload(marker)}
    path = tmp_path / "model.pth"
    if fmt == "torch_zip":
        torch.save(obj, path)
    elif fmt == "torch_legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=int(fmt[-1]))
    with pytest.raises(ConfigError) as err:
        load_checkpoint(cifar_resnet18(WIDTH), path)
    msg = str(err.value)
    assert "refusing to load" in msg and "never executes" in msg
    assert "open" in msg  # names what the file would have called
    assert not marker.exists()


def test_refusal_through_the_encoder_config(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth"
    torch.save({"state_dict": trained_like().state_dict(), "x": Payload(marker)}, path)
    spec = EncoderSpec(width=WIDTH, checkpoint=str(path))
    ctx = RunContext(device=torch.device("cpu"), seed=0, num_classes=10)
    with pytest.raises(ConfigError, match="refusing"):
        obtain(spec, None, NoEncoderAttack(), None, ctx)
    assert not marker.exists()


def test_benign_extras_of_released_checkpoints_are_accepted(tmp_path):
    """Training arguments (argparse.Namespace) and numpy scalars sit next to the weights in many releases."""
    src = trained_like()
    path = tmp_path / "model.pth"
    args = argparse.Namespace(lr=np.float64(1e-3), arch="resnet18", epochs=200)
    torch.save(
        {"state_dict": src.state_dict(), "args": args, "best_acc": np.float32(0.9), "epoch": 200}, path
    )
    enc = cifar_resnet18(WIDTH)
    load_checkpoint(enc, path)
    assert same_encoder(enc, src)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    junk = tmp_path / "notes.pth"
    junk.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(ConfigError, match="neither a safetensors file nor a PyTorch checkpoint"):
        read_state(junk)
    with pytest.raises(ConfigError, match="no such file"):
        read_state(tmp_path / "absent.pth")


# --------------------------------------------------------------------------- formats and layouts
def test_suite_safetensors_and_plain_state_dict_load(tmp_path):
    src = trained_like()
    save_file(src.state_dict(), tmp_path / "enc.safetensors")
    torch.save(src.state_dict(), tmp_path / "enc.pt")
    for name in ("enc.safetensors", "enc.pt"):
        enc = cifar_resnet18(WIDTH)
        assert not same_encoder(enc, src)
        how = load_checkpoint(enc, tmp_path / name)
        assert same_encoder(enc, src) and "securetl" in how


def test_badencoder_checkpoint_layout_loads_into_the_resnet18(tmp_path):
    src = trained_like()
    state = to_badencoder(src.state_dict())
    assert "f.f.0.weight" in state and "f.f.3.0.conv1.weight" in state and "f.f.6.1.bn2.running_var" in state
    # the projection head g and the optimizer state, as in BadEncoder's torch.save({...}) call
    state |= {
        "g.0.weight": torch.randn(64, 8 * WIDTH),
        "g.1.weight": torch.ones(64),
        "g.3.weight": torch.randn(16, 64),
    }
    other = cifar_resnet18(WIDTH)  # only to have a realistic optimizer state (momentum buffers)
    opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    for p in other.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    path = tmp_path / "model_200.pth"
    torch.save({"epoch": 200, "state_dict": state, "optimizer": opt.state_dict()}, path)

    enc = cifar_resnet18(WIDTH)
    how = load_checkpoint(enc, path)
    assert "badencoder" in how and "'f.f.'" in how
    assert same_encoder(enc, src)
    x = torch.rand(2, 3, 16, 16)  # small: only equality of outputs matters
    with torch.no_grad():
        assert torch.allclose(enc.eval()(x), src(x))


def test_old_checkpoints_without_num_batches_tracked_load(tmp_path):
    src = trained_like()
    state = {
        k: v for k, v in to_badencoder(src.state_dict()).items() if not k.endswith("num_batches_tracked")
    }
    torch.save({"state_dict": state}, tmp_path / "old.pth")
    enc = cifar_resnet18(WIDTH)
    load_checkpoint(enc, tmp_path / "old.pth")
    x = torch.rand(2, 3, 16, 16)  # small: only equality of outputs matters
    with torch.no_grad():
        assert torch.allclose(enc.eval()(x), src(x))


def test_torchvision_naming_under_a_wrapper_prefix_loads(tmp_path):
    """e.g. solo-learn / DataParallel: {'state_dict': {'module.backbone.conv1.weight', ..., 'module.backbone.fc...'}}"""
    src = trained_like()
    state = to_torchvision(src.state_dict(), "module.backbone.")
    state["module.backbone.fc.weight"] = torch.randn(10, 8 * WIDTH)
    state["module.projector.0.weight"] = torch.randn(32, 8 * WIDTH)
    torch.save({"state_dict": state}, tmp_path / "solo.ckpt")
    enc = cifar_resnet18(WIDTH)
    assert "torchvision" in load_checkpoint(enc, tmp_path / "solo.ckpt")
    assert same_encoder(enc, src)


def test_two_complete_encoders_need_an_explicit_prefix(tmp_path):
    q, k = trained_like(seed=1), trained_like(seed=2)
    state = to_torchvision(q.state_dict(), "encoder_q.") | to_torchvision(k.state_dict(), "encoder_k.")
    torch.save(state, tmp_path / "moco.pth")
    with pytest.raises(ConfigError, match="checkpoint_prefix"):
        load_checkpoint(cifar_resnet18(WIDTH), tmp_path / "moco.pth")
    enc = cifar_resnet18(WIDTH)
    load_checkpoint(enc, tmp_path / "moco.pth", prefix="encoder_q.")
    assert same_encoder(enc, q)


def test_a_checkpoint_that_does_not_fit_lists_missing_and_unexpected_keys(tmp_path):
    wide = trained_like(width=16)
    torch.save({"state_dict": to_badencoder(wide.state_dict())}, tmp_path / "wide.pth")
    with pytest.raises(ConfigError, match="shape mismatches") as err:
        load_checkpoint(cifar_resnet18(WIDTH), tmp_path / "wide.pth")
    assert "encoder.width" in str(err.value)

    partial = {k: v for k, v in trained_like().state_dict().items() if not k.startswith("stages.4.")}
    partial["stages.9.conv.weight"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ConfigError) as err:
        load_checkpoint(cifar_resnet18(WIDTH), tmp_path / "partial.pt")
    msg = str(err.value)
    assert "missing keys" in msg and "stages.4.0.conv1.weight" in msg
    assert "unexpected keys" in msg and "stages.9.conv.weight" in msg


def test_vit_encoder_through_timm_builds_and_loads_timm_keys(compose_cfg, tmp_path):
    cfg = compose_cfg(["encoder=vit_tiny_synthetic"], tiny=False)
    spec: EncoderSpec = build(cfg.encoder)
    enc = spec.build()
    assert enc(torch.rand(2, 3, 32, 32)).shape == (2, enc.feat_dim)
    # a plain timm state dict of the same model (with a classifier head) loads onto stages.0.model.*
    import timm

    torch.manual_seed(3)
    model = timm.create_model(spec.arch, num_classes=10, **spec.timm_kwargs).eval()
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    assert "timm" in load_checkpoint(enc.eval(), tmp_path / "vit.pth")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            model.forward_head(model.forward_features(enc.normalize(x)), pre_logits=True), enc(x)
        )


def test_checkpoint_config_sets_normalisation_and_keys_the_cache_by_content(compose_cfg, tmp_path):
    src = trained_like()
    path = tmp_path / "model_200.pth"
    torch.save({"state_dict": to_badencoder(src.state_dict())}, path)
    cfg = compose_cfg(
        ["encoder=simclr_resnet18_checkpoint", f"encoder.width={WIDTH}", f"encoder.checkpoint={path}"],
        tiny=False,
    )
    spec: EncoderSpec = build(cfg.encoder)
    ctx = RunContext(device=torch.device("cpu"), seed=0, num_classes=10)
    enc, keys = obtain(spec, None, NoEncoderAttack(), None, ctx)
    bad_encoder_cifar10_std = torch.tensor([0.2023, 0.1994, 0.2010])
    assert torch.allclose(enc.std.flatten(), bad_encoder_cifar10_std)
    assert same_encoder(enc, src) and keys["checkpoint"] == str(path)
    moved = tmp_path / "elsewhere.pth"
    moved.write_bytes(path.read_bytes())
    _, keys2 = obtain(
        EncoderSpec(**{**spec.__dict__, "checkpoint": str(moved)}), None, NoEncoderAttack(), None, ctx
    )
    assert keys2["encoder"] == keys["encoder"]  # same weights, same cache key

    missing = compose_cfg(["encoder=simclr_resnet18_checkpoint"], tiny=False)
    with pytest.raises(ConfigError, match="encoder.checkpoint must be set"):
        build(missing.encoder)


def test_timm_encoder_default_normalisation_and_override():
    spec = EncoderSpec(
        arch="vit_tiny_patch16_224",
        timm_kwargs={"img_size": 32, "patch_size": 4, "depth": 1},
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
    )
    enc = spec.build()
    assert torch.equal(enc.mean.flatten(), torch.full((3,), 0.5))
    assert torch.equal(enc.std.flatten(), torch.full((3,), 0.25))
    assert build_encoder("cifar_resnet18", 4).std.flatten()[0] == pytest.approx(0.2470)
    with pytest.raises(ValueError, match="encoder.std"):
        EncoderSpec(std=[0.1, 0.0, 0.1])
