"""Using the suite daily (issue 23): `--cfg hydra --resolve`, notes and tags that do not recompute a cell, what a
row records about its run, one source of truth for Python defaults, launchers, Optuna objectives, the config
checker, and bringing one's own dataset and defense from outside the repository."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import CONF, ROOT, TINY

BIN = Path(sys.executable).parent


def cli(args: list[str], env: dict, timeout: int = 300, cwd: Path = ROOT, tool: str = "securetl"):
    return subprocess.run(
        [str(BIN / tool), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


@pytest.fixture
def env(tmp_path):
    e = {k: v for k, v in os.environ.items() if not k.startswith("SECURETL_")}
    return e | {"SECURETL_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------- defect 6
def test_cfg_hydra_resolve_prints_the_hydra_config(env, tmp_path):
    out = cli(["--cfg", "hydra", "--resolve"], env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"dir: {tmp_path}/outputs/runs/" in out.stdout
    # a run still follows paths.output_dir
    out = cli(["--cfg", "all", "--resolve", f"paths.output_dir={tmp_path}/elsewhere"], env, timeout=120)
    assert out.returncode == 0 and f"dir: {tmp_path}/elsewhere/runs/" in out.stdout


# --------------------------------------------------------------------------- defects 8 and 10
def test_a_note_and_tags_are_recorded_not_hashed(compose_cfg):
    from securetl.results import make_row, run_id

    plain = compose_cfg([])
    noted = compose_cfg(["note=first_try", "tags=[pilot,cpu]", "objective=acc - asr"])
    assert run_id(plain) == run_id(noted)
    assert run_id(plain) != run_id(compose_cfg(["seed=3"]))
    row = make_row(noted, "x", {}, {}, {}, {}, torch.device("cpu"), {}, [], memory={})
    assert row["note"] == "first_try" and row["tags"] == ["pilot", "cpu"]


def test_a_row_says_when_and_with_what_it_was_computed_and_a_new_note_does_not_recompute(compose_cfg):
    from securetl.pipeline import run

    row = run(compose_cfg(["note=first_try", "tags=[pilot]"]))
    assert row["note"] == "first_try" and row["tags"] == ["pilot"]
    assert abs(time.mktime(time.strptime(row["time"][:19], "%Y-%m-%dT%H:%M:%S")) - time.time()) < 3600
    assert row["git_dirty"] in (True, False, None)
    for pkg in ("python", "torch", "torchvision", "timm"):
        assert re.match(r"\d+\.\d+", row["versions"][pkg]), row["versions"]
    assert row["output_dir"] is None  # no Hydra job: called from code
    again = run(compose_cfg(["note=second_try"]))
    assert again.get("skipped") and again["run_id"] == row["run_id"] and again["note"] == "first_try"


@pytest.mark.slow
def test_a_row_points_to_its_hydra_output_folder(env, tmp_path):
    out = cli([*TINY, "note=first_try"], env)
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = (tmp_path / "results" / "raw").glob("*.json")
    row = json.loads(path.read_text())
    out_dir = Path(row["output_dir"])
    assert out_dir.is_dir() and str(out_dir).startswith(str(tmp_path / "outputs" / "runs"))
    assert (out_dir / ".hydra" / "overrides.yaml").exists() and (out_dir / "run.log").exists()


def test_git_sha_of_a_copy_outside_a_checkout_comes_from_the_environment(monkeypatch):
    from securetl import results

    not_a_repo = lambda args, **kw: subprocess.CompletedProcess(args, 128, stdout="", stderr="fatal")  # noqa: E731
    monkeypatch.setattr(results.subprocess, "run", not_a_repo)
    monkeypatch.delenv("SECURETL_SOURCE_SHA", raising=False)
    assert results.git_sha() == "unknown"
    monkeypatch.setenv("SECURETL_SOURCE_SHA", "184b64a")
    assert results.git_sha() == "184b64a"
    in_a_repo = lambda args, **kw: subprocess.CompletedProcess(args, 0, stdout="0c00e5e\n")  # noqa: E731
    monkeypatch.setattr(results.subprocess, "run", in_a_repo)
    assert results.git_sha() == "0c00e5e"  # a checkout says what it is, whatever the environment says


def test_git_dirty_follows_the_tree(tmp_path, monkeypatch):
    from securetl import results

    calls = []

    def fake_run(args, **kwargs):
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, stdout=" M src/x.py\n", stderr="")

    monkeypatch.setattr(results.subprocess, "run", fake_run)
    assert results.git_dirty() is True and "--porcelain" in calls[0]
    monkeypatch.setattr(
        results.subprocess, "run", lambda args, **kw: subprocess.CompletedProcess(args, 0, stdout="")
    )
    assert results.git_dirty() is False
    monkeypatch.setattr(
        results.subprocess, "run", lambda args, **kw: subprocess.CompletedProcess(args, 128, stdout="")
    )
    assert results.git_dirty() is None


# --------------------------------------------------------------------------- defect 13
# Groups whose options each configure one method: a `_target_` that a single option uses must default, in
# Python, to that option's values, so that calling it from code builds what a run builds. The other groups
# (encoder, probe, trigger, ...) hold named instances of shared classes (probe=linear and probe=finetune are
# one Probe), where no single YAML is "the" default: those options set every key they mean.
METHOD_GROUPS = ("dataset", "data_attack", "encoder_attack", "defense", "logger")
# A None default that stands for a value the code fills in
NONE_MEANS = {("securetl.data.real.build_imagenet10", "classes"): "securetl.data.real.IMAGENET10_CLASSES"}
# Known disagreements in files outside issue 23's remit (attacks/): strict, so a fix shows up here
KNOWN: set[tuple[str, str]] = set()  # (target, key) pairs known to disagree: none left


def _locate(dotted: str):
    import importlib

    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _same(a, b) -> bool:
    import math

    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-6)  # a YAML writes e^2 or 40/255 to 6 digits
    return a == b


def _single_use_targets() -> dict[str, tuple[str, dict]]:
    """`_target_` -> (option, its YAML node) for targets that exactly one option of METHOD_GROUPS uses."""
    from omegaconf import OmegaConf

    users: dict[str, list[tuple[str, dict]]] = {}
    for group in sorted(p for p in CONF.iterdir() if p.is_dir()):
        for f in sorted(group.glob("*.yaml")):
            node = OmegaConf.to_container(OmegaConf.load(f), resolve=False)
            if isinstance(node, dict) and "_target_" in node:
                users.setdefault(node["_target_"], []).append((f"{group.name}={f.stem}", node))
    return {t: u[0] for t, u in users.items() if len(u) == 1 and u[0][0].split("=")[0] in METHOD_GROUPS}


def _disagreements(target: str, node: dict) -> list[str]:
    import inspect

    fn = _locate(target)
    params = inspect.signature(fn).parameters
    out = []
    for key, value in node.items():
        p = params.get(key)
        if key.startswith("_") or p is None or p.default is inspect.Parameter.empty:
            continue
        if isinstance(value, str) and ("${" in value or value == "???"):
            continue  # where the data live, a value the user must give: not a default
        default = p.default
        if default is None and (target, key) in NONE_MEANS:
            default = list(_locate(NONE_MEANS[(target, key)]))
        if default is None and key == "clean_fraction":  # None = the class's declared Knowledge
            default = fn.knowledge.clean_fraction
        if not _same(default, value) and not (default in ((), None) and value in ([], None)):
            out.append(f"{key}: Python {default!r}, YAML {value!r}")
    return out


TARGETS = _single_use_targets()


@pytest.mark.parametrize("target", sorted(TARGETS), ids=[TARGETS[t][0] for t in sorted(TARGETS)])
def test_python_defaults_equal_the_yaml(target, request):
    option, node = TARGETS[target]
    wrong = _disagreements(target, node)
    known = [w for w in wrong if (target, w.split(":")[0]) in KNOWN]
    if known:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"outside issue 23's files: {known}"))
    assert not wrong, f"{option} ({target}): " + "; ".join(wrong)


def test_the_synthetic_defaults_build_the_dataset_a_run_builds(compose_cfg):
    from hydra.utils import instantiate

    from securetl.data.synthetic import build_synthetic

    small = dict(n_train=50, n_test=20, n_pretrain=30, n_reference=10)
    cfg = compose_cfg([f"dataset.{k}={v}" for k, v in small.items()], tiny=False)
    a, b = instantiate(cfg.dataset), build_synthetic(**small)
    assert a.train.x.equal(b.train.x) and a.pretrain.x.equal(b.pretrain.x)


# --------------------------------------------------------------------------- defect 5
def test_the_joblib_launcher_is_the_plugins_own_config(env):
    """No YAML of ours shadows the plugin's schema (Hydra warned once per job composed)."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    assert not (CONF / "hydra" / "launcher" / "joblib.yaml").exists()
    out = cli(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "--cfg", "hydra"], env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ConfigStore schema" not in out.stderr and "n_jobs: 2" in out.stdout


