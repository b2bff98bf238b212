"""The real-dataset loaders, run on a few samples fabricated in each dataset's NATIVE on-disk format.

Everything goes through the real code path: Hydra compose of conf/dataset/<name>.yaml with the data
directory in tmp_path, then securetl.build.build -> torchvision's parsers -> Splits. Pixel patterns encode
the label and the row/column, so a channel or H/W transposition in the loading code would be caught.
CIFAR/STL-10/SVHN md5 checks are turned off with the loader's own `verify=false` (fabricated files cannot
match the official checksums); a separate test shows `verify=true` rejects them.
"""

from __future__ import annotations

import csv
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_script
from securetl.build import build
from securetl.data.real import IMAGENET10_CLASSES
from securetl.validate import ConfigError

DATASETS = ["cifar10", "cifar100", "stl10", "svhn", "gtsrb", "imagenet10"]


def pattern(label: int, h: int, w: int) -> np.ndarray:
    """(3, h, w) uint8: R = 10 * label everywhere, G = 4 * row, B = 4 * column."""
    img = np.empty((3, h, w), np.uint8)
    img[0] = (10 * label) % 256
    img[1] = (4 * np.arange(h))[:, None]
    img[2] = (4 * np.arange(w))[None, :]
    return img


def check_pattern(x: torch.Tensor, y: torch.Tensor) -> None:
    n, _, h, w = x.shape
    assert torch.equal(x[:, 0], ((10 * y) % 256).to(torch.uint8)[:, None, None].expand(n, h, w))
    assert torch.equal(x[:, 1], (4 * torch.arange(h)).to(torch.uint8)[None, :, None].expand(n, h, w))
    assert torch.equal(x[:, 2], (4 * torch.arange(w)).to(torch.uint8)[None, None, :].expand(n, h, w))


# --------------------------------------------------------------------------- native-format writers
def write_cifar(data: Path, hundred: bool = False) -> None:
    """cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta (or cifar-100-python/train, test, meta):
    pickled dicts whose 'data' is (N, 3072) uint8 in R, G, B planes of 32x32, as in the official release."""
    k = 100 if hundred else 10
    base = data / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    base.mkdir(parents=True)
    label_key = "fine_labels" if hundred else "labels"

    def batch(n: int, offset: int) -> dict:
        labels = [(offset + i) % k for i in range(n)]
        rows = np.stack([pattern(lab, 32, 32).reshape(-1) for lab in labels])
        out = {
            "batch_label": "fabricated",
            label_key: labels,
            "data": rows,
            "filenames": [f"img_{offset + i}.png" for i in range(n)],
        }
        if hundred:
            out["coarse_labels"] = [lab // 5 for lab in labels]
        return out

    if hundred:  # 500 train (5 per class), 100 test
        files = {"train": batch(500, 0), "test": batch(100, 0)}
        meta = (
            "meta",
            {
                "fine_label_names": [f"class_{i}" for i in range(100)],
                "coarse_label_names": [f"super_{i}" for i in range(20)],
            },
        )
    else:  # 5 x 20 train (10 per class), 20 test
        files = {f"data_batch_{b}": batch(20, 20 * (b - 1)) for b in range(1, 6)}
        files["test_batch"] = batch(20, 0)
        meta = (
            "batches.meta",
            {"label_names": [f"class_{i}" for i in range(10)], "num_cases_per_batch": 20, "num_vis": 3072},
        )
    files[meta[0]] = meta[1]
    for name, obj in files.items():
        with open(base / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)  # the official files are Python 2 pickles


def write_stl10(data: Path, n_train: int = 30, n_test: int = 20, n_unlabeled: int = 25) -> None:
    """stl10_binary/*.bin: raw uint8, each image 3 x 96 x 96 stored column-major; labels 1..10."""
    base = data / "stl10_binary"
    base.mkdir(parents=True)

    def images(labels) -> bytes:
        return b"".join(pattern(lab, 96, 96).transpose(0, 2, 1).tobytes() for lab in labels)

    tr, te = [i % 10 for i in range(n_train)], [(3 * i) % 10 for i in range(n_test)]
    (base / "train_X.bin").write_bytes(images(tr))
    (base / "train_y.bin").write_bytes(bytes(lab + 1 for lab in tr))
    (base / "test_X.bin").write_bytes(images(te))
    (base / "test_y.bin").write_bytes(bytes(lab + 1 for lab in te))
    (base / "unlabeled_X.bin").write_bytes(images([0] * n_unlabeled))
    (base / "class_names.txt").write_text(
        "\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"])
        + "\n"
    )


