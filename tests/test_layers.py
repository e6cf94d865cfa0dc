"""The layers of pyproject.toml hold (lint-imports), and an upward import breaks them.

c2l (the CLI) > gateway > orchestrator > proxy | desktop > wire > c2lcore: a package
imports only the ones below it. scripts/test.sh runs lint-imports on the tree; these tests
show that the contract is kept there and that it is not vacuous: in a copy of the tree
with one deliberate upward import the same command fails and names that import.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES: list[str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
    "root_packages"
]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    # lint-imports finds the packages through the current directory, which it puts
    # first on the path (ahead of the editable install of the real tree).
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    """The packages and pyproject.toml, copied as they are."""
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_its_layers() -> None:
    assert set(PACKAGES) == {
        "c2l",
        "gateway",
        "orchestrator",
        "proxy",
        "desktop",
        "wire",
        "c2lcore",
    }
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_the_copy_keeps_them_too(tree_copy: Path) -> None:
    result = _lint_imports(tree_copy)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("orchestrator/_upward.py", "import gateway"),  # a component importing its caller
        ("c2lcore/_upward.py", "from c2l import _cli"),  # the bottom importing the top
        ("proxy/_upward.py", "import desktop"),  # two independent siblings
        ("wire/_upward.py", "import proxy"),  # the protocol importing its user
    ],
)
def test_an_upward_import_breaks_the_contract(tree_copy: Path, module: str, upward: str) -> None:
    (tree_copy / module).write_text(f'"""A deliberate layer violation."""\n\n{upward}\n')
    result = _lint_imports(tree_copy)
    assert result.returncode != 0, result.stdout
    assert "0 kept, 1 broken" in result.stdout, result.stdout
    importer = module.removesuffix(".py").replace("/", ".")
    assert importer in result.stdout, result.stdout
