"""`dataset=folder`: any image-folder dataset, with the encoder's pre-training split a choice.

    <root>/<folder>/<train_split>/<class>/*.png|jpg|...    one sub-folder per class (the labels: sorted names)
    <root>/<folder>/<test_split>/<class>/*

`pretrain` says what the encoder is pre-trained on (an encoder this run pre-trains; a released checkpoint,
`encoder.checkpoint=`, ignores it): `self` = this dataset's own train split (the encoder has seen the
downstream images, unlabelled), or the name of another dataset option (`synthetic`, `cifar10`, a dataset of
your own config dir) whose pre-training split is used, resized to `size` — the transfer setting, where the
encoder comes from elsewhere. The rows carry `dataset.name`, and the choice `dataset=folder`.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms import v2

from securetl.data.real import (
    _ClassSubsetFolder,
    _decode_all,
    _expect,
    _images_in,
    _open_rgb,
    _resize,
    _root,
    finish,
)
from securetl.interfaces import LabeledSet, Splits
from securetl.validate import ConfigError

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"


def _classes(base: Path, classes: list[str] | None, name: str) -> list[str]:
    if classes:
        return [str(c) for c in classes]
    found = (
        sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        if base.is_dir()
        else []
    )
    if not found:
        raise ConfigError(
            f"dataset={name}: no class sub-folders under {base} (expected {base}/<class>/<images>); set "
            "dataset.root / dataset.folder to your image folder"
        )
    return found


def _check(base: Path, classes: list[str], splits: tuple[str, ...], name: str) -> None:
    missing = [f"{split}/{c}/" for split in splits for c in classes if not _images_in(base / split / c)]
    if missing:
        shown = ", ".join(missing[:6]) + (f" ... ({len(missing)} in all)" if len(missing) > 6 else "")
        raise ConfigError(
            f"dataset={name}: no images in {shown} under {base}; each split needs one sub-folder of images per "
            "class (dataset.classes lists them; null = the train split's sub-folders)"
        )


def compose_dataset(option: str, settings: dict[str, Any] | None = None) -> Splits:
    """The splits of dataset option `option`, composed as `securetl dataset=OPTION dataset.KEY=VALUE...`
    would compose it (`settings`: KEY: VALUE of that dataset): inside a running `securetl`, on its config
    search path (a user's `-cd` dirs too), else on the suite's conf/."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from securetl.build import build

    # json writes values as Hydra's override grammar reads them (true, null, "text", [1, 2])
    overrides = [f"dataset={option}", *(f"dataset.{k}={json.dumps(v)}" for k, v in (settings or {}).items())]
    try:
        if GlobalHydra.instance().is_initialized():
            cfg = compose("run", overrides=overrides)
        else:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose("run", overrides=overrides)
            GlobalHydra.instance().clear()
    except Exception as e:  # noqa: BLE001 — Hydra's own errors: an unknown option, a broken YAML
        raise ConfigError(f"dataset.pretrain={option}: {str(e).splitlines()[0]}") from None
    if str(cfg.dataset.get("_target_", "")).endswith("build_folder"):
        raise ConfigError(f"dataset.pretrain={option}: a folder dataset pre-trains on itself (use `self`)")
    return build(cfg.dataset)


def build_folder(
    folder: str,
    root: str = "data",
    name: str = "folder",
    classes: list[str] | None = None,
    class_names: list[str] | None = None,
    train_split: str = "train",
    test_split: str = "test",
    size: int = 32,
    pretrain: str = "self",
    pretrain_settings: dict[str, Any] | None = None,
    num_workers: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
    n_pretrain: int | None = None,
    n_reference: int = 0,
    seed: int = 0,
    n_clean: int = 0,
) -> Splits:
    """An image-folder dataset `root`/`folder` (an absolute `folder` works too; see the module doc): images
    resized (short side) to `size` and centre-cropped to `size` x `size`; `classes` null = the sorted
    sub-folders of the train split; `pretrain`: `self` or another dataset option, composed with
    `pretrain_settings` (its own keys, e.g. {n_pretrain: 20000} or {download: true})."""
    base = _root(root) / folder
    classes = _classes(base / train_split, classes, name)
    names = [str(c) for c in class_names] if class_names else classes
    if len(names) != len(classes) or len(set(classes)) != len(classes):
        raise ConfigError("dataset.classes must be distinct folder names, and dataset.class_names as many")
    _check(base, classes, (train_split, test_split), name)
    tf = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    loader = functools.partial(_open_rgb, size=size)
    tr = _ClassSubsetFolder(str(base / train_split), classes, transform=tf, loader=loader)
    te = _ClassSubsetFolder(str(base / test_split), classes, transform=tf, loader=loader)
    _expect(name, len(tr) + len(te), size)
    train = _decode_all(name, tr, size, num_workers, f"{name} {train_split}")
    test = _decode_all(name, te, size, num_workers, f"{name} {test_split}")
    pre = None
    if pretrain != "self":
        source = compose_dataset(pretrain, pretrain_settings).pretrain
        # unlabelled for this task: another dataset's labels are not this one's classes
        pre = LabeledSet(_resize(source.x, size), torch.full_like(source.y, -1))
        log.info("dataset %s: the encoder pre-trains on dataset=%s (%d images)", name, pretrain, len(pre))
    return finish(name, train, test, names, pre, n_train, n_test, n_pretrain, n_reference, seed, n_clean)