def write_svhn(data: Path, n_train: int = 30, n_test: int = 20) -> None:
    """svhn/{train,test}_32x32.mat: X (32, 32, 3, N) uint8, y (N, 1) with 10 standing for the digit 0."""
    from scipy.io import savemat

    base = data / "svhn"
    base.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = [i % 10 for i in range(n)]
        x = np.stack([pattern(lab, 32, 32).transpose(1, 2, 0) for lab in labels], axis=-1)
        y = np.array([[lab if lab else 10] for lab in labels], np.uint8)
        savemat(base / f"{name}_32x32.mat", {"X": x, "y": y})


def write_gtsrb(data: Path, per_class: int = 2, n_test: int = 50, skip_class: int | None = None) -> None:
    """torchvision's GTSRB layout: Training/000NN/*.ppm (+ the per-class GT csv), Final_Test/Images/*.ppm,
    GT-final_test.csv; images of varying sizes, one colour each (R = 5 * class)."""
    rng = np.random.default_rng(0)
    base = data / "gtsrb"
    train = base / "GTSRB" / "Training"

    def ppm(path: Path, cls: int) -> tuple[int, int]:
        w, h = (int(v) for v in rng.integers(15, 40, 2))
        Image.fromarray(np.full((h, w, 3), (5 * cls, 100, 200), np.uint8)).save(path)  # .ppm suffix -> PPM
        return w, h

    for c in range(43):
        if c == skip_class:
            continue
        d = train / f"{c:05d}"
        d.mkdir(parents=True)
        rows = []
        for i in range(per_class):
            w, h = ppm(d / f"00000_{i:05d}.ppm", c)
            rows.append([f"00000_{i:05d}.ppm", w, h, 1, 1, w - 1, h - 1, c])
        with open(d / f"GT-{c:05d}.csv", "w", newline="") as f:
            csv.writer(f, delimiter=";").writerows(
                [["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"], *rows]
            )
    images = base / "GTSRB" / "Final_Test" / "Images"
    images.mkdir(parents=True)
    rows = []
    for i in range(n_test):
        c = (7 * i) % 43
        w, h = ppm(images / f"{i:05d}.ppm", c)
        rows.append([f"{i:05d}.ppm", w, h, 1, 1, w - 1, h - 1, c])
    with open(base / "GT-final_test.csv", "w", newline="") as f:
        csv.writer(f, delimiter=";").writerows(
            [["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"], *rows]
        )


def write_imagenet(data: Path, per_class_train: int = 3, per_class_val: int = 2) -> None:
    """imagenet/{train,val}/<wnid>/*.JPEG, for the ten ImageNet-10 ids plus one class that is not in the list."""
    wnids = [*IMAGENET10_CLASSES, "n01440764"]
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        for c, wnid in enumerate(wnids):
            d = data / "imagenet" / split / wnid
            d.mkdir(parents=True)
            for i in range(n):
                w, h = 48 + 8 * i, 36 + 4 * c  # not square: the loader resizes the short side, then crops
                Image.fromarray(np.full((h, w, 3), (20 * c, 60, 120), np.uint8)).save(
                    d / f"{wnid}_{i}.JPEG", quality=95
                )


WRITERS = {
    "cifar10": write_cifar,
    "cifar100": lambda d: write_cifar(d, hundred=True),
    "stl10": write_stl10,
    "svhn": write_svhn,
    "gtsrb": write_gtsrb,
    "imagenet10": write_imagenet,
}


@pytest.fixture
def data_dir(tmp_path) -> Path:
    d = tmp_path / "data"  # = ${paths.data_dir} when SECURETL_ROOT=tmp_path (compose_cfg sets it)
    d.mkdir()
    return d


def load(compose_cfg, name: str, *overrides: str):
    # the clean reserve is carved from the test split (tests/test_baselines_knowledge.py checks how); these
    # tests check the native formats, so their tiny test splits are left whole
    extra = ["dataset.n_clean=0"]
    extra += ["dataset.verify=false"] if name in ("cifar10", "cifar100", "stl10", "svhn") else []
    if name in ("gtsrb", "imagenet10"):
        extra.append("dataset.num_workers=0")
    cfg = compose_cfg([f"dataset={name}", *extra, *overrides], tiny=False)
    return build(cfg.dataset)


