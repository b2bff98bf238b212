"""Loggers: JSON rows are the source of truth; wandb is an optional mirror (offline unless asked).

A logger sees a run's whole row (`log_row`): metrics, diagnostics (`diag/...`: detector TPR/FPR, purities,
T-Core's phase times), timings (`time/...`, `time/total` included) and peak memory (`memory/...`). A row that
resume skips is mirrored too (marked `skipped`), so a sweep's wandb group holds every cell of the sweep.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def row_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a row, flat: metrics as they are, then `diag/`, `time/` and `memory/` prefixed."""
    out: dict[str, float] = {}
    sections = (("metrics", ""), ("diagnostics", "diag/"), ("timings", "time/"), ("memory", "memory/"))
    for section, prefix in sections:
        for k, v in (row.get(section) or {}).items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[f"{prefix}{k}"] = v
    return out


def default_group(sweep_dir: str | None, table: str | None) -> str | None:
    """A sweep's runs share a wandb group: the sweep's output folder name (unique per sweep), after the
    table preset's name when the sweep is one. A single run has no group."""
    if not sweep_dir:
        return None
    name = Path(str(sweep_dir)).name
    return f"{table}/{name}" if table and table != "None" else name


def _hydra_sweep() -> tuple[str | None, str | None]:
    """(sweep dir, table choice) of the Hydra job running now; (None, None) outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None, None
    table = hc.runtime.choices.get("table")
    return str(hc.sweep.dir), (str(table) if table is not None else None)


class NoLogger:
    """`logger=none`: nothing beyond the JSON row."""

    def start(
        self, config: dict[str, Any], run_id: str, choices: dict[str, str], skipped: bool = False
    ) -> None: ...

    def log(self, metrics: dict[str, Any]) -> None: ...

    def log_row(self, row: dict[str, Any]) -> None:
        self.log(row_scalars(row))

    def finish(self) -> None: ...


class WandbLogger(NoLogger):
    """`logger=wandb`: config + the row's numbers to Weights & Biases. mode: offline | online | disabled.
    `group` defaults to the sweep (default_group); `tags` add to the run's own `tags=[...]`, and the run's
    `note` becomes the wandb run's notes."""

    def __init__(
        self,
        project: str = "securetl",
        mode: str = "offline",
        dir: str | None = None,
        entity: str | None = None,
        tags: Sequence[str] = (),
        group: str | None = None,
        job_type: str | None = None,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={mode!r}; choose offline, online or disabled")
        self.project, self.mode, self.dir, self.entity = project, mode, dir, entity
        self.tags, self.group, self.job_type = list(tags or []), group, job_type
        self._run, self._skipped = None, False

    def start(
        self, config: dict[str, Any], run_id: str, choices: dict[str, str], skipped: bool = False
    ) -> None:
        import wandb

        if self.dir:
            os.makedirs(self.dir, exist_ok=True)
        sweep_dir, table = _hydra_sweep()
        name = "-".join(f"{v}" for v in choices.values()) + f"-s{config.get('seed')}"
        own = config.get("tags") or []
        self._run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            dir=self.dir,
            config=config,
            name=name,
            id=run_id,
            resume="allow",
            group=self.group or default_group(sweep_dir, table),
            job_type=self.job_type,
            tags=list(dict.fromkeys([*self.tags, *map(str, own)])),
            notes=config.get("note"),
            reinit="finish_previous",  # one run per sweep cell in one process (the boolean is deprecated)
        )
        self._skipped = skipped

    def log(self, metrics: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.log({k: v for k, v in metrics.items() if isinstance(v, int | float)})
            self._run.summary.update({k: v for k, v in metrics.items() if isinstance(v, int | float | str)})

    def log_row(self, row: dict[str, Any]) -> None:
        if self._run is None:
            return
        self.log(row_scalars(row))
        words = {k: v for k, v in (row.get("metrics") or {}).items() if isinstance(v, str)}
        self._run.summary.update(words | {"skipped": bool(self._skipped)})

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
