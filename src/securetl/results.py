"""Run rows: identity (`run_id`), contents, atomic writes, and defense diagnostics from ground truth."""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from securetl.cache import atomic_write_json, config_hash, move_aside
from securetl.deltas import apply_deltas
from securetl.interfaces import Poisoned
from securetl.validate import ConfigError

log = logging.getLogger(__name__)

# Keys that change where or how a run is reported, not what it computes: they stay out of run_id.
# `deltas` is dropped too: apply_deltas has merged what it changes into the groups, which are hashed.
# The numerics (`device`, `precision`, `deterministic`, `threads`) stay out too, as `device` always has: a
# row records them (`numerics`), and the table tool warns when one cell mixes rows made under different ones.
NUMERICS_KEYS = ("device", "precision", "deterministic", "threads")
# A user's notes on a run and what a sweep optimises: recorded in the row, never part of what it computes.
METADATA_KEYS = ("note", "tags", "objective")
NON_SEMANTIC_KEYS = (
    "paths",
    "logger",
    "resume",
    "progress",
    "cache",
    "report",
    "hydra",
    "deltas",
    *NUMERICS_KEYS,
    *METADATA_KEYS,
)
# Nested keys of the same kind: where the data live (`dataset.root` defaults to ${paths.data_dir}); what T-Core does
# when a loop diverges (`recover` and `fail` write the same row for a run that does not diverge, and `fail` writes
# none for one that does: the policy never changes a row).
NON_SEMANTIC_LEAVES = ("dataset.root", "defense.divergence")
GROUPS = ("dataset", "encoder", "encoder_attack", "data_attack", "defense", "probe", "threat", "ablation")
# Groups added after rows existed: in a row's choices only when chosen, so that older rows keep their run_id.
LATE_GROUPS = ("variant",)


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
    return {g: str(ch.get(g)) for g in GROUPS} | {g: str(ch[g]) for g in LATE_GROUPS if ch.get(g) is not None}


# what resume and the tables read from every row, and the type each must have
ROW_KEYS: dict[str, type | tuple[type, ...]] = {"metrics": dict, "choices": dict, "seed": (int, str)}


def read_row(p: Path) -> tuple[dict | None, str]:
    """(row, "") or (None, why the file is not a row): unreadable, not UTF-8, not JSON, or JSON that lacks
    what a row has (a list, `{}`, no `metrics`, ...)."""
    try:
        obj = json.loads(Path(p).read_bytes().decode("utf-8"))
    # UnicodeDecodeError and JSONDecodeError are ValueErrors; RecursionError: absurdly deep nesting
    except (OSError, ValueError, RecursionError) as e:
        return None, f"{type(e).__name__}: {e}"
    if not isinstance(obj, dict):
        return None, f"JSON {type(obj).__name__}, not a row object"
    for key, kind in ROW_KEYS.items():
        if not isinstance(obj.get(key), kind):
            return None, f"no valid {key!r}"
    return obj, ""


def load_row(raw_dir: Path, rid: str) -> dict | None:
    """The finished row of run `rid` (resume), or None. A file under its name that is not a row is reported
    and moved aside (`<name>.bad`, kept for a look), so the run is recomputed instead of crashing the sweep."""
    p = Path(raw_dir) / f"{rid}.json"
    if not p.exists():
        return None
    row, why = read_row(p)
    if row is None:
        dest = move_aside(p, ".bad")
        log.warning("row %s is unreadable (%s): moved aside to %s; the run is recomputed", p, why, dest.name)
    return row


def git_sha() -> str:
    """The checkout's commit; outside a checkout (a `git archive` copy frozen for a long sweep, so that edits to
    the repository cannot reach the running jobs) the commit that copy was made from, as SECURETL_SOURCE_SHA
    says; else "unknown"."""
    fallback = os.environ.get("SECURETL_SOURCE_SHA", "").strip() or "unknown"
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return fallback
    return (out.stdout.strip() if out.returncode == 0 else "") or fallback


def _rss_mb() -> float | None:
    """Resident set size now (Linux: /proc/self/statm, a cheap read), or None where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory of ONE run, not of the process: a sweep runs many cells in one process, whose lifetime peak
    (`ru_maxrss`) would only ever grow. CPU: a daemon thread samples the resident set size every `interval`
    seconds (`cpu_rss_peak_mb`, beside `cpu_rss_start_mb`, what the process held when the run began); without
    /proc, the process's lifetime peak instead (`cpu_rss_process_peak_mb`). CUDA: the peak of memory allocated
    to tensors since the run started (`gpu_allocated_peak_mb`)."""

    _running: PeakMemory | None = None  # a run that raised never stopped its sampler: the next run does

    def __init__(self, device: torch.device, interval: float = 0.05) -> None:
        self.device, self.interval = torch.device(device), interval
        self._stop = threading.Event()
        self._start = self._peak = _rss_mb()
        self._thread: threading.Thread | None = None

    def start(self) -> PeakMemory:
        if PeakMemory._running is not None:
            PeakMemory._running.stop()
        PeakMemory._running = self
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self._start is not None:
            self._thread = threading.Thread(target=self._sample, name="securetl-peak-memory", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_mb() or 0.0)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if PeakMemory._running is self:
            PeakMemory._running = None
        if self._start is None:
            lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            mem = {"cpu_rss_process_peak_mb": round(lifetime, 1)}
        else:
            self._peak = max(self._peak, _rss_mb() or 0.0)
            mem = {"cpu_rss_peak_mb": round(self._peak, 1), "cpu_rss_start_mb": round(self._start, 1)}
        if self.device.type == "cuda":
            mem["gpu_allocated_peak_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
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
    numerics: dict | None = None,
    memory: dict | None = None,
) -> dict[str, Any]:
    """One row. `memory`: PeakMemory.stop() of this run (without it, a sampler started now measures nothing)."""
    return {
        "run_id": rid,
        "choices": choices,
        "seed": int(cfg.seed),
        "metrics": metrics,
        "diagnostics": diagnostics,
        "timings": timings | {"total": round(sum(timings.values()), 3)},
        "memory": memory if memory is not None else PeakMemory(device).start().stop(),
        "device": str(device),
        "numerics": numerics or {"device": device.type},
        "host": platform.node(),
        "machine": machine(),
        "torch": torch.__version__,
        "git_sha": git_sha(),
        "cache_keys": cache_keys,
        "overrides": list(overrides or []),
        "config": resolved(cfg, ("hydra", "paths")),
    } | row_metadata(cfg)