# --------------------------------------------------------------------------- loading
def test_cifar10_native_pickles(compose_cfg, data_dir):
    write_cifar(data_dir)
    s = load(compose_cfg, "cifar10", "dataset.n_reference=10")
    assert s.name == "cifar10" and s.num_classes == 10 and s.class_names[3] == "class_3"
    assert s.train.x.dtype == torch.uint8 and s.train.y.dtype == torch.int64
    assert s.train.x.shape == (90, 3, 32, 32) and s.test.x.shape == (20, 3, 32, 32)
    assert s.reference.x.shape == (10, 3, 32, 32) and sorted(s.reference.y.tolist()) == list(range(10))
    check_pattern(s.train.x, s.train.y)
    check_pattern(s.test.x, s.test.y)
    # 100 images, 10 of them held out as reference inputs
    assert torch.bincount(s.train.y, minlength=10).tolist() == [9] * 10
    assert s.pretrain is s.train  # pre-training on the downstream train images shares the tensor


def test_cifar100_native_pickles_fine_labels(compose_cfg, data_dir):
    WRITERS["cifar100"](data_dir)
    s = load(compose_cfg, "cifar100", "dataset.n_reference=100")
    assert s.num_classes == 100 and len(s.class_names) == 100
    assert s.train.x.shape == (400, 3, 32, 32) and s.test.x.shape == (100, 3, 32, 32)
    assert sorted(s.reference.y.tolist()) == list(range(100))
    check_pattern(s.train.x, s.train.y)
    assert torch.bincount(s.test.y, minlength=100).tolist() == [1] * 100


def test_stl10_native_binaries_with_unlabeled_pretrain(compose_cfg, data_dir):
    write_stl10(data_dir)
    s = load(compose_cfg, "stl10", "dataset.size=96", "dataset.n_reference=10")
    assert s.class_names[7] == "monkey" and s.num_classes == 10
    assert s.train.x.shape == (20, 3, 96, 96) and s.test.x.shape == (20, 3, 96, 96)
    check_pattern(s.train.x, s.train.y)  # column-major binaries come out in (C, H, W) order
    check_pattern(s.test.x, s.test.y)
    assert s.test.y.tolist() == [(3 * i) % 10 for i in range(20)]  # labels 1..10 on disk -> 0..9
    # pre-training images: the 30 labelled train images, then the 25 unlabeled ones (label -1)
    assert s.pretrain.x.shape == (55, 3, 96, 96)
    assert (s.pretrain.y == -1).sum() == 25 and (s.pretrain.y[:30] >= 0).all()

    small = load(compose_cfg, "stl10", "dataset.n_pretrain=40", "dataset.n_reference=10")  # default size 32
    assert small.train.x.shape == (20, 3, 32, 32) and small.pretrain.x.shape == (40, 3, 32, 32)
    assert (small.train.x[:, 0].float().mean(dim=(1, 2)) - 10 * small.train.y).abs().max() <= 1  # colour kept


def test_stl10_pretrain_split_train_needs_no_unlabeled_file(compose_cfg, data_dir):
    write_stl10(data_dir)
    (data_dir / "stl10_binary" / "unlabeled_X.bin").unlink()
    s = load(compose_cfg, "stl10", "dataset.pretrain_split=train", "dataset.n_reference=0")
    assert len(s.pretrain) == 30 and s.reference is None
    with pytest.raises(ConfigError, match="unlabeled_X.bin"):
        load(compose_cfg, "stl10")


def test_svhn_native_mat_files(compose_cfg, data_dir):
    write_svhn(data_dir)
    s = load(compose_cfg, "svhn", "dataset.n_reference=10")
    assert s.class_names == [str(d) for d in range(10)]
    assert s.train.x.shape == (20, 3, 32, 32) and s.test.x.shape == (20, 3, 32, 32)
    assert s.test.y.tolist() == [i % 10 for i in range(20)]  # the file's label 10 is the digit 0
    check_pattern(s.train.x, s.train.y)
    check_pattern(s.test.x, s.test.y)


