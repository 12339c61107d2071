"""Small state files an agent must not lose or half-write (temp file, fsync, rename),
nor forget in silence when they cannot be read."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from typing import TypeVar

T = TypeVar("T")


class StateFileError(Exception):
    """A state file exists but cannot be read; one line naming it and what to do."""


def read_state(
    path: Path,
    parse: Callable[[Any], T],
    *,
    missing: T,
    remedy: str = "",
    error: type[StateFileError] = StateFileError,
) -> T:
    """``parse`` of the JSON in ``path``; ``missing`` when there is no file.

    A file that exists but cannot be read or parsed raises ``error`` naming it (and
    ``remedy``, what the owner may do): an agent that forgot its state could undo what it
    guards (an applied pause, a batch number), so it stops instead.
    """
    try:
        return parse(json.loads(path.read_text()))
    except FileNotFoundError:
        return missing
    except (OSError, ValueError, KeyError, TypeError) as exc:
        advice = f": {remedy}" if remedy else ""
        raise error(f"cannot read {path} ({exc!r}){advice}") from None


def write_durably(path: Path, text: str) -> None:
    """Replace ``path`` atomically and durably: readers see the old text or the new."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    temporary.replace(path)
    # The rename itself is durable only once the directory is synced (POSIX).
    if hasattr(os, "O_DIRECTORY"):
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
