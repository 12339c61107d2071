"""The CLI package's shape: its modules import each other one way, ``app`` imports the
command modules, never the reverse, and a command starts without what only the server
needs. (That the CLI reaches the database only through ``control.admin`` is an import
contract in pyproject.toml, checked by ``lint-imports``.)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CLI = Path(__file__).resolve().parents[1] / "control" / "cli"
MODULES = sorted(CLI.glob("*.py"))
# What only `serve` needs (the dashboard, the store drivers, the scheduler). Every command
# imports the whole CLI: with these it took 1 s of CPU to start instead of 0.45 s, for
# each call a script or a runbook makes.
SERVER_ONLY = ("aiohttp", "apscheduler", "authlib", "joserfc", "psycopg")


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


def test_the_cli_starts_without_what_only_the_server_needs() -> None:
    probe = "import sys, control.cli.app; print(*sorted(m for m in sys.modules if '.' not in m))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert sorted(set(SERVER_ONLY) & set(done.stdout.split())) == []


def test_a_server_on_sqlite_starts_without_the_postgresql_driver() -> None:
    """psycopg takes 80 ms to import: only a server given ``--database`` loads it."""
    probe = "import sys, control.cli.app, control.server; print(*sorted(sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert "psycopg" not in done.stdout.split()


def test_the_parser_is_reused_only_while_the_environment_it_read_is_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Options default to ``KILLSWITCH_*`` variables: a parser built under other values
    would hand a command the wrong server or identity."""
    from control.cli.app import build_parser

    monkeypatch.setenv("KILLSWITCH_SERVER", "first.example:50051")
    first = build_parser()
    assert build_parser() is first
    assert first.parse_args(["status"]).server == "first.example:50051"
    monkeypatch.setenv("KILLSWITCH_SERVER", "second.example:50051")
    assert build_parser().parse_args(["status"]).server == "second.example:50051"
    monkeypatch.setenv("KILLSWITCH_IDENTITY", "/somewhere/else")
    assert build_parser().parse_args(["status"]).identity == "/somewhere/else"
