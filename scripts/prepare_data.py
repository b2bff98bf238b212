"""Check a data directory for the real datasets: what is there, what is missing, the expected layout.

    python scripts/prepare_data.py [DATA_DIR] [--only cifar10 stl10 ...] [--verify] [--download]

DATA_DIR defaults to $SECURETL_DATA_DIR, else ./data (the suite's `paths.data_dir`). --verify also checks
md5 checksums where torchvision knows them (CIFAR, STL-10, SVHN; takes seconds). --download fetches the
datasets that can be downloaded (everything but ImageNet) with torchvision. Exit status 0 when every
dataset asked about is ready, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from securetl.data.real import LAYOUTS, fetch_dataset, find_problems
from securetl.validate import ConfigError


def report(root: Path, names: list[str], verify: bool) -> bool:
    print(f"data directory: {root.resolve()}\n")
    ready_all = True
    details = []
    for name in names:
        missing, corrupted = find_problems(name, root, verify=verify)
        lay = LAYOUTS[name]
        if not missing and not corrupted:
            status = "ready" + (
                " (md5 verified)" if verify and name in ("cifar10", "cifar100", "stl10", "svhn") else ""
            )
        elif corrupted:
            status = f"corrupted: {len(corrupted)} files fail their md5 check"
        else:
            # nothing at all vs. a partial copy
            top = lay.tree.split()[0].rstrip("/")
            status = "incomplete" if (root / top).exists() else "missing"
            status += f": {len(missing)} expected files/folders absent"
        ready_all &= status.startswith("ready")
        print(f"{name:<11} {status}")
        if not status.startswith("ready"):
            details.append((name, missing, corrupted))
    for name, missing, corrupted in details:
        lay = LAYOUTS[name]
        print(f"\n== {name}")
        shown = corrupted or missing
        print(
            ("  failing md5: " if corrupted else "  absent: ")
            + ", ".join(shown[:8])
            + (" ..." if len(shown) > 8 else "")
        )
        print("  expected layout (under the data directory):")
        print("\n".join("    " + line for line in lay.tree.splitlines()))
        print(f"  source: {lay.source}")
        if lay.download:
            print(f"  or: securetl dataset={name} dataset.download=true  ({lay.download}),")
            print(f"      or: python scripts/prepare_data.py {root} --only {name} --download")
    return ready_all


def download(root: Path, names: list[str]) -> None:
    for name in names:
        if not LAYOUTS[name].download:
            print(f"{name}: cannot be downloaded automatically ({LAYOUTS[name].source})")
            continue
        try:
            fetch_dataset(name, root)
        except ConfigError as e:
            print(f"{name}: {e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", nargs="?", default=os.environ.get("SECURETL_DATA_DIR", "data"))
    ap.add_argument("--only", nargs="+", choices=sorted(LAYOUTS), help="datasets to check (default: all)")
    ap.add_argument("--verify", action="store_true", help="also check md5 checksums (slower)")
    ap.add_argument("--download", action="store_true", help="download what can be downloaded, then check")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    root = Path(args.data_dir).expanduser()
    names = args.only or list(LAYOUTS)
    if args.download:
        download(root, names)
    return 0 if report(root, names, args.verify) else 1


if __name__ == "__main__":
    sys.exit(main())
