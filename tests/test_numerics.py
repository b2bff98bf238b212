"""The precision/device policy (securetl.numerics) on CPU, and device placement of what T-Core builds.

Only a GPU run proves the CUDA path (tests/test_gpu.py, `make test-gpu`); here the meta device stands in
for "a device other than the data's": a module built from a meta-device module must land on meta too.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from securetl import pipeline, results
from securetl.encoders.resnet import cifar_resnet18
from securetl.numerics import Numerics, take


def test_cpu_is_fp32_and_deterministic_whatever_is_asked():
    for asked in ("auto", "fp32", "bf16"):
        num = Numerics.resolve("cpu", asked, deterministic=False, threads=1)
        assert num.precision == "fp32" and num.deterministic and not num.channels_last
        assert num.record()["precision"] == "fp32"
    x = torch.rand(2, 3)
    with num.autocast():
        assert (x @ x.T).dtype == torch.float32
    assert num.batch(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)).eq(1.0).all()


def test_bad_precision_and_threads_are_refused():
    with pytest.raises(ValueError, match="precision"):
        Numerics.resolve("cpu", "fp16")
    with pytest.raises(ValueError, match="threads"):
        Numerics.resolve("cpu", "auto", threads=0)


def test_cpu_generator_is_the_host_generator():
    """On CPU the per-batch draws come from the very generator they always came from (bit-identity)."""
    g = torch.Generator().manual_seed(3)
    assert Numerics.resolve("cpu").generator(g) is g


def test_take_moves_the_index_to_the_data():
    x = torch.arange(10.0)
    assert take(x, torch.tensor([1, 3])).tolist() == [1.0, 3.0]
    assert take(x, x > 7).tolist() == [8.0, 9.0]


def test_row_records_numerics_and_run_id_ignores_them(compose_cfg):
    cfg = compose_cfg(["precision=bf16", "threads=1", "device=cpu"])
    row = pipeline.run(cfg)
    assert row["numerics"]["precision"] == "fp32"  # CPU is fp32 whatever the setting
    assert row["numerics"]["threads"] == 1 and row["numerics"]["device"] == "cpu"
    other = compose_cfg(["precision=fp32", "threads=2", "device=cpu"])
    assert results.run_id(other, results.choices_of(other)) == row["run_id"]


def test_bad_precision_is_one_config_error(compose_cfg):
    with pytest.raises(pipeline.ConfigError, match="precision"):
        pipeline.run(compose_cfg(["precision=fp8"]))


# ----------------------------------------------------------------- T-Core's modules follow the device
def _meta_encoder():
    with torch.device("meta"):
        return cifar_resnet18(4)


def _on(module: nn.Module, device: str) -> bool:
    return all(t.device.type == device for t in (*module.parameters(), *module.buffers()))


def test_masked_bn_tail_and_unmask_are_built_where_the_encoder_lives():
    from securetl.defenses.tcore.channels import Tail, unmask

    enc = _meta_encoder()
    tail = Tail(list(enc.stages[-2:]), enc.feat_dim, 10)
    assert _on(tail.stages, "meta")  # the MaskedBNs (and their masks) were made on meta, not on the CPU
    plain = unmask(tail.stages[0])
    assert _on(plain, "meta")


@pytest.mark.parametrize(
    "table, attack",
    [("threat1_synthetic_gpu", "sslbackdoor"), ("encoder_seed_synthetic_gpu", "ctrl"),
     ("encoder_seed_synthetic_gpu", "corruptencoder")],
)  # fmt: skip
def test_the_gpu_scale_threat1_presets_set_their_scale_and_run_at_tiny_sizes(compose_cfg, table, attack):
    full = compose_cfg([f"table={table}"], tiny=False)
    assert (full.encoder.width, full.encoder.epochs, full.encoder.batch_size) == (64, 40, 256)
    assert full.dataset.n_pretrain == 16000
    row = pipeline.run(compose_cfg([f"table={table}", f"encoder_attack={attack}", "encoder.seed=1"]))
    assert row["choices"]["encoder"] == "synthetic_simclr_resnet18_gpu"
    assert row["config"]["encoder"]["seed"] == 1
    assert 0.0 <= row["metrics"]["knn_asr"] <= 1.0