def test_gtsrb_native_folders_and_csv(compose_cfg, data_dir):
    write_gtsrb(data_dir)
    s = load(compose_cfg, "gtsrb", "dataset.n_reference=0")
    assert s.num_classes == 43 and len(s.class_names) == 43 and s.class_names[14] == "stop"
    assert s.train.x.shape == (86, 3, 32, 32) and s.test.x.shape == (50, 3, 32, 32)
    assert torch.bincount(s.train.y, minlength=43).tolist() == [2] * 43
    assert s.test.y.tolist() == [(7 * i) % 43 for i in range(50)]  # labels from GT-final_test.csv
    for part in (s.train, s.test):  # every image has its class colour after resizing
        assert torch.equal(part.x[:, 0], (5 * part.y).to(torch.uint8)[:, None, None].expand(-1, 32, 32))
    small = load(compose_cfg, "gtsrb", "dataset.size=16", "dataset.n_reference=43")
    assert small.train.x.shape == (43, 3, 16, 16) and sorted(small.reference.y.tolist()) == list(range(43))


def test_imagenet10_class_subset_of_an_imagenet_folder(compose_cfg, data_dir):
    write_imagenet(data_dir)
    s = load(compose_cfg, "imagenet10", "dataset.size=24", "dataset.n_reference=0")
    assert s.num_classes == 10 and s.class_names[0] == "king_penguin" and s.class_names[9] == "bubble"
    # the 11th class folder is not in the list and is left out
    assert s.train.x.shape == (30, 3, 24, 24) and s.test.x.shape == (20, 3, 24, 24)
    assert torch.bincount(s.train.y, minlength=10).tolist() == [3] * 10
    for part in (s.train, s.test):  # the folder order of the configured ids gives the label
        red = part.x[:, 0].float().mean(dim=(1, 2))
        assert (red - 20 * part.y).abs().max() < 4  # JPEG is lossy
    # a user's own class list and names
    own = ["dataset.classes=[n04254680,n02056570]", "dataset.class_names=[ball,penguin]", "dataset.size=16"]
    two = load(compose_cfg, "imagenet10", *own, "dataset.n_reference=2")
    assert two.class_names == ["ball", "penguin"] and two.num_classes == 2
    assert len(two.train) == 4 and sorted(two.reference.y.tolist()) == [0, 1]


def test_subsets_and_reference_are_seeded_and_disjoint(compose_cfg, data_dir):
    write_cifar(data_dir)
    sizes = ["dataset.n_train=30", "dataset.n_test=7", "dataset.n_pretrain=50", "dataset.n_reference=20"]
    a, b = load(compose_cfg, "cifar10", *sizes), load(compose_cfg, "cifar10", *sizes)
    assert len(a.train) == 30 and len(a.test) == 7 and len(a.pretrain) == 50 and len(a.reference) == 20
    assert torch.equal(a.train.y, b.train.y) and torch.equal(a.reference.y, b.reference.y)
    assert torch.bincount(a.reference.y, minlength=10).tolist() == [2] * 10
    c = load(compose_cfg, "cifar10", "dataset.n_reference=20", "dataset.seed=1")
    assert len(c.train) == 80  # 100 images, 20 held out as reference inputs


# --------------------------------------------------------------------------- missing / incomplete / unsafe
@pytest.mark.parametrize("name", DATASETS)
def test_missing_dataset_is_one_clear_error_within_5s(compose_cfg, data_dir, name):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load(compose_cfg, name)
    elapsed = time.perf_counter() - t0
    msg = str(err.value)
    assert f"dataset={name}" in msg
    assert str(data_dir.resolve()) in msg  # the directory searched
    if name == "imagenet10":
        assert "image-net.org" in msg and "train/<wnid>" in msg
    else:
        assert "dataset.download=true" in msg
    assert "put the files there" in msg and "SECURETL_DATA_DIR" in msg
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "stl10": "stl10_binary", "svhn": "svhn/",
              "gtsrb": "GTSRB/Training/00000", "imagenet10": "imagenet/"}[name]  # fmt: skip
    assert folder in msg  # the expected layout
    assert elapsed < 5.0, f"took {elapsed:.1f}s"


