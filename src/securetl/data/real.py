"""The paper's datasets — CIFAR-10/100, STL-10, SVHN, GTSRB, ImageNet-10 — read through torchvision from a
local directory (`dataset.root`, default `${paths.data_dir}`, i.e. $SECURETL_DATA_DIR or ./data).

Every builder, in this order:
  1. downloads with torchvision's own code when `download=true` (ImageNet cannot be downloaded);
  2. checks that the expected files are there, and where torchvision knows checksums and `verify=true`,
     their md5 — a missing or incomplete dataset is a ConfigError naming the dataset, the directory
     searched, and the two fixes, raised before any model work;
  3. parses the native format with torchvision's dataset classes (their own existence/md5 checks are
     skipped because step 2 already ran them, once, with a message that says which file is wrong);
  4. returns Splits of uint8 (N, 3, size, size) tensors held in memory, logging how much memory they take.

Splits.pretrain (the SSL pre-training images): STL-10's train+unlabeled split, its intended use; for the
other datasets the downstream train images themselves (the same tensor, no copy), so that an encoder can be
pre-trained on e.g. CIFAR-10 and transferred to another dataset, as in BadEncoder/DRUPE.

Splits.reference (BadEncoder's attacker-owned "reference inputs" of the target class): `n_reference`
train images, class-balanced and seeded, HELD OUT of the train split — so they are never in train/test, as
the interface requires; 100 of CIFAR-10's 50,000 images. The attacker owning a few downstream-domain images
is BadEncoder's threat model; drawing them from the train distribution is the closest stand-in.

`n_train`/`n_test`/`n_pretrain` (null = all) take seeded random subsets, for quick runs.
scripts/prepare_data.py reports, for a data directory, what is there and the expected layouts.
"""

from __future__ import annotations

import csv
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets as tvd
from PIL import Image
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2
from tqdm.auto import tqdm

from securetl.interfaces import LabeledSet, Splits
from securetl.safeload import NUMPY_GLOBALS, unsafe_globals
from securetl.validate import ConfigError

log = logging.getLogger(__name__)

# ImageNet-10 of Chang et al., "Deep Adaptive Image Clustering" (ICCV 2017), the usual 10-class ImageNet
# subset; the T-Core paper's own list is not available to this project, so it is a config key.
IMAGENET10_CLASSES = {
    "n02056570": "king_penguin",
    "n02085936": "maltese_dog",
    "n02128757": "snow_leopard",
    "n02690373": "airliner",
    "n02692877": "airship",
    "n03095699": "container_ship",
    "n04254680": "soccer_ball",
    "n04285008": "sports_car",
    "n07747607": "orange",
    "n09229709": "bubble",
}

GTSRB_CLASSES = [
    "speed_limit_20", "speed_limit_30", "speed_limit_50", "speed_limit_60", "speed_limit_70",
    "speed_limit_80", "end_of_speed_limit_80", "speed_limit_100", "speed_limit_120", "no_passing",
    "no_passing_over_3.5t", "right_of_way_at_next_intersection", "priority_road", "yield", "stop",
    "no_vehicles", "over_3.5t_prohibited", "no_entry", "general_caution", "dangerous_curve_left",
    "dangerous_curve_right", "double_curve", "bumpy_road", "slippery_road", "road_narrows_on_right",
    "road_work", "traffic_signals", "pedestrians", "children_crossing", "bicycles_crossing",
    "beware_of_ice_snow", "wild_animals_crossing", "end_of_all_limits", "turn_right_ahead",
    "turn_left_ahead", "ahead_only", "go_straight_or_right", "go_straight_or_left", "keep_right",
    "keep_left", "roundabout_mandatory", "end_of_no_passing", "end_of_no_passing_over_3.5t",
]  # fmt: skip

STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
SVHN_CLASSES = [str(d) for d in range(10)]


# --------------------------------------------------------------------------- expected layouts
@dataclass(frozen=True)
class Layout:
    """Where a dataset's files go under the data directory, shown in errors and by prepare_data.py."""

    name: str
    tree: str  # expected layout, relative to the data directory
    source: str  # where the files come from
    download: str  # what `dataset.download=true` does, or why it cannot


