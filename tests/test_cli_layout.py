"""The CLI package's shape: the rules that keep it easy to change.

The CLI reaches the database only through ``control.admin`` (so that a command module
cannot quietly grow its own store access), and its modules import each other one way:
``app`` imports the command modules, never the reverse.
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


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_the_cli_never_opens_the_store_itself(path: Path) -> None:
    store = sorted(
        n for n in imported(path) if n == "control.store" or n.startswith("control.store.")
    )
    assert not store, f"{path.name} imports {store}: go through control.admin"


@pytest.mark.parametrize(
    "path", [p for p in MODULES if p.stem not in {"__init__", "app"}], ids=lambda p: p.name
)
def test_command_modules_do_not_import_the_app(path: Path) -> None:
    assert not {"control.cli.app", "control.cli"} & imported(path)
