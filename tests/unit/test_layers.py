"""The layer rules in pyproject.toml hold, and breaking one is caught."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "protoagg_dagster", tree / "protoagg_dagster")
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_package_keeps_its_layers(tmp_path: Path) -> None:
    result = _lint(_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_core_importing_dagster_breaks_the_build(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    errors = tree / "protoagg_dagster" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\nimport dagster  # noqa\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "protoagg_dagster.core is not allowed to import dagster" in result.stdout


def test_a_resource_importing_the_archive_path_breaks_the_build(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    gcs = tree / "protoagg_dagster" / "resources" / "gcs.py"
    gcs.write_text(gcs.read_text() + "\nimport protoagg_dagster.archive.ledger  # noqa\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "protoagg_dagster.resources" in result.stdout
    assert "protoagg_dagster.archive" in result.stdout
