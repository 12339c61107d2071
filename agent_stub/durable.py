"""Small state files an agent must not lose or half-write (temp file, fsync, rename)."""

from __future__ import annotations

import os
from pathlib import Path


class StateFileError(Exception):
    """A state file exists but cannot be read; one line naming it and what to do."""


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