def test_missing_dataset_fails_the_run_before_any_model_work(compose_cfg, tmp_path):
    from securetl import pipeline

    cfg = compose_cfg(["dataset=cifar10"], tiny=False)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="dataset=cifar10"):
        pipeline.run(cfg)
    assert time.perf_counter() - t0 < 5.0
    assert not (tmp_path / ".cache").exists()  # no encoder was trained or cached
    # no row was written (raw/ itself is made and test-written before any work, on purpose)
    assert not list((tmp_path / "results").rglob("*.json"))


def test_incomplete_datasets_name_the_missing_files(compose_cfg, data_dir):
    write_cifar(data_dir)
    (data_dir / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ConfigError, match="data_batch_3"):
        load(compose_cfg, "cifar10")
    write_gtsrb(data_dir, skip_class=7)
    with pytest.raises(ConfigError, match="Training/00007"):
        load(compose_cfg, "gtsrb")
    (data_dir / "gtsrb" / "GTSRB" / "Final_Test" / "Images" / "00003.ppm").unlink()
    with pytest.raises(ConfigError, match="00003.ppm"):
        load(compose_cfg, "gtsrb")


def test_verify_true_rejects_files_that_do_not_match_the_official_checksums(compose_cfg, data_dir):
    write_svhn(data_dir)
    cfg = compose_cfg(["dataset=svhn"], tiny=False)
    assert cfg.dataset.verify is True  # the default
    with pytest.raises(ConfigError, match="md5") as err:
        build(cfg.dataset)
    assert "dataset.verify=false" in str(err.value) and "train_32x32.mat" in str(err.value)


def test_a_cifar_batch_that_would_run_code_is_refused(compose_cfg, data_dir, tmp_path):
    write_cifar(data_dir)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(data_dir / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": Payload()}, f)
    with pytest.raises(ConfigError, match="refusing") as err:
        load(compose_cfg, "cifar10")
    assert "io.open" in str(err.value)
    assert not marker.exists()


def test_download_failure_says_where_to_put_the_files(compose_cfg, data_dir, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(ConfigError, match="download into .* failed .*network is unreachable") as err:
        load(compose_cfg, "cifar10", "dataset.download=true")
    assert "cifar-10-batches-py" in str(err.value)


# --------------------------------------------------------------------------- scripts/prepare_data.py
def run_prepare_data(args: list[str], capsys) -> tuple[int, str]:
    code = load_script("prepare_data").main(args)
    return code, capsys.readouterr().out


def test_prepare_data_reports_what_is_there(data_dir, capsys):
    write_cifar(data_dir)
    write_gtsrb(data_dir, skip_class=42)
    code, text = run_prepare_data([str(data_dir)], capsys)
    assert code == 1  # not everything is there
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.split() and ln.split()[0] in DATASETS}
    assert "ready" in lines["cifar10"]
    assert "incomplete" in lines["gtsrb"] and "missing" in lines["svhn"]
    assert "GTSRB/Training/00042" in text  # names what is missing
    assert "train_32x32.mat" in text  # and the expected layout of what is absent
    assert "dataset.download=true" in text and "image-net.org" in text

    code, text = run_prepare_data([str(data_dir), "--only", "cifar10"], capsys)
    assert code == 0 and "ready" in text
    code, text = run_prepare_data([str(data_dir), "--only", "cifar10", "--verify"], capsys)
    assert code == 1 and "md5" in text  # fabricated files are not the official ones


def test_a_run_on_a_real_dataset_config_end_to_end(compose_cfg, data_dir, tmp_path):
    """The pipeline with dataset=cifar10 (fabricated files): the encoder pre-trains on the train images,
    and the row records the dataset choice; `dataset.root` (a location) stays out of the run id."""
    from securetl import pipeline

    write_cifar(data_dir)
    row = pipeline.run(
        compose_cfg(["dataset=cifar10", "dataset.verify=false", "dataset.n_reference=10", "encoder.epochs=1"])
    )
    assert row["choices"]["dataset"] == "cifar10"
    assert 0.0 <= row["metrics"]["acc"] <= 1.0
    assert (tmp_path / "results" / "raw" / f"{row['run_id']}.json").exists()
    other_root = compose_cfg(["dataset=cifar10", "dataset.verify=false", "dataset.n_reference=10", "encoder.epochs=1",
                              f"dataset.root={data_dir}/../data"])  # fmt: skip
    from securetl import results

    assert results.run_id(other_root, results.choices_of(other_root)) == row["run_id"]