LAYOUTS: dict[str, Layout] = {
    "cifar10": Layout(
        "cifar10",
        "cifar-10-batches-py/            (cifar-10-python.tar.gz, extracted)\n"
        "    data_batch_1 ... data_batch_5, test_batch, batches.meta",
        "https://www.cs.toronto.edu/~kriz/cifar.html, CIFAR-10 python version",
        "fetches cifar-10-python.tar.gz (163 MB) with torchvision and extracts it",
    ),
    "cifar100": Layout(
        "cifar100",
        "cifar-100-python/               (cifar-100-python.tar.gz, extracted)\n    train, test, meta",
        "https://www.cs.toronto.edu/~kriz/cifar.html, CIFAR-100 python version",
        "fetches cifar-100-python.tar.gz (161 MB) with torchvision and extracts it",
    ),
    "stl10": Layout(
        "stl10",
        "stl10_binary/                   (stl10_binary.tar.gz, extracted)\n"
        "    train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin, class_names.txt",
        "https://cs.stanford.edu/~acoates/stl10/, binary version",
        "fetches stl10_binary.tar.gz (2.6 GB) with torchvision and extracts it",
    ),
    "svhn": Layout(
        "svhn",
        "svhn/\n    train_32x32.mat, test_32x32.mat   (format 2, cropped digits)",
        "http://ufldl.stanford.edu/housenumbers/, format 2",
        "fetches train_32x32.mat and test_32x32.mat (246 MB) with torchvision",
    ),
    "gtsrb": Layout(
        "gtsrb",
        "gtsrb/\n"
        "    GTSRB/Training/00000/*.ppm ... GTSRB/Training/00042/*.ppm   (GTSRB-Training_fixed.zip)\n"
        "    GTSRB/Final_Test/Images/*.ppm                               (GTSRB_Final_Test_Images.zip)\n"
        "    GT-final_test.csv                                           (GTSRB_Final_Test_GT.zip)",
        "https://benchmark.ini.rub.de/gtsrb_dataset.html, in torchvision.datasets.GTSRB's layout",
        "fetches the three GTSRB zips (about 350 MB) with torchvision and extracts them",
    ),
    "imagenet10": Layout(
        "imagenet10",
        "imagenet/                       (dataset.folder; an absolute path works too)\n"
        "    train/<wnid>/*.JPEG          for each WordNet id in dataset.classes (ILSVRC2012 train)\n"
        "    val/<wnid>/*.JPEG            the validation images sorted into class folders, as\n"
        "                                 torchvision.datasets.ImageNet or the usual valprep.sh script leave them",
        "https://image-net.org, ILSVRC2012 (an account is needed)",
        "",  # cannot be downloaded automatically
    ),
}


def dataset_error(
    name: str, root: Path, missing: list[str], corrupted: list[str] | None = None
) -> ConfigError:
    """The one message for a missing/incomplete/corrupted dataset: what, where, and the two fixes."""
    lay = LAYOUTS[name]
    root = Path(root).resolve()
    if corrupted:
        return ConfigError(
            f"dataset={name}: these files under {root} do not match torchvision's md5 checksums: "
            f"{_few(corrupted)}. Either re-download them (delete them and add dataset.download=true), or, "
            "for files you trust (e.g. a re-packed copy), skip the check with dataset.verify=false."
        )
    if lay.download:
        how = (
            "Fix it one of two ways:\n"
            f"  1. add dataset.download=true (needs a network; {lay.download}), or\n"
            "  2. put the files there yourself, in this layout:\n"
        )
    else:
        how = (
            "To fix it: ImageNet cannot be downloaded automatically (its licence needs an account);\n"
            "  get it from the source below and put the files there, in this layout:\n"
        )
    return ConfigError(
        f"dataset={name}: not found or incomplete under {root} (the data directory searched; "
        f"missing: {_few(missing)}).\n" + how + _indent(lay.tree, 8) + f"\n     source: {lay.source}\n"
        "     Or point dataset.root / paths.data_dir / $SECURETL_DATA_DIR at a directory that has them;\n"
        f"     `python scripts/prepare_data.py {root}` reports what is there."
    )


