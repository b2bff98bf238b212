"""Shared fixtures: Hydra compose on the repo's conf/, and a tiny configuration that runs in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

# The tests' tensors are tiny: one thread avoids OpenMP spin-wait overhead, which on a 2-core machine
# shared with anything else makes small-op training many times slower.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CONF = ROOT / "conf"

# Sizes that keep an end-to-end run to a few seconds on 2 CPU cores.
TINY = [
    "dataset.n_train=300",
    "dataset.n_test=200",
    "dataset.n_pretrain=256",
    "dataset.n_reference=60",
    "encoder.width=4",
    "encoder.epochs=1",
    "encoder.batch_size=64",
    "probe.epochs=2",
    "progress=false",
    "threads=1",  # as set above: tiny tensors run fastest on one thread
]


@pytest.fixture
def compose_cfg(tmp_path, monkeypatch):
    """compose(overrides) -> DictConfig with paths in a temp dir and the hydra node (for choices)."""
    monkeypatch.setenv("SECURETL_ROOT", str(tmp_path))
    # `make` exports a shared cache dir; each test keeps its artifacts under its own root
    monkeypatch.delenv("SECURETL_CACHE_DIR", raising=False)
    monkeypatch.delenv("SECURETL_RESULTS_DIR", raising=False)
    import securetl.run  # noqa: F401  registers the `uid` resolver

    def _compose(overrides=(), tiny=True):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(
                "run", overrides=(TINY if tiny else []) + list(overrides), return_hydra_config=True
            )

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def spy_run(compose_cfg, monkeypatch):
    """spy_run(overrides) -> (row, what the defense's train() received, the built splits): a tiny BadNets run
    through the pipeline, for tests that check what a defense can reach."""
    import securetl.pipeline as pipeline

    real_build = pipeline.build

    def _run(overrides):
        seen, built = {}, {}

        def build(node, **kw):
            out = real_build(node, **kw)
            target = str(node.get("_target_", ""))
            if target.endswith("build_synthetic"):
                built["splits"] = out
            if target.startswith("securetl.defenses."):
                real_train = out.train

                def train(encoder, train, probe, ctx):
                    seen.update(encoder=encoder, train=train, probe=probe, ctx=ctx)
                    return real_train(encoder, train, probe, ctx)

                out.train = train
            return out

        monkeypatch.setattr(pipeline, "build", build)
        row = pipeline.run(compose_cfg(["data_attack=badnets", *overrides]))
        return row, seen, built["splits"]

    return _run
