"""`securetl`: the Hydra app. A thin @hydra.main over `pipeline.run` (which tests call directly).

A single run that is given a bad config prints one line (`securetl: error: ...`) and exits 2. In a sweep
(`-m`), a cell that fails does not end the sweep: its error goes to its log and to a failure record
(`${paths.results_dir}/failed/<run_id>.json`, which the table tool lists), the other cells run, and at the
end `SweepReport` (a Hydra callback, conf/run.yaml) lists the failed cells and the exit code is 1. The
records are what carry failures out of joblib or SLURM workers, which run in other processes.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from securetl.check import import_hint
from securetl.validate import ConfigError

log = logging.getLogger("securetl")

# conf/ sits at the repository root (the brief's layout); the package is installed editable from it.
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# A per-process id keeps Hydra output dirs of two runs started in the same second apart.
OmegaConf.register_new_resolver("uid", lambda: uuid.uuid4().hex[:6], use_cache=True, replace=True)
# `${securetl.or:${hydra.runtime.choices.table},sweep}`: a value that may be null, with a default (the SLURM
# job name of conf/hydra/launcher/slurm.yaml)
OmegaConf.register_new_resolver(
    "securetl.or", lambda value, default: default if value is None else value, replace=True
)

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
        objective = parse_objective(cfg.get("objective", "acc"))
        row = pipeline.run(cfg, choices=choices, overrides=overrides)
    except ConfigError as e:
        e = ConfigError(import_hint(str(e), _config_dirs(hc)))  # a user's module not on PYTHONPATH: say so
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
    return objective_value(objective, row["metrics"])


# --------------------------------------------------------------------------- what a sweep's job returns
# `objective` (conf/run.yaml): a metric (`acc`), an expression of metrics with + - * and numbers
# (`acc - asr`, `acc - 2 * asr/data`), or a list of them for a multi-objective search ([acc, asr]; give the
# Optuna sweeper as many directions). A metric name may hold `/` (asr/data), so there is no division.
_METRIC = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:/[A-Za-z0-9_]+)*")
_ALLOWED = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Add, ast.Sub, ast.Mult, ast.USub, ast.UAdd)


def _placeholders(text: str) -> tuple[str, list[str]]:
    """`acc - asr/data` -> (`m0 - m1`, [acc, asr/data])."""
    names: list[str] = []

    def sub(m: re.Match) -> str:
        names.append(m.group(0))
        return f"m{len(names) - 1}"

    return _METRIC.sub(sub, text), names


def parse_objective(spec: Any) -> list[tuple[str, ast.Expression, list[str]]]:
    """Each objective as (its text, its parsed expression over placeholders m0, m1, ..., the metric names
    they stand for). A bad expression is a ConfigError, before the run."""
    items = list(spec) if isinstance(spec, list | tuple | ListConfig) else [spec]
    if not items:
        raise ConfigError("objective=[]: give a metric, an expression such as `acc - asr`, or a list of them")
    out = []
    for item in items:
        text = str(item)
        expr, names = _placeholders(text)
        try:
            tree = ast.parse(expr, mode="eval")
        except SyntaxError:
            tree = None
        ok = tree is not None and all(
            isinstance(n, _ALLOWED)
            or (isinstance(n, ast.Name) and re.fullmatch(r"m\d+", n.id))
            or (isinstance(n, ast.Constant) and isinstance(n.value, int | float))
            or isinstance(n, ast.Load)
            for n in ast.walk(tree)
        )
        if not ok or not names:
            raise ConfigError(
                f"objective={text!r}: use metrics (acc, asr, asr/data, knn_acc, ...), numbers, + - * and "
                "parentheses, e.g. objective='acc - asr', or a list for several objectives ([acc, asr])"
            )
        out.append((text, tree, names))
    return out


def objective_value(
    objective: list[tuple[str, ast.Expression, list[str]]], metrics: dict[str, Any]
) -> float | tuple[float, ...] | None:
    """The objective(s) on a row's metrics: a float, a tuple for several, None where a metric is missing
    (the sweeper then counts the job as failed)."""
    values = []
    for text, tree, names in objective:
        missing = [n for n in names if not isinstance(metrics.get(n), int | float)]
        if missing:
            log.error("objective %r: the run has no metric %s", text, ", ".join(missing))
            return None
        env = {f"m{i}": float(metrics[n]) for i, n in enumerate(names)}
        values.append(float(eval(compile(tree, "<objective>", "eval"), {"__builtins__": {}}, env)))  # noqa: S307
    return values[0] if len(values) == 1 else tuple(values)


def _config_dirs(hc: Any) -> list[Path]:
    """The file config dirs of this run (`-cd DIR`, `hydra.searchpath`): where a user's modules may sit."""
    return [
        Path(s.path)
        for s in hc.runtime.config_sources
        if s.get("schema") == "file" and s.get("path") and Path(s.path) != CONF_DIR
    ]


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


# Hydra launchers that come as plugins: the module each needs and the extra of pyproject.toml that installs it
LAUNCHER_PLUGINS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher", "parallel"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "slurm"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "slurm"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "slurm"),
    "optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper", "optuna"),
}


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails, or a module set to None
        return False


def missing_plugin(argv: list[str], importable=_importable) -> str | None:
    """The one-line error for a `hydra/launcher=...` (or `hydra/sweeper=...`) on the command line whose
    plugin is not installed, instead of Hydra's `Unknown plugin class` traceback; None when all is there, or
    when the command only shows a config (`--cfg`, `--info`, `--help`), which needs no plugin."""
    if any(a in ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help") for a in argv):
        return None
    for arg in argv:
        group, _, option = arg.lstrip("+~").partition("=")
        if group not in ("hydra/launcher", "hydra/sweeper") or option not in LAUNCHER_PLUGINS:
            continue
        module, package, extra = LAUNCHER_PLUGINS[option]
        if not importable(module):
            return f"{arg} needs the {package} plugin, which is not installed: pip install -e '.[{extra}]'"
    return None


def main() -> None:
    if not (CONF_DIR / "run.yaml").exists():
        sys.exit(
            f"securetl: cannot find its configs at {CONF_DIR}; install the package editable (pip install -e .)"
        )
    if problem := missing_plugin(sys.argv[1:]):
        print(f"securetl: error: {problem}", file=sys.stderr)
        sys.exit(2)
    app()
    if SWEEP_FAILURES:
        sys.exit(1)


if __name__ == "__main__":
    main()