def _few(items: list[str], k: int = 6) -> str:
    return ", ".join(items[:k]) + (f" ... ({len(items)} in all)" if len(items) > k else "")


def _indent(text: str, n: int) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


def _root(root: str | Path) -> Path:
    return Path(root).expanduser()


# --------------------------------------------------------------------------- file checks
def _cifar_files(cls: type) -> list[tuple[str, str | None]]:
    base = cls.base_folder
    listed = [(f"{base}/{f}", md5) for f, md5 in cls.train_list + cls.test_list]
    return listed + [(f"{base}/{cls.meta['filename']}", cls.meta["md5"])]


def _stl10_files(unlabeled: bool) -> list[tuple[str, str | None]]:
    base = tvd.STL10.base_folder
    files = [(f"{base}/{f}", md5) for f, md5 in tvd.STL10.train_list + tvd.STL10.test_list]
    return [(f, m) for f, m in files if unlabeled or "unlabeled" not in f]


def _svhn_files() -> list[tuple[str, str | None]]:
    return [(f"svhn/{tvd.SVHN.split_list[s][1]}", tvd.SVHN.split_list[s][2]) for s in ("train", "test")]


def _check_files(
    root: Path, files: list[tuple[str, str | None]], verify: bool
) -> tuple[list[str], list[str]]:
    missing = [rel for rel, _ in files if not (root / rel).is_file()]
    corrupted: list[str] = []
    if verify and not missing:
        log.info("checking md5 of %d files under %s (dataset.verify=false skips this)", len(files), root)
        corrupted = [rel for rel, md5 in files if md5 and not check_integrity(str(root / rel), md5)]
    return missing, corrupted


def _images_in(d: Path, exts: tuple[str, ...] = IMG_EXTENSIONS) -> bool:
    return d.is_dir() and any(p.suffix.lower() in exts for p in d.iterdir())


def _gtsrb_problems(root: Path) -> list[str]:
    base = root / "gtsrb"
    missing = []
    train = base / "GTSRB" / "Training"
    if not train.is_dir():
        missing.append("gtsrb/GTSRB/Training/")
    else:
        missing += [
            f"gtsrb/GTSRB/Training/{c:05d}/*.ppm"
            for c in range(43)
            if not _images_in(train / f"{c:05d}", (".ppm",))
        ]
    images = base / "GTSRB" / "Final_Test" / "Images"
    gt = base / "GT-final_test.csv"
    if not images.is_dir():
        missing.append("gtsrb/GTSRB/Final_Test/Images/")
    if not gt.is_file():
        missing.append("gtsrb/GT-final_test.csv")
    if images.is_dir() and gt.is_file():
        with open(gt) as f:
            rows = list(csv.DictReader(f, delimiter=";", skipinitialspace=True))
        if not rows or "Filename" not in rows[0] or "ClassId" not in rows[0]:
            missing.append("gtsrb/GT-final_test.csv (rows with Filename;...;ClassId columns)")
        else:
            missing += [
                f"gtsrb/GTSRB/Final_Test/Images/{r['Filename']}"
                for r in rows
                if not (images / r["Filename"]).is_file()
            ]
    return missing


def _imagenet_problems(base: Path, classes: list[str], splits: tuple[str, ...]) -> list[str]:
    missing = []
    for split in splits:
        for wnid in classes:
            if not _images_in(base / split / wnid):
                missing.append(f"{base.name}/{split}/{wnid}/")
    return missing