def test_a_missing_launcher_plugin_is_one_line_with_the_pip_command():
    from securetl.run import missing_plugin

    def nothing(module):
        return False

    msg = missing_plugin(["-m", "hydra/launcher=joblib", "seed=0,1"], importable=nothing)
    assert "pip install -e '.[parallel]'" in msg and "hydra-joblib-launcher" in msg
    assert "'.[slurm]'" in missing_plugin(["hydra/launcher=slurm"], importable=nothing)
    assert "'.[optuna]'" in missing_plugin(["hydra/sweeper=optuna"], importable=nothing)
    assert missing_plugin(["hydra/launcher=slurm", "--cfg", "hydra"], importable=nothing) is None
    assert missing_plugin(["hydra/launcher=joblib"], importable=lambda m: True) is None

    # the real entry point, with the plugin hidden from the import system
    code = (
        "import sys; sys.modules['hydra_plugins.hydra_joblib_launcher'] = None; "
        "sys.argv = ['securetl', '-m', 'hydra/launcher=joblib', 'seed=0,1']; "
        "from securetl.run import main; main()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "securetl: error: hydra/launcher=joblib needs the hydra-joblib-launcher plugin, which is not "
        "installed: pip install -e '.[parallel]'"
    ]


# --------------------------------------------------------------------------- defect 9
def test_the_objective_a_sweep_returns_is_a_config_choice():
    from securetl.run import objective_value, parse_objective
    from securetl.validate import ConfigError

    m = {"acc": 0.9, "asr": 0.25, "asr/data": 0.5, "asr_source": "data"}
    assert objective_value(parse_objective("acc"), m) == 0.9
    assert objective_value(parse_objective("acc - asr"), m) == pytest.approx(0.65)
    assert objective_value(parse_objective("acc - 2 * asr/data"), m) == pytest.approx(-0.1)
    assert objective_value(parse_objective(["acc", "asr"]), m) == (0.9, 0.25)  # multi-objective
    assert objective_value(parse_objective("knn_acc"), m) is None  # the run has no such metric
    for bad in ("__import__('os')", "acc / 2", "acc ** 2", "acc.real", "", "[]", "2"):
        with pytest.raises(ConfigError, match="objective="):
            parse_objective(bad)


