"""Every package the code imports is one pyproject.toml declares, not one a dependency brings."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

from tests.conftest import ROOT


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[\[=<>~! ;]", spec, maxsplit=1)[0] for spec in project["dependencies"]]
    return {name.lower().replace("_", "-") for name in names}


def imported() -> set[str]:
    """Top-level modules imported by the package (its own and the standard library's left out)."""
    found = set()
    for path in (ROOT / "protoagg_dagster").rglob("*.py"):
        if path.name.endswith("_pb2.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"protoagg_dagster", "__future__"}


def test_every_imported_package_is_declared() -> None:
    distributions = importlib.metadata.packages_distributions()
    wanted = declared()
    undeclared = {}
    for module in imported():
        providers = {p.lower().replace("_", "-") for p in distributions[module]}
        if not providers & wanted:
            undeclared[module] = sorted(providers)
    assert undeclared == {}