def find_problems(name: str, root: str | Path, verify: bool = False, **opts) -> tuple[list[str], list[str]]:
    """(missing, corrupted) files of dataset `name` under `root`; both empty = ready to load.

    `opts`: stl10 `pretrain_split`; imagenet10 `folder`, `classes`, `train_split`, `test_split`.
    """
    root = _root(root)
    if name == "cifar10":
        return _check_files(root, _cifar_files(tvd.CIFAR10), verify)
    if name == "cifar100":
        return _check_files(root, _cifar_files(tvd.CIFAR100), verify)
    if name == "stl10":
        return _check_files(
            root, _stl10_files("unlabeled" in opts.get("pretrain_split", "train+unlabeled")), verify
        )
    if name == "svhn":
        return _check_files(root, _svhn_files(), verify)
    if name == "gtsrb":
        return _gtsrb_problems(root), []
    if name == "imagenet10":
        base = root / opts.get("folder", "imagenet")
        classes = list(opts.get("classes") or IMAGENET10_CLASSES)
        return _imagenet_problems(
            base, classes, (opts.get("train_split", "train"), opts.get("test_split", "val"))
        ), []
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(LAYOUTS)}")


def _require(name: str, root: Path, verify: bool = False, **opts) -> None:
    missing, corrupted = find_problems(name, root, verify=verify, **opts)
    if missing or corrupted:
        raise dataset_error(name, root, missing, corrupted)


_FETCH: dict[str, Callable[[Path], object]] = {
    # torchvision's own download code; each call downloads (once) and verifies the archives' md5
    "cifar10": lambda root: tvd.CIFAR10(str(root), train=False, download=True),
    "cifar100": lambda root: tvd.CIFAR100(str(root), train=False, download=True),
    "stl10": lambda root: tvd.STL10(str(root), split="test", download=True),
    "svhn": lambda root: [tvd.SVHN(str(root / "svhn"), split=s, download=True) for s in ("train", "test")],
    "gtsrb": lambda root: [tvd.GTSRB(str(root), split=s, download=True) for s in ("train", "test")],
}


def fetch_dataset(name: str, root: str | Path) -> None:
    """Fetch dataset `name` into `root` with torchvision (what `dataset.download=true` does)."""
    root = _root(root)
    if name not in _FETCH:
        raise ConfigError(
            f"dataset={name} cannot be downloaded automatically; get it from {LAYOUTS[name].source}"
        )
    log.info("dataset=%s: downloading into %s (dataset.download=true)", name, root.resolve())
    root.mkdir(parents=True, exist_ok=True)
    try:
        _FETCH[name](root)
    except Exception as e:  # noqa: BLE001 — network errors of every kind end up here
        raise ConfigError(
            f"dataset={name}: download into {root.resolve()} failed ({type(e).__name__}: {e}). Without a network, "
            f"put the files there yourself ({LAYOUTS[name].source}) in this layout:\n{_indent(LAYOUTS[name].tree, 4)}"
        ) from e


def _checked(cls: type) -> type:
    """torchvision's dataset class with its own existence/md5 checks skipped: securetl ran them first."""
    attrs: dict[str, object] = {"_check_integrity": lambda self: True}
    if isinstance(getattr(cls, "meta", None), dict):
        attrs["meta"] = {**cls.meta, "md5": None}  # CIFAR's metadata check: existence only
    return type(f"Checked{cls.__name__}", (cls,), attrs)


def _refuse_unsafe_pickles(name: str, root: Path, rels: list[str]) -> None:
    """CIFAR batches are Python pickles: make sure they hold numpy arrays and lists only, before torchvision
    unpickles them (a doctored file could otherwise run code; verify=true already pins the official ones)."""
    for rel in rels:
        bad = unsafe_globals(root / rel, NUMPY_GLOBALS)
        if bad:
            raise ConfigError(
                f"dataset={name}: refusing to read {root / rel}: unpickling it would import {_few(bad, 4)}, i.e. "
                "run code, while a CIFAR batch holds only numpy arrays and lists. Replace it with the official file."
            )


