"""Every Python package of the project is in pyproject's explicit ``packages`` list.

An editable install finds a package the list forgets; a built wheel (the Docker image's
``pip install .``) leaves it out, and the server cannot start. (``control.plane`` was
missing from the list for a while: every test passed.)
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("control", "agent_stub", "simulator", "gc_policy")


def test_every_package_directory_is_listed() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in TOP_LEVEL
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found, "no packages found: is ROOT right?"
    assert not found - listed, f"missing from pyproject's packages: {sorted(found - listed)}"
