"""`securetl-check -cd DIR`: the config test of the suite (every option of every group composes, and every
`_target_` node's keys and values fit its constructor's signature) for a user's own config dir, whose
options `securetl -cd DIR` would use. Without -cd it checks the suite's own conf/.

    PYTHONPATH=~/mycode securetl-check -cd ~/mycfg        # the options under ~/mycfg
    securetl-check -cd ~/mycfg --all                      # ... and every built-in option with them

A `_target_` that cannot be imported is named with the PYTHONPATH that would make it importable.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from securetl.validate import ConfigError, check_node

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# the groups a run composes (the `hydra` tree and `paths` are Hydra's and the machine's)
GROUPS = (
    "dataset",
    "encoder",
    "encoder_attack",
    "data_attack",
    "defense",
    "probe",
    "logger",
    "threat",
    "ablation",
    "variant",
    "table",
    "trigger",
)
# where a `_target_`'s settings live in the composed config, besides its group's own node
CHECKED_NODES = ("dataset", "encoder", "encoder_attack", "data_attack", "defense", "probe", "logger", "eval")
_NO_MODULE = re.compile(r"No module named '([\w.]+)'")


def import_hint(message: str, search: Sequence[Path] = ()) -> str:
    """`message` with, where it is about a module Python cannot find, what to put on PYTHONPATH: the folder
    that holds the module if one of `search` (and their parents, and the working directory) does."""
    m = _NO_MODULE.search(message)
    if not m or "PYTHONPATH" in message:
        return message
    top = m.group(1).split(".")[0]
    if top == "securetl":
        return message  # the suite's own module: a typo in the _target_, not a path
    # the working directory, the config dirs and their parents, and the folders right under them (a
    # project's code/ beside its conf/)
    here = list(dict.fromkeys([Path.cwd(), *[p for d in search for p in (Path(d), Path(d).parent)]]))
    here += [sub for d in here if d.is_dir() for sub in sorted(d.iterdir()) if sub.is_dir()]
    found = next((d for d in here if (d / f"{top}.py").exists() or (d / top / "__init__.py").exists()), None)
    where = str(found.resolve()) if found else "/the/folder/holding/" + top
    current = os.environ.get("PYTHONPATH")
    value = f"{where}:{current}" if current else where
    head = message.split(" cannot be imported", 1)[0] if " cannot be imported" in message else ""
    head = f"{head} cannot be imported: " if head else f"{message.splitlines()[0]}: "
    return (
        f"{head}Python cannot find the module {top!r}; put the folder that holds it on PYTHONPATH, "
        f"e.g. `PYTHONPATH={value} securetl ...`"
    )


def options(group: str, dirs: Sequence[Path]) -> list[str]:
    """The options of `group` under `dirs` (a group may nest: `dataset/extra/x.yaml` is `extra/x`)."""
    out = set()
    for d in dirs:
        base = Path(d) / group
        out |= {str(p.relative_to(base).with_suffix("")) for p in base.rglob("*.yaml")}
    return sorted(out)


def check_option(group: str, option: str, dirs: Sequence[Path]) -> str | None:
    """Compose the run config with `group=option` (the user's dirs on the search path, as `-cd` puts them)
    and check every `_target_` node; the problem as one line, or None."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import securetl.run  # noqa: F401  the resolvers the configs use

    searchpath = ",".join(f"file://{Path(d).resolve()}" for d in dirs)
    overrides = [f"hydra.searchpath=[{searchpath}]"] if dirs else []
    key = f"{group}@eval.reference_trigger" if group == "trigger" else group
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("run", overrides=[*overrides, f"{key}={option}"])
        for node in CHECKED_NODES:
            if isinstance(cfg.get(node), DictConfig):
                check_node(cfg._get_node(node), node)
    except ConfigError as e:
        if "must be set" in str(e):
            return None  # a `???` the user gives at run time (encoder.checkpoint=PATH): not a YAML problem
        return import_hint(str(e), dirs)
    except Exception as e:  # noqa: BLE001 — a YAML that does not compose, whatever Hydra raises
        return import_hint(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", dirs)
    finally:
        GlobalHydra.instance().clear()
    return None


def check(dirs: Sequence[Path], groups: Sequence[str] = GROUPS, builtin: bool = False) -> list[str]:
    """Problems (`group=option: why`) of the options under `dirs` (and conf/'s with `builtin`, or when no
    dir is given)."""
    dirs = [Path(d) for d in dirs]
    scope = [*dirs, CONF_DIR] if builtin or not dirs else dirs
    problems = []
    for group in groups:
        for option in options(group, scope):
            if (why := check_option(group, option, dirs)) is not None:
                problems.append(f"{group}={option}: {why}")
    return problems


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="securetl-check", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--config-dir", "-cd", action="append", default=[], help="a config dir, as `securetl -cd`"
    )
    ap.add_argument("--all", action="store_true", help="check the built-in options of conf/ too")
    ap.add_argument(
        "--group", action="append", default=None, help=f"only these groups (of {', '.join(GROUPS)})"
    )
    args = ap.parse_args(argv)
    logging.getLogger("hydra.utils").setLevel(logging.CRITICAL)  # get_object logs what we report anyway
    dirs = [Path(d).expanduser() for d in args.config_dir]
    for d in dirs:
        if not d.is_dir():
            sys.exit(f"securetl-check: error: --config-dir {d}: no such folder")
    groups = args.group or GROUPS
    problems = check(dirs, groups, builtin=args.all)
    n = sum(len(options(g, [*dirs, CONF_DIR] if args.all or not dirs else dirs)) for g in groups)
    for p in problems:
        print(f"securetl-check: {p}", file=sys.stderr)
    print(f"securetl-check: {n - len(problems)} of {n} option(s) fine")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
