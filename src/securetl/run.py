"""`securetl`: the Hydra app. A thin @hydra.main over `pipeline.run` (which tests call directly)."""

from __future__ import annotations

import logging
import sys
import uuid
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from securetl.validate import ConfigError

log = logging.getLogger("securetl")

# conf/ sits at the repository root (the brief's layout); the package is installed editable from it.
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# A per-process id keeps Hydra output dirs of two runs started in the same second apart.
OmegaConf.register_new_resolver("uid", lambda: uuid.uuid4().hex[:6], use_cache=True, replace=True)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="run")
def app(cfg: DictConfig) -> float | None:
    from securetl import pipeline, results  # imported here so `securetl --help` stays fast

    hc = HydraConfig.get()
    try:
        row = pipeline.run(cfg, choices=results.choices_of(cfg), overrides=list(hc.overrides.task))
    except ConfigError as e:
        log.error("%s", e)
        print(f"securetl: error: {e}", file=sys.stderr)
        sys.exit(2)
    return float(row["metrics"]["acc"])


def main() -> None:
    if not (CONF_DIR / "run.yaml").exists():
        sys.exit(
            f"securetl: cannot find its configs at {CONF_DIR}; install the package editable (pip install -e .)"
        )
    app()


if __name__ == "__main__":
    main()