def machine() -> dict[str, str]:
    """The CPU a row was computed on: the same config gives other floats on another CPU (vectorised math and
    convolution kernels are chosen per instruction set), so rows from two machines are not bit-comparable."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "isa": torch.backends.cpu.get_cpu_capability()}


def git_dirty() -> bool | None:
    """Whether the source tree has uncommitted changes to tracked files (then `git_sha` does not say what
    computed the row); None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def versions() -> dict[str, str]:
    """The versions of what computes a row: Python and the libraries whose numerics it depends on."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("securetl", "torch", "torchvision", "timm", "numpy", "scikit-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def row_metadata(cfg: DictConfig) -> dict[str, Any]:
    """What a row records about the run but does not hash into its run_id: when it finished, whether the
    code had uncommitted changes, library versions, the run's Hydra output folder (its log), and the user's
    `note` and `tags`."""
    from hydra.core.hydra_config import HydraConfig

    output_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
    tags = OmegaConf.select(cfg, "tags", default=None)
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_dirty": git_dirty(),
        "versions": versions(),
        "output_dir": output_dir,
        "note": OmegaConf.select(cfg, "note", default=None),
        "tags": [str(t) for t in tags],
    }


def write_row(raw_dir: Path, row: dict) -> Path:
    p = Path(raw_dir) / f"{row['run_id']}.json"
    atomic_write_json(p, row)
    return p


def read_rows(raw_dir: Path) -> list[dict]:
    """Every row under `raw_dir`; a file that is not a row is skipped with one warning that names it."""
    rows = []
    for p in sorted(Path(raw_dir).glob("*.json")):
        row, why = read_row(p)
        if row is None:
            log.warning("skipping %s: not a run row (%s)", p, why)
        else:
            rows.append(row)
    return rows


def ensure_results_dir(results_dir: Path) -> Path:
    """`<results_dir>/raw`, created and test-written, so that a results dir that is a file or is not writable
    stops a run at its start with one line, not after the whole run when its row cannot be written."""
    raw = Path(results_dir) / "raw"
    try:
        raw.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=raw, prefix=".write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ConfigError(
            f"paths.results_dir={results_dir}: cannot write rows under {raw} ({e.strerror or e}); "
            "set paths.results_dir or SECURETL_RESULTS_DIR to a writable folder"
        ) from None
    return raw


# --------------------------------------------------------------------------- failure records
# A sweep cell that failed leaves `<results_dir>/failed/<run_id>.json`: what it was run with and why it
# failed. The sweep's report and the table tool read them; the cell's next success removes its record.
FAILED_DIR = "failed"


def failure_record(
    cfg: DictConfig,
    choices: dict[str, str],
    overrides: list[str],
    err: BaseException,
    sweep: str | None = None,
    job: dict | None = None,
) -> dict[str, Any]:
    """The record of a failed cell, under the run_id its row would have had (so a later success finds it)."""
    try:
        apply_deltas(cfg, choices, overrides)  # idempotent: the pipeline applies them before its run_id
        rid, config = run_id(cfg, choices), resolved(cfg, ("hydra", "paths"))
    except Exception:  # a config that does not even resolve is still recorded, under its overrides
        rid, config = config_hash("failed", sorted(overrides), choices), None
    return {
        "run_id": rid,
        "choices": choices,
        "seed": OmegaConf.select(cfg, "seed", throw_on_resolution_failure=False),
        "overrides": list(overrides),
        "error": str(err),
        "error_type": type(err).__name__,
        "config": config,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "sweep": sweep,
        "job": job or {},
    }


def write_failure(results_dir: Path, record: dict) -> Path:
    p = Path(results_dir) / FAILED_DIR / f"{record['run_id']}.json"
    atomic_write_json(p, record)
    return p


def clear_failure(results_dir: Path, rid: str) -> None:
    (Path(results_dir) / FAILED_DIR / f"{rid}.json").unlink(missing_ok=True)


def read_failures(results_dir: Path, sweep: str | None = None) -> list[dict]:
    """The failure records under `results_dir` (only those of sweep `sweep` when given), oldest first."""
    out = []
    for p in sorted((Path(results_dir) / FAILED_DIR).glob("*.json")):
        try:
            rec = json.loads(p.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable failure record %s (%s)", p, e)
            continue
        if isinstance(rec, dict) and "error" in rec and (sweep is None or rec.get("sweep") == sweep):
            out.append(rec)
    return sorted(out, key=lambda r: (str(r.get("time")), str((r.get("job") or {}).get("num"))))
