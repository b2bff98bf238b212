"""`securetl`: the Hydra app. A thin @hydra.main over `pipeline.run` (which tests call directly).

A single run that is given a bad config prints one line (`securetl: error: ...`) and exits 2. In a sweep
(`-m`), a cell that fails does not end the sweep: its error goes to its log and to a failure record
(`${paths.results_dir}/failed/<run_id>.json`, which the table tool lists), the other cells run, and at the
end `SweepReport` (a Hydra callback, conf/run.yaml) lists the failed cells and the exit code is 1. The
records are what carry failures out of joblib or SLURM workers, which run in other processes.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from securetl.validate import ConfigError

log = logging.getLogger("securetl")

# conf/ sits at the repository root (the brief's layout); the package is installed editable from it.
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# A per-process id keeps Hydra output dirs of two runs started in the same second apart.
OmegaConf.register_new_resolver("uid", lambda: uuid.uuid4().hex[:6], use_cache=True, replace=True)

# Set by the sweep's own process before its jobs start, and inherited by launcher workers: it tells this
# sweep's failure records from older ones.
SWEEP_ENV = "SECURETL_SWEEP_ID"
# failed cells of the sweep this process ran (SweepReport fills it; main() turns it into the exit code)
SWEEP_FAILURES: list[dict[str, Any]] = []
_LOCAL_FAILURES: list[dict[str, Any]] = []  # failed cells that ran in this process


def _record_failure(
    cfg: DictConfig, choices: dict[str, str], overrides: list[str], err: BaseException
) -> None:
    """Write this cell's failure record; a failure to write it must not hide the cell's own error."""
    from securetl import results

    hc = HydraConfig.get()
    job = {"num": hc.job.get("num"), "log_dir": hc.runtime.output_dir}
    record = results.failure_record(cfg, choices, overrides, err, sweep=os.environ.get(SWEEP_ENV), job=job)
    _LOCAL_FAILURES.append(record)  # the report still finds it (in-process launcher) if it cannot be written
    try:
        log.info("failure record: %s", results.write_failure(Path(cfg.paths.results_dir), record))
    except OSError as e:
        log.error("could not write a failure record for this cell: %s", e)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="run")
def app(cfg: DictConfig) -> float | None:
    from securetl import pipeline, results  # imported here so `securetl --help` stays fast

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    sweep = hc.mode == RunMode.MULTIRUN
    cell = f"[job {hc.job.num}] " if sweep else ""  # which cell of a sweep a message is about
    choices = results.choices_of(cfg)
    try:
        row = pipeline.run(cfg, choices=choices, overrides=overrides)
    except ConfigError as e:
        log.error("%s", e)
        print(f"securetl: error: {cell}{e}", file=sys.stderr)
        if not sweep:
            sys.exit(2)
        _record_failure(cfg, choices, overrides, e)
        return None
    except Exception as e:  # a crash of one cell (out of memory, a bug) must not end a whole sweep either
        if not sweep:
            raise
        log.exception("this cell failed")  # the traceback goes to the job's log
        print(f"securetl: error: {cell}{type(e).__name__}: {e}", file=sys.stderr)
        _record_failure(cfg, choices, overrides, e)
        return None
    results.clear_failure(Path(cfg.paths.results_dir), row["run_id"])
    acc = row["metrics"].get("acc")
    return float(acc) if isinstance(acc, int | float) else None


class SweepReport(Callback):
    """Hydra callback (conf/run.yaml `hydra.callbacks`) of the sweep's own process: tags this sweep's
    failure records, checks once that rows can be written at all, and lists the failed cells at the end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from securetl import results

        os.environ.setdefault(SWEEP_ENV, uuid.uuid4().hex)
        SWEEP_FAILURES.clear()
        _LOCAL_FAILURES.clear()
        try:  # every cell writes to the same place: an unwritable results dir ends the sweep before it starts
            results.ensure_results_dir(Path(config.paths.results_dir))
        except ConfigError as e:
            print(f"securetl: error: {e}", file=sys.stderr)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from securetl import results

        failed = results.read_failures(Path(config.paths.results_dir), sweep=os.environ.get(SWEEP_ENV))
        seen = {f["run_id"] for f in failed}
        failed += [f for f in _LOCAL_FAILURES if f["run_id"] not in seen]
        SWEEP_FAILURES[:] = failed
        if failed:
            where = Path(config.paths.results_dir) / "failed"
            # the command line's fixed (unswept) settings are the same in every cell: not worth repeating
            fixed = {o.split("=", 1)[0] for o in config.hydra.overrides.task if "," not in o}
            lines = [f"securetl: {len(failed)} cell(s) of this sweep failed (records under {where}):"]
            for f in failed:
                own = [o for o in f["overrides"] if o.split("=", 1)[0] not in fixed] or f["overrides"]
                lines.append(f"  job {f['job'].get('num')} [{' '.join(own)}]: {f['error']}")
            print("\n".join(lines), file=sys.stderr)


def main() -> None:
    if not (CONF_DIR / "run.yaml").exists():
        sys.exit(
            f"securetl: cannot find its configs at {CONF_DIR}; install the package editable (pip install -e .)"
        )
    app()
    if SWEEP_FAILURES:
        sys.exit(1)


if __name__ == "__main__":
    main()