def test_a_bad_objective_stops_the_run_before_any_work(env, tmp_path):
    out = cli([*TINY, "objective=acc ** 2"], env, timeout=120)
    assert out.returncode == 2 and "securetl: error: objective='acc ** 2'" in out.stderr
    assert not (tmp_path / ".cache").exists()


# --------------------------------------------------------------------------- defect 11
def test_the_slurm_launcher_takes_the_sites_settings_and_names_the_job(compose_cfg, monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.setenv("SECURETL_SLURM_PARTITION", "gpu")
    monkeypatch.setenv("SECURETL_SLURM_ACCOUNT", "proj42")
    monkeypatch.setenv("SECURETL_SLURM_GPUS", "2")
    monkeypatch.setenv("SECURETL_SLURM_TIMEOUT_MIN", "90")
    cfg = compose_cfg(["hydra/launcher=slurm", "table=demo"], tiny=False)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["name"] == "securetl-demo"
    assert launcher["partition"] == "gpu" and launcher["account"] == "proj42" and launcher["qos"] is None
    assert launcher["gpus_per_node"] == 2 and launcher["timeout_min"] == 90
    monkeypatch.delenv("SECURETL_SLURM_PARTITION")
    cfg = compose_cfg(["hydra/launcher=slurm"], tiny=False)
    assert cfg.hydra.launcher.name == "securetl-sweep" and cfg.hydra.launcher.partition is None
    # every key is one the plugin's SlurmLauncher schema has (checked where the plugin is installed)
    try:
        from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    except ImportError:
        return
    assert set(launcher) - {"_target_"} <= set(SlurmQueueConf.__dataclass_fields__)


# --------------------------------------------------------------------------- defect 14
def _user_dir(tmp_path: Path) -> Path:
    code, conf = tmp_path / "code", tmp_path / "conf"
    (conf / "defense").mkdir(parents=True)
    code.mkdir()
    (code / "keep_all.py").write_text(
        "from securetl.interfaces import Defense\n\n\nclass KeepAll(Defense):\n    name = 'keep_all'\n\n"
        "    def __init__(self, strength: float = 1.0):\n        super().__init__()\n        self.strength = strength\n"
    )
    (conf / "defense" / "keep_all.yaml").write_text("_target_: keep_all.KeepAll\nstrength: 0.5\n")
    (conf / "defense" / "typo.yaml").write_text("_target_: keep_all.KeepAll\nstrenght: 0.5\n")
    return tmp_path


def test_securetl_check_checks_a_users_config_dir(tmp_path, monkeypatch):
    from securetl.check import check

    user = _user_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    problems = check([user / "conf"])  # keep_all.py is not importable yet: both options say so
    assert [p.split(":")[0] for p in problems] == ["defense=keep_all", "defense=typo"]
    assert "keep_all.KeepAll cannot be imported: Python cannot find the module 'keep_all'" in problems[0]
    assert f"PYTHONPATH={user / 'code'}" in problems[0]  # found next to the config dir
    monkeypatch.syspath_prepend(str(user / "code"))
    assert check([user / "conf"]) == [
        "defense=typo: defense.strenght is not a setting of keep_all.KeepAll (its settings: strength)"
    ]


def test_a_missing_pythonpath_says_what_to_set(tmp_path, env):
    user = _user_dir(tmp_path)
    out = cli(["-cd", str(user / "conf"), *TINY, "defense=keep_all"], env, timeout=120, cwd=user / "code")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("securetl: error:")]
    assert "cannot find the module 'keep_all'" in line and f"PYTHONPATH={user / 'code'}" in line


