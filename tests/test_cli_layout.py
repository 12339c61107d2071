"""The CLI package's shape: its modules import each other one way, ``app`` imports the
command modules, never the reverse. (That the CLI reaches the database only through
``control.admin`` is an import contract in pyproject.toml, checked by ``lint-imports``.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CLI = Path(__file__).resolve().parents[1] / "control" / "cli"
MODULES = sorted(CLI.glob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize(
    "path", [p for p in MODULES if p.stem not in {"__init__", "app"}], ids=lambda p: p.name
)
def test_command_modules_do_not_import_the_app(path: Path) -> None:
    assert not {"control.cli.app", "control.cli"} & imported(path)
