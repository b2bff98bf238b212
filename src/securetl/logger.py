"""Loggers: JSON rows are the source of truth; wandb is an optional mirror (offline unless asked)."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


class NoLogger:
    """`logger=none`: nothing beyond the JSON row."""

    def start(self, config: dict[str, Any], run_id: str, choices: dict[str, str]) -> None: ...

    def log(self, metrics: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


class WandbLogger(NoLogger):
    """`logger=wandb`: config + final metrics to Weights & Biases. mode: offline | online | disabled."""

    def __init__(
        self,
        project: str = "securetl",
        mode: str = "offline",
        dir: str | None = None,
        entity: str | None = None,
        tags: list[str] | None = None,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={mode!r}; choose offline, online or disabled")
        self.project, self.mode, self.dir, self.entity, self.tags = project, mode, dir, entity, tags or []
        self._run = None

    def start(self, config: dict[str, Any], run_id: str, choices: dict[str, str]) -> None:
        import wandb

        if self.dir:
            os.makedirs(self.dir, exist_ok=True)
        name = "-".join(f"{v}" for v in choices.values()) + f"-s{config.get('seed')}"
        self._run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            dir=self.dir,
            config=config,
            name=name,
            id=run_id,
            resume="allow",
            tags=self.tags,
            reinit=True,
        )

    def log(self, metrics: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.log({k: v for k, v in metrics.items() if isinstance(v, int | float)})
            self._run.summary.update({k: v for k, v in metrics.items() if isinstance(v, int | float | str)})

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