# --------------------------------------------------------------------------- defect 12
def _image_folder(base: Path, classes=("daisy", "rose", "tulip"), n=(12, 6)) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in zip(("train", "test"), n):
        for c in classes:
            (base / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
                    base / split / c / f"{i}.png"
                )
    return base


def test_a_folder_dataset_takes_its_classes_from_the_subfolders_and_pretrains_where_told(tmp_path):
    from securetl.data.folder import build_folder
    from securetl.validate import ConfigError

    base = _image_folder(tmp_path / "flowers")
    own = build_folder(str(base), name="flowers", size=16)
    assert own.name == "flowers" and own.class_names == ["daisy", "rose", "tulip"]
    assert own.train.x.shape == (36, 3, 16, 16) and own.test.x.shape == (18, 3, 16, 16)
    assert own.pretrain.x is own.train.x  # `self`: its own train images
    small = {"n_train": 30, "n_test": 10, "n_pretrain": 50, "n_reference": 10}
    other = build_folder(str(base), name="flowers", size=16, pretrain="synthetic", pretrain_settings=small)
    assert other.pretrain.x.shape == (50, 3, 16, 16) and (other.pretrain.y == -1).all()
    assert other.train.x.equal(own.train.x)
    with pytest.raises(ConfigError, match="no class sub-folders"):
        build_folder(str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="dataset.pretrain=nope"):
        build_folder(str(base), pretrain="nope")


