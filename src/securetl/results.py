"""Run rows: identity (`run_id`), contents, atomic writes, and defense diagnostics from ground truth."""

from __future__ import annotations

import json
import logging
import platform
import resource
import subprocess
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from securetl.cache import atomic_write_json, config_hash
from securetl.interfaces import Poisoned

log = logging.getLogger(__name__)

# Keys that change where or how a run is reported, not what it computes: they stay out of run_id.
# `deltas` is dropped too: apply_deltas has merged what it changes into the groups, which are hashed.
NON_SEMANTIC_KEYS = ("paths", "logger", "resume", "device", "progress", "cache", "report", "hydra", "deltas")
# Nested keys of the same kind: where the data live (`dataset.root` defaults to ${paths.data_dir}).
NON_SEMANTIC_LEAVES = ("dataset.root",)
GROUPS = ("dataset", "encoder", "encoder_attack", "data_attack", "defense", "probe", "threat", "ablation")


def resolved(cfg: DictConfig, drop: tuple[str, ...] = ("hydra",)) -> dict[str, Any]:
    """The resolved config as plain data, without the `hydra` node (present when tests compose with it)
    and the `drop` keys. Dropped after resolving, so that e.g. `dataset.root: ${paths.data_dir}` resolves."""
    keep = [k for k in cfg.keys() if k != "hydra"]
    out = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keep), resolve=True)
    for k in drop:
        out.pop(k, None)
    return out


def run_id(cfg: DictConfig, choices: dict[str, str] | None = None) -> str:
    """Hash of the resolved config and the group choices (two presets that compose the same config still
    get their own rows, so each table finds its cells)."""
    r = resolved(cfg, NON_SEMANTIC_KEYS)
    for dotted in NON_SEMANTIC_LEAVES:
        parent, _, leaf = dotted.rpartition(".")
        if isinstance(r.get(parent), dict):
            r[parent].pop(leaf, None)
    return config_hash("run", r, choices or {})


def choices_of(cfg: DictConfig) -> dict[str, str]:
    """Which option of each group this run uses (from Hydra's runtime, or the composed hydra node in tests)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        ch = HydraConfig.get().runtime.choices
    elif "hydra" in cfg:
        ch = cfg.hydra.runtime.choices
    else:
        raise ValueError("group choices unknown: compose with return_hydra_config=True or pass choices=")
    return {g: str(ch.get(g)) for g in GROUPS}


def load_row(raw_dir: Path, rid: str) -> dict | None:
    p = Path(raw_dir) / f"{rid}.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        log.warning("ignoring unreadable row %s (it will be recomputed)", p)
        return None


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    mem = {"cpu_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        mem["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return mem


def decision_diagnostics(decisions: dict[str, Any], poisoned: Poisoned, n: int) -> dict[str, Any]:
    """For every index set a defense decided on (`*_idx`), its size, how many poisons it holds, and purity.

    Computed here, after the defense has finished, from the attack's ground truth the defense never saw.
    """
    is_poison = torch.zeros(n, dtype=torch.bool)
    if len(poisoned.poison_idx):
        is_poison[poisoned.poison_idx] = True
    out: dict[str, Any] = {}
    for name, idx in decisions.items():
        if not name.endswith("_idx"):
            continue
        idx = torch.as_tensor(idx, dtype=torch.long)
        stem = name[: -len("_idx")]
        n_bad = int(is_poison[idx].sum()) if len(idx) else 0
        out[f"{stem}/size"] = len(idx)
        out[f"{stem}/n_poison"] = n_bad
        out[f"{stem}/purity"] = 1.0 - n_bad / len(idx) if len(idx) else float("nan")
    if "kept_idx" in decisions and len(poisoned.poison_idx):
        kept = torch.zeros(n, dtype=torch.bool)
        kept[torch.as_tensor(decisions["kept_idx"], dtype=torch.long)] = True
        removed = ~kept
        out["detector/tpr"] = float(removed[is_poison].float().mean())
        out["detector/fpr"] = (
            float(removed[~is_poison].float().mean()) if (~is_poison).any() else float("nan")
        )
    return out


def make_row(
    cfg: DictConfig,
    rid: str,
    choices: dict[str, str],
    metrics: dict,
    diagnostics: dict,
    timings: dict,
    device: torch.device,
    cache_keys: dict,
    overrides: list[str] | None,
) -> dict[str, Any]:
    return {
        "run_id": rid,
        "choices": choices,
        "seed": int(cfg.seed),
        "metrics": metrics,
        "diagnostics": diagnostics,
        "timings": timings | {"total": round(sum(timings.values()), 3)},
        "memory": peak_memory_mb(device),
        "device": str(device),
        "host": platform.node(),
        "torch": torch.__version__,
        "git_sha": git_sha(),
        "cache_keys": cache_keys,
        "overrides": list(overrides or []),
        "config": resolved(cfg, ("hydra", "paths")),
    }


def write_row(raw_dir: Path, row: dict) -> Path:
    p = Path(raw_dir) / f"{row['run_id']}.json"
    atomic_write_json(p, row)
    return p


def read_rows(raw_dir: Path) -> list[dict]:
    rows = []
    for p in sorted(Path(raw_dir).glob("*.json")):
        try:
            rows.append(json.loads(p.read_text()))
        except json.JSONDecodeError:
            log.warning("skipping unreadable row %s", p)
    return rows
