"""Content-addressed artifact cache: key = hash(resolved sub-configs that produce it + code version).

An artifact is ONE safetensors file: the weights, and their metadata (JSON) in the file's header, so a
kill can never leave weights without the metadata that goes with them. It is written to a temp name,
flushed to disk and `os.replace`d (atomic), and verified when loaded: an unreadable artifact is named in a
warning, moved aside (`.corrupt`) and rebuilt by the caller. Safetensors only: nothing is ever unpickled.
A per-artifact file lock (`Cache.building`) lets one of several concurrent jobs build an artifact while
the others wait for it and load it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

# Bump when code changes would make old artifacts wrong (e.g. a fix in SSL pre-training).
# 2: an encoder's initial weights follow encoder.seed (before, the global RNG state of whichever run
#    built it first), so version-1 artifacts of the same key may hold other weights.
CACHE_VERSION = 2
# the safetensors header field that holds an artifact's metadata (JSON)
META_KEY = "securetl_meta"
# A temp file untouched for this long belongs to a writer that died (writing takes seconds): removed.
STALE_TMP_S = 600


def plain(obj: Any) -> Any:
    """Resolved, JSON-able form of a config node (or anything already plain)."""
    if isinstance(obj, DictConfig | ListConfig):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


def config_hash(*parts: Any, version: int = CACHE_VERSION, length: int = 16) -> str:
    payload = json.dumps([plain(p) for p in parts] + [version], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def current_umask() -> int:
    """The process umask, read from /proc where it is there (setting it to read it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(d: Path) -> None:
    """Flush a rename to disk (not every filesystem lets a directory be opened: then nothing to do)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temp file beside `path`, which then becomes `path` in one rename.

    The temp file is flushed to disk before the rename (else a crash can leave the new name on empty
    blocks) and given the mode a plain `open()` would give it: `mkstemp` makes files 0600, which hides a
    shared cache or results folder from the group.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def move_aside(path: Path, suffix: str) -> Path:
    """Rename a bad file to `<name><suffix>` (numbered if that exists) so it is kept for a look, never
    deleted, and no longer found under its own name."""
    path = Path(path)
    dest = path.with_name(path.name + suffix)
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}{suffix}.{n}")
        n += 1
    os.replace(path, dest)
    return dest


class Cache:
    """Artifacts under `root/<kind>/<key>.safetensors` (metadata in the header; artifacts written before
    that kept it in a `<key>.json` sidecar, which is still read)."""

    def __init__(self, root: str | Path, enabled: bool = True) -> None:
        self.root = Path(root)
        self.enabled = enabled

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.safetensors"

    @contextmanager
    def building(self, kind: str, key: str) -> Iterator[None]:
        """Hold `<key>.lock` around "load it, or build and save it": of several jobs that need one artifact
        (joblib workers, a SLURM array), one builds it and the others wait, then load what it saved."""
        if not self.enabled:
            yield
            return
        lock = self.path(kind, key).with_suffix(".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another job to build %s/%s", kind, key)
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError as e:  # a filesystem without locks (some network mounts): work on unlocked
                log.warning("cannot lock %s (%s): concurrent jobs may build it twice", lock, e)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read_meta(self, p: Path) -> dict:
        """The metadata of artifact `p`: from its header, else from an old-style sidecar, else {}."""
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
        if META_KEY in header:
            meta = json.loads(header[META_KEY])
        elif p.with_suffix(".json").exists():
            meta = json.loads(p.with_suffix(".json").read_text())
        else:
            return {}
        if not isinstance(meta, dict):
            raise ValueError(f"metadata is a {type(meta).__name__}, not an object")
        return meta

    def _set_aside(self, p: Path, err: BaseException) -> None:
        log.warning("cache artifact %s is unreadable (%s); moved aside, it will be rebuilt", p, err)
        for q in (p, p.with_suffix(".json")):
            if q.exists():
                move_aside(q, ".corrupt")

    def load_state(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        """The artifact's tensors, or None when it is absent or fails to verify (then moved aside)."""
        p = self.path(kind, key)
        if not (self.enabled and p.exists()):
            return None
        try:
            state = load_file(str(p))  # checks the header against the file's size: a truncation fails here
            self._read_meta(p)
        except Exception as e:  # SafetensorError, OSError, bad JSON: whatever it is, the file is not usable
            self._set_aside(p, e)
            return None
        log.info("cache hit: %s/%s", kind, key)
        return state

    def load_meta(self, kind: str, key: str) -> dict | None:
        """The artifact's metadata ({} if it was saved without), or None when it is absent or unreadable."""
        p = self.path(kind, key)
        if not p.exists():
            return None
        try:
            return self._read_meta(p)
        except Exception as e:
            self._set_aside(p, e)
            return None

    def save_state(
        self, kind: str, key: str, state: dict[str, torch.Tensor], meta: dict | None = None
    ) -> Path:
        """Write weights and metadata as one file, in one atomic rename."""
        p = self.path(kind, key)
        if not self.enabled:
            return p
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        header = {META_KEY: json.dumps(meta or {}, sort_keys=True, default=str)}
        self._remove_stale_tmp(p.parent)
        atomic_write(p, lambda tmp: save_file(tensors, str(tmp), metadata=header))
        # an old-style sidecar now describes nothing (the header wins when both exist)
        p.with_suffix(".json").unlink(missing_ok=True)
        log.info("cached: %s/%s", kind, key)
        return p

    @staticmethod
    def _remove_stale_tmp(d: Path) -> None:
        """Temp files of writers that were killed (a live writer touches its file within seconds)."""
        now = time.time()
        for t in d.glob(".*.tmp"):
            try:
                if now - t.stat().st_mtime > STALE_TMP_S:
                    t.unlink()
                    log.info("removed a stale temp file %s (its writer was interrupted)", t)
            except OSError:  # another job removed it first
                pass