def test_a_folder_run_is_named_after_the_dataset(compose_cfg, tmp_path, caplog):
    import logging

    from securetl.pipeline import run

    base = _image_folder(tmp_path / "flowers")
    cfg = compose_cfg(
        [
            "dataset=folder",
            f"dataset.folder={base}",
            "dataset.name=flowers",
            "dataset.size=16",
            "dataset.pretrain=synthetic",
            "dataset.pretrain_settings={n_train:30,n_test:10,n_pretrain:64,n_reference:10}",
            "dataset.n_pretrain=null",
        ],
    )
    with caplog.at_level(logging.INFO):
        row = run(cfg)
    assert row["choices"]["dataset"] == "folder" and row["config"]["dataset"]["name"] == "flowers"
    assert "dataset=flowers" in caplog.text and "pre-trains on dataset=synthetic (64 images)" in caplog.text
    assert "imagenet10" not in caplog.text


# --------------------------------------------------------------------------- the README's worked example
def readme_files() -> dict[str, str]:
    """The files of the README's "Bring your own data and your own method" example, by their path."""
    text = (ROOT / "README.md").read_text()
    out = {}
    for body in re.findall(r"```(?:python|yaml)\n(.*?)```", text, re.S):
        m = re.fullmatch(r"# ((?:mycode|myconf|teamconf)/\S+)", body.splitlines()[0])
        if m:
            out[m.group(1)] = body
    return out


README_RUN = (
    'securetl -cd myconf "hydra.searchpath=[file://$PWD/teamconf]" dataset=stripes defense=loss_trim '
    "data_attack=badnets"
)


def test_the_readmes_own_dataset_and_defense_example_runs(tmp_path, env):
    files = readme_files()
    assert set(files) == {"mycode/stripes.py", "mycode/loss_trim.py", "myconf/dataset/stripes.yaml",
                          "teamconf/defense/loss_trim.yaml"}  # fmt: skip
    for rel, body in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(body)
    readme = (ROOT / "README.md").read_text()
    assert README_RUN in readme and "export PYTHONPATH=$PWD/mycode" in readme
    assert "securetl-check -cd myconf -cd teamconf" in readme

    env = env | {"PYTHONPATH": str(tmp_path / "mycode"), "PATH": f"{BIN}:{os.environ['PATH']}"}
    with pytest.MonkeyPatch.context() as mp:  # securetl-check -cd myconf -cd teamconf, in this process
        from securetl.check import check

        mp.syspath_prepend(str(tmp_path / "mycode"))
        assert check([tmp_path / "myconf", tmp_path / "teamconf"]) == []

    tiny = "encoder.width=4 encoder.epochs=1 encoder.batch_size=64 probe.epochs=2 progress=false threads=1"
    out = subprocess.run(
        ["bash", "-c", f"{README_RUN} {tiny}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = (tmp_path / "results" / "raw").glob("*.json")
    row = json.loads(path.read_text())
    assert row["choices"]["dataset"] == "stripes" and row["choices"]["defense"] == "loss_trim"
    assert row["diagnostics"]["kept/size"] == 380 - int(0.1 * 380)  # 400 minus 20 reference images
    assert 0 <= row["metrics"]["acc"] <= 1 and "asr/data" in row["metrics"]
