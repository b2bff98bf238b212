"""The package layout: attacks/ and defenses/ import as securetl.attacks / securetl.defenses when installed."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from conftest import ROOT


def test_mapped_packages_import_through_the_installed_package():
    # a fresh interpreter outside the repo, so only the installed package (not sys.path tricks) is used
    code = (
        "import securetl.attacks.data.badnets as b, securetl.defenses, securetl.interfaces as i;"
        "print(b.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert "attacks/data/badnets.py" in out.stdout


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    roots = {
        "securetl": ROOT / "src/securetl",
        "securetl.attacks": ROOT / "attacks",
        "securetl.defenses": ROOT / "defenses",
    }
    found = set()
    for prefix, folder in roots.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((prefix, *rel)))
    assert found <= listed, f"add to pyproject [tool.setuptools] packages: {sorted(found - listed)}"
