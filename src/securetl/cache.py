"""Content-addressed artifact cache: key = hash(resolved sub-configs that produce it + code version).

Weights go in as safetensors, metadata as JSON; both written to a temp name and `os.replace`d so an
interrupted run never leaves a half-written artifact that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

# Bump when code changes would make old artifacts wrong (e.g. a fix in SSL pre-training).
CACHE_VERSION = 1


def plain(obj: Any) -> Any:
    """Resolved, JSON-able form of a config node (or anything already plain)."""
    if isinstance(obj, DictConfig | ListConfig):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


def config_hash(*parts: Any, version: int = CACHE_VERSION, length: int = 16) -> str:
    payload = json.dumps([plain(p) for p in parts] + [version], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


class Cache:
    """Artifacts under `root/<kind>/<key>.safetensors` (+ `.json` metadata)."""

    def __init__(self, root: str | Path, enabled: bool = True) -> None:
        self.root = Path(root)
        self.enabled = enabled

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.safetensors"

    def load_state(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        p = self.path(kind, key)
        if not (self.enabled and p.exists()):
            return None
        log.info("cache hit: %s/%s", kind, key)
        return load_file(str(p))

    def save_state(
        self, kind: str, key: str, state: dict[str, torch.Tensor], meta: dict | None = None
    ) -> Path:
        p = self.path(kind, key)
        if not self.enabled:
            return p
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        atomic_write_json(p.with_suffix(".json"), meta or {})
        log.info("cached: %s/%s", kind, key)
        return p

    def load_meta(self, kind: str, key: str) -> dict:
        p = self.path(kind, key).with_suffix(".json")
        return json.loads(p.read_text()) if p.exists() else {}
