"""Disk space kept aside so that an operator's pause still commits on a full disk.

The SQLite store keeps a preallocated file of ``RESERVE_BYTES`` in its data dir. When
a pause fails because the disk is full, the store deletes the file and writes the
pause again into the space it freed. Spending it changes nothing about the fleet's
safety: while the reserve is gone the store reports itself unhealthy ("running on
reserve"), so no lease is granted or renewed and the fleet stops within one lease TTL,
until the probe can put the reserve back (someone freed disk space).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from control.durable import sync_directory

RESERVE_FILENAME = "killswitch.reserve"
# A pause writes a few pages (the hold, the epoch, its audit entry); this is room for
# hundreds of them, and for the agent rows written meanwhile.
RESERVE_BYTES = 4 * 1024 * 1024


class Reserve:
    def __init__(self, data_dir: Path, size: int = RESERVE_BYTES) -> None:
        self.path = data_dir / RESERVE_FILENAME
        self._size = size

    def in_place(self) -> bool:
        try:
            return self.path.stat().st_blocks * 512 >= self._size
        except FileNotFoundError:
            return False

    def ensure(self) -> bool:
        """Put the reserve in place unless it is: allocated for real (not a sparse file),
        synced, then renamed, so a half-made one never counts. False if there is no room."""
        if self.in_place():
            return True
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self._size)
                os.fsync(fd)
            finally:
                os.close(fd)
            partial.replace(self.path)
            sync_directory(self.path.parent)
        except OSError:
            with contextlib.suppress(OSError):
                partial.unlink()
            return False
        return True

    def release(self) -> bool:
        """Free the reserve's space; False if there was none to free."""
        if not self.in_place():
            return False
        try:
            self.path.unlink()
        except OSError:
            return False
        with contextlib.suppress(OSError):
            sync_directory(self.path.parent)
        return True
