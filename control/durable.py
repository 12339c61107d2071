"""Making a file's creation or rename survive a crash.

Syncing a file makes its bytes durable, not the directory entry that names it: a file
just created or renamed into place can vanish after a power loss until its directory
is synced too. The SQLite reserve and the ingest sink both rely on that.
"""

from __future__ import annotations

import os
from pathlib import Path


def sync_directory(directory: Path) -> None:
    """Make the entries created, renamed or removed in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