# --------------------------------------------------------------------------- tensors
def _resize(x: Tensor, size: int | None, chunk: int = 2048) -> Tensor:
    """uint8 (N, C, H, W) -> (N, C, size, size), antialiased, in chunks; returned as is when it fits."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x.contiguous()
    out = torch.empty((len(x), x.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, len(x), chunk):
        out[i : i + chunk] = v2.functional.resize(x[i : i + chunk], [size, size], antialias=True)
    return out


def _from_hwc(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


def _labels(y) -> Tensor:
    return torch.as_tensor(np.asarray(y), dtype=torch.int64)


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _expect(name: str, n_images: int, size: int) -> None:
    """Log the memory the uint8 images will take, and warn when that exceeds what is available."""
    need = n_images * 3 * size * size
    log.info(
        "dataset=%s: up to %s images at 3x%dx%d uint8 to hold, about %s in memory",
        name,
        f"{n_images:,}",
        size,
        size,
        _fmt_bytes(need),
    )
    avail = _available_memory()
    if avail is not None and need > 0.8 * avail:
        log.warning(
            "dataset=%s needs about %s but only %s of memory is available: lower dataset.size, or set "
            "dataset.n_pretrain / dataset.n_train",
            name, _fmt_bytes(need), _fmt_bytes(avail),
        )  # fmt: skip


def _log_memory(splits: Splits) -> None:
    seen: set[int] = set()
    total = 0
    parts = []
    for part in ("train", "test", "pretrain", "reference", "clean"):
        ls = getattr(splits, part)
        if ls is None:
            continue
        ptr = ls.x.untyped_storage().data_ptr()
        if ptr in seen:
            parts.append(f"{part} {len(ls):,} (shares train)")
            continue
        seen.add(ptr)
        total += ls.x.numel() + ls.y.numel() * 8
        parts.append(f"{part} {len(ls):,}")
    shape = "x".join(str(s) for s in splits.train.x.shape[1:])
    log.info(
        "dataset=%s in memory: %s images of %s uint8 -> %s",
        splits.name,
        ", ".join(parts),
        shape,
        _fmt_bytes(total),
    )


# --------------------------------------------------------------------------- common splitting
def _subsample(ls: LabeledSet, n: int | None, g: torch.Generator, what: str) -> LabeledSet:
    if n is None:
        return ls
    if n < 1:
        raise ConfigError(f"dataset.{what}={n} must be >= 1 (or null for all)")
    if n >= len(ls):
        return ls
    return ls.subset(torch.randperm(len(ls), generator=g)[:n].sort().values)


def _reference_idx(y: Tensor, n: int, num_classes: int, g: torch.Generator) -> Tensor:
    """`n` indices, spread evenly over the classes (remainder to the first classes); each class keeps at
    least one image in train."""
    per, extra = divmod(n, num_classes)
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(y == c).squeeze(1)
        k = min(per + (c < extra), max(len(idx) - 1, 0))
        picks.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(picks).sort().values


def finish(
    name: str,
    train: LabeledSet,
    test: LabeledSet,
    class_names: list[str],
    pretrain: LabeledSet | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    n_pretrain: int | None = None,
    n_reference: int = 100,
    seed: int = 0,
    n_clean: int = 0,
) -> Splits:
    """Hold out the reference images and the clean reserve, take the requested subsets, and assemble Splits
    (see module doc)."""
    num_classes = len(class_names)
    for part, ls in (("train", train), ("test", test)):
        if len(ls) == 0:
            raise ConfigError(f"dataset={name}: the {part} split is empty")
        lo, hi = int(ls.y.min()), int(ls.y.max())
        if lo < 0 or hi >= num_classes:
            raise ConfigError(
                f"dataset={name}: {part} labels span {lo}..{hi} but there are {num_classes} classes"
            )
    if n_reference < 0:
        raise ConfigError(f"dataset.n_reference={n_reference} must be >= 0")
    g = torch.Generator().manual_seed(seed)
    reference = None
    if n_reference:
        ref = _reference_idx(train.y, n_reference, num_classes, g)
        keep = torch.ones(len(train), dtype=torch.bool)
        keep[ref] = False
        reference = train.subset(ref)
        train = train.subset(torch.nonzero(keep).squeeze(1))
    if n_clean < 0:
        raise ConfigError(f"dataset.n_clean={n_clean} must be >= 0")
    clean = None
    if n_clean:
        # the clean reserve, carved from the official test split before any n_test subset, with a generator of
        # its own (the reference draw and the subsets are the same with or without it); the evaluation set
        # shrinks by n_clean for every run, whatever the defense
        held = _reference_idx(test.y, n_clean, num_classes, torch.Generator().manual_seed(seed + 7_000_003))
        keep = torch.ones(len(test), dtype=torch.bool)
        keep[held] = False
        clean = test.subset(held)
        test = test.subset(torch.nonzero(keep).squeeze(1))
    if pretrain is None:
        pretrain = train  # the same tensors: pre-training on the downstream train images costs no memory
    splits = Splits(
        name=name,
        train=_subsample(train, n_train, g, "n_train"),
        test=_subsample(test, n_test, g, "n_test"),
        num_classes=num_classes,
        class_names=list(class_names),
        pretrain=_subsample(pretrain, n_pretrain, g, "n_pretrain"),
        reference=reference,
        clean=clean,
    )
    _log_memory(splits)
    return splits


# --------------------------------------------------------------------------- CIFAR-10 / CIFAR-100
def _cifar(
    name, cls, root, download, verify, size, n_train, n_test, n_pretrain, n_reference, seed, n_clean
) -> Splits:
    root = _root(root)
    if download:
        fetch_dataset(name, root)
    files = _cifar_files(cls)
    _require(name, root, verify)
    _refuse_unsafe_pickles(name, root, [rel for rel, _ in files])
    _expect(name, 60_000, size)
    reader = _checked(cls)
    tr, te = reader(str(root), train=True), reader(str(root), train=False)
    train = LabeledSet(_resize(_from_hwc(tr.data), size), _labels(tr.targets))
    test = LabeledSet(_resize(_from_hwc(te.data), size), _labels(te.targets))
    return finish(
        name, train, test, list(tr.classes), None, n_train, n_test, n_pretrain, n_reference, seed, n_clean
    )


def build_cifar10(
    root: str = "data",
    download: bool = False,
    verify: bool = True,
    size: int = 32,
    n_train: int | None = None,
    n_test: int | None = None,
    n_pretrain: int | None = None,
    n_reference: int = 100,
    seed: int = 0,
    n_clean: int = 2500,
) -> Splits:
    """CIFAR-10 (50,000 train / 10,000 test, 32x32) from `root`/cifar-10-batches-py."""
    return _cifar(
        "cifar10",
        tvd.CIFAR10,
        root,
        download,
        verify,
        size,
        n_train,
        n_test,
        n_pretrain,
        n_reference,
        seed,
        n_clean,
    )


def build_cifar100(
    root: str = "data",
    download: bool = False,
    verify: bool = True,
    size: int = 32,
    n_train: int | None = None,
    n_test: int | None = None,
    n_pretrain: int | None = None,
    n_reference: int = 500,
    seed: int = 0,
    n_clean: int = 2500,
) -> Splits:
    """CIFAR-100, fine labels (50,000 train / 10,000 test, 32x32) from `root`/cifar-100-python."""
    return _cifar(
        "cifar100",
        tvd.CIFAR100,
        root,
        download,
        verify,
        size,
        n_train,
        n_test,
        n_pretrain,
        n_reference,
        seed,
        n_clean,
    )


# --------------------------------------------------------------------------- STL-10
STL10_PRETRAIN_SPLITS = ("train+unlabeled", "unlabeled", "train")


def build_stl10(
    root: str = "data",
    download: bool = False,
    verify: bool = True,
    size: int = 32,
    pretrain_split: str = "train+unlabeled",
    n_train: int | None = None,
    n_test: int | None = None,
    n_pretrain: int | None = None,
    n_reference: int = 100,
    seed: int = 0,
    n_clean: int = 250,
) -> Splits:
    """STL-10 (5,000 train / 8,000 test, 96x96 resized to `size`) from `root`/stl10_binary.

    pretrain_split: the SSL images — train+unlabeled (105,000, as BadEncoder's STL-10 encoder), unlabeled,
    or train. Unlabeled images carry label -1 in Splits.pretrain.
    """
    if pretrain_split not in STL10_PRETRAIN_SPLITS:
        raise ConfigError(f"dataset.pretrain_split={pretrain_split!r}: choose from {STL10_PRETRAIN_SPLITS}")
    root = _root(root)
    if download:
        fetch_dataset("stl10", root)
    unlabeled = "unlabeled" in pretrain_split
    _require("stl10", root, verify, pretrain_split=pretrain_split)
    _expect("stl10", 13_000 + (100_000 if unlabeled else 0), size)
    reader = _checked(tvd.STL10)
    tr, te = reader(str(root), split="train"), reader(str(root), split="test")
    classes = getattr(tr, "classes", None) or STL10_CLASSES
    train = LabeledSet(_resize(torch.from_numpy(tr.data), size), _labels(tr.labels))
    test = LabeledSet(_resize(torch.from_numpy(te.data), size), _labels(te.labels))
    parts = [train] if pretrain_split != "unlabeled" else []
    if unlabeled:
        un = reader(str(root), split="unlabeled").data
        labelled = sum(len(p) for p in parts)
        if n_pretrain is not None and n_pretrain < len(un) + labelled:
            # subsample the 100,000 unlabeled images before resizing them; the labelled ones come first
            g = torch.Generator().manual_seed(seed + 1)
            keep = max(n_pretrain - labelled, 0)
            un = un[np.sort(torch.randperm(len(un), generator=g)[:keep].numpy())]
        parts.append(
            LabeledSet(_resize(torch.from_numpy(un), size), torch.full((len(un),), -1, dtype=torch.int64))
        )
        del un
    pretrain = (
        parts[0]
        if len(parts) == 1
        else LabeledSet(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))
    )
    return finish(
        "stl10", train, test, classes, pretrain, n_train, n_test, n_pretrain, n_reference, seed, n_clean
    )


# --------------------------------------------------------------------------- SVHN
def build_svhn(
    root: str = "data",
    download: bool = False,
    verify: bool = True,
    size: int = 32,
    n_train: int | None = None,
    n_test: int | None = None,
    n_pretrain: int | None = None,
    n_reference: int = 100,
    seed: int = 0,
    n_clean: int = 3700,
) -> Splits:
    """SVHN cropped digits (73,257 train / 26,032 test, 32x32) from `root`/svhn; label 0 is the digit 0."""
    root = _root(root)
    base = root / "svhn"
    if download:
        fetch_dataset("svhn", root)
    _require("svhn", root, verify)
    _expect("svhn", 99_289, size)
    reader = _checked(tvd.SVHN)
    tr, te = reader(str(base), split="train"), reader(str(base), split="test")
    train = LabeledSet(_resize(torch.from_numpy(tr.data), size), _labels(tr.labels))
    test = LabeledSet(_resize(torch.from_numpy(te.data), size), _labels(te.labels))
    return finish(
        "svhn", train, test, SVHN_CLASSES, None, n_train, n_test, n_pretrain, n_reference, seed, n_clean
    )


# --------------------------------------------------------------------------- image-file datasets
def _decode_all(name: str, ds, size: int, num_workers: int, desc: str) -> LabeledSet:
    """Decode a torchvision file dataset (transform -> uint8 (3, size, size)) into one LabeledSet."""
    n = len(ds)
    x = torch.empty((n, 3, size, size), dtype=torch.uint8)
    y = torch.empty(n, dtype=torch.int64)
    loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=num_workers, shuffle=False)
    i = 0
    try:
        for xb, yb in tqdm(loader, desc=desc, disable=None, leave=False):
            x[i : i + len(xb)], y[i : i + len(yb)] = xb, yb
            i += len(xb)
    except (OSError, ValueError) as e:
        raise ConfigError(f"dataset={name}: could not read an image ({type(e).__name__}: {e})") from e
    return LabeledSet(x, y)


def build_gtsrb(
    root: str = "data",
    download: bool = False,
    size: int = 32,
    num_workers: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
    n_pretrain: int | None = None,
    n_reference: int = 430,
    seed: int = 0,
    n_clean: int = 2150,
) -> Splits:
    """GTSRB (39,209 train / 12,630 test, 43 classes; images of varying size resized to `size` x `size`,
    as BadEncoder does) from `root`/gtsrb in torchvision's layout."""
    root = _root(root)
    if download:
        fetch_dataset("gtsrb", root)
    _require("gtsrb", root)
    _expect("gtsrb", 51_839, size)
    tf = v2.Compose([v2.PILToTensor(), v2.Resize((size, size), antialias=True)])
    train = _decode_all(
        "gtsrb", tvd.GTSRB(str(root), split="train", transform=tf), size, num_workers, "GTSRB train"
    )
    test = _decode_all(
        "gtsrb", tvd.GTSRB(str(root), split="test", transform=tf), size, num_workers, "GTSRB test"
    )
    return finish(
        "gtsrb", train, test, GTSRB_CLASSES, None, n_train, n_test, n_pretrain, n_reference, seed, n_clean
    )


def _open_rgb(path: str, size: int) -> Image.Image:
    """PIL loader that lets the JPEG decoder downscale (draft mode) when the target size is much smaller."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.draft("RGB", (size, size))
        return img.convert("RGB")


class _ClassSubsetFolder(tvd.ImageFolder):
    """ImageFolder restricted to the given class folders, labelled in the given order."""

    def __init__(self, root: str, classes: list[str], **kwargs) -> None:
        self._wanted = list(classes)
        super().__init__(root, **kwargs)

    def find_classes(self, directory):  # noqa: D102 — torchvision hook
        return self._wanted, {c: i for i, c in enumerate(self._wanted)}


def build_imagenet10(
    root: str = "data",
    folder: str = "imagenet",
    classes: list[str] | None = None,
    class_names: list[str] | None = None,
    train_split: str = "train",
    test_split: str = "val",
    download: bool = False,
    size: int = 224,
    num_workers: int = 4,
    n_train: int | None = None,
    n_test: int | None = None,
    n_pretrain: int | None = None,
    n_reference: int = 100,
    seed: int = 0,
    n_clean: int = 100,
) -> Splits:
    """A class subset of an ImageNet-style folder (`root`/`folder`/{train,val}/<wnid>/*.JPEG): the short side
    resized to `size`, then centre-cropped to `size` x `size`. `classes`: WordNet ids, label = position."""
    root = _root(root)
    classes = list(classes or IMAGENET10_CLASSES)
    names = list(class_names) if class_names else [IMAGENET10_CLASSES.get(c, c) for c in classes]
    if len(names) != len(classes) or len(set(classes)) != len(classes):
        raise ConfigError(
            f"dataset.classes must be distinct WordNet ids, and dataset.class_names as many ({len(classes)})"
        )
    if download:
        log.warning(
            "dataset=imagenet10: ImageNet cannot be downloaded automatically; looking for local files"
        )
    base = root / folder
    missing = _imagenet_problems(base, classes, (train_split, test_split))
    if missing:
        raise dataset_error("imagenet10", root, missing)
    tf = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    loader = functools.partial(_open_rgb, size=size)
    tr = _ClassSubsetFolder(str(base / train_split), classes, transform=tf, loader=loader)
    te = _ClassSubsetFolder(str(base / test_split), classes, transform=tf, loader=loader)
    _expect("imagenet10", len(tr) + len(te), size)
    train = _decode_all("imagenet10", tr, size, num_workers, "ImageNet-10 train")
    test = _decode_all("imagenet10", te, size, num_workers, "ImageNet-10 val")
    return finish(
        "imagenet10", train, test, names, None, n_train, n_test, n_pretrain, n_reference, seed, n_clean
    )


BUILDERS = {
    "cifar10": build_cifar10,
    "cifar100": build_cifar100,
    "stl10": build_stl10,
    "svhn": build_svhn,
    "gtsrb": build_gtsrb,
    "imagenet10": build_imagenet10,
}
