"""Every option of every group composes, and its keys are accepted by its _target_'s signature."""

from __future__ import annotations

import importlib
import inspect

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from conftest import CONF

GROUPS = [
    "dataset",
    "encoder",
    "encoder_attack",
    "data_attack",
    "defense",
    "probe",
    "logger",
    "table",
    "threat",
    "ablation",
    "variant",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def locate(target: str):
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def check_node(node, where: str) -> int:
    """Recursively check every node with a _target_; returns how many were checked."""
    checked = 0
    if isinstance(node, DictConfig):
        if "_target_" in node:
            fn = locate(node._target_)
            sig = inspect.signature(fn)
            params = sig.parameters
            takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            keys = [k for k in node.keys() if not str(k).startswith("_")]
            unknown = [k for k in keys if k not in params]
            assert takes_kwargs or not unknown, (
                f"{where}: keys {unknown} not accepted by {node._target_}{sig}"
            )
            required = [
                n
                for n, p in params.items()
                if p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                and n != "self"
            ]
            missing = [n for n in required if n not in keys]
            assert not missing, f"{where}: {node._target_} needs {missing}"
            checked += 1
        for k in node.keys():
            checked += check_node(node._get_node(k), f"{where}.{k}")
    elif isinstance(node, ListConfig):
        for i, v in enumerate(node):
            checked += check_node(v, f"{where}[{i}]")
    return checked


CASES = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_matches_its_target(compose_cfg, group, option):
    cfg = compose_cfg([f"{group}={option}"], tiny=False)
    OmegaConf.resolve(cfg.dataset)  # interpolations resolve
    n = 0
    for g in ["dataset", "encoder", "encoder_attack", "data_attack", "defense", "probe", "logger", "eval"]:
        n += check_node(cfg[g], g)
    assert n >= 7


def test_every_group_has_a_null_option():
    for g in ["encoder_attack", "data_attack", "defense", "logger"]:
        assert "none" in options(g), f"conf/{g}/none.yaml is missing"


def test_every_method_yaml_cites_its_source():
    for g in ["encoder_attack", "data_attack", "defense"]:
        for p in (CONF / g).glob("*.yaml"):
            first = p.read_text().splitlines()[0]
            assert first.startswith("#"), f"{p} must start with a comment naming the paper it implements"
