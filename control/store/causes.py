"""Why a store cannot write, said once, in one line, from what the driver raised.

Both stores classify their own failures here, so the log line, ``/readyz``, the
``killswitch_store_writable`` metric and the operator's error all name the same cause.
A cause that does not pass by itself (a full disk, a read-only file system or
database, an I/O error) makes the store unhealthy at once; a lost connection is left
to the beats, since a pool reconnects by itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from control.errors import StoreUnavailable

if TYPE_CHECKING:
    import psycopg

DISK_FULL = "store cannot write: disk full"
READ_ONLY_FS = "store cannot write: read-only file system"
IO_ERROR = "store cannot write: I/O error"
READ_ONLY_DB = "store cannot write: database is in read-only mode"
UNREACHABLE = "store unreachable: connection lost"
NO_ANSWER = "store unreachable: no answer in time"
ON_RESERVE = "store running on reserve: free disk space"

# The metric's label for each cause: a fixed set, whatever the driver said.
CAUSE_LABELS = {
    DISK_FULL: "disk_full",
    READ_ONLY_FS: "read_only_fs",
    IO_ERROR: "io_error",
    READ_ONLY_DB: "read_only_db",
    UNREACHABLE: "unreachable",
    NO_ANSWER: "no_answer",
    ON_RESERVE: "on_reserve",
}
OTHER_LABEL = "other"

_CANNOT_WRITE = {DISK_FULL, READ_ONLY_FS, IO_ERROR, READ_ONLY_DB, ON_RESERVE}

_CAUSE_FOR_ERRNO = {errno.ENOSPC: DISK_FULL, errno.EDQUOT: DISK_FULL, errno.EROFS: READ_ONLY_FS}


def unavailable(cause: str) -> StoreUnavailable:
    return StoreUnavailable(cause, cannot_write=cause in _CANNOT_WRITE)


def label_for(cause: str) -> str:
    return CAUSE_LABELS.get(cause, OTHER_LABEL)


def from_os_error(exc: OSError) -> str:
    return _CAUSE_FOR_ERRNO.get(exc.errno or 0, IO_ERROR)


def from_sqlite(exc: sqlite3.Error, data_dir: Path) -> str | None:
    """The cause of a SQLite failure, or None when it is not about writing (a bad query,
    a constraint, a busy lock). SQLite reports a file system turned read-only under an
    open database as a plain I/O error, so the directory itself is asked."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code == sqlite3.SQLITE_FULL:
        return DISK_FULL
    if code in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN):
        return probe_directory(data_dir) or (
            READ_ONLY_DB if code == sqlite3.SQLITE_READONLY else IO_ERROR
        )
    return None


def probe_directory(data_dir: Path) -> str | None:
    """Create, sync and remove a small file in ``data_dir``: the errno says why it cannot
    be written (None if it can)."""
    probe = data_dir / ".killswitch-write-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        return from_os_error(exc)
    return None


# SQLSTATEs (https://www.postgresql.org/docs/current/errcodes-appendix.html).
_CAUSE_FOR_SQLSTATE = {
    "25006": READ_ONLY_DB,  # read_only_sql_transaction: a hot standby, or read-only by default
    "53100": DISK_FULL,
    "58030": IO_ERROR,
    "57P01": UNREACHABLE,  # admin_shutdown
    "57P02": UNREACHABLE,  # crash_shutdown
    "57P03": UNREACHABLE,  # cannot_connect_now
}


def from_postgres(exc: psycopg.Error) -> str | None:
    """The cause of a PostgreSQL failure, or None when it is about the query itself.

    psycopg is imported here, not at the top: only a PostgreSQL store calls this, and
    the driver takes 80 ms to import in every SQLite server and CLI call otherwise."""
    import psycopg

    sqlstate = exc.sqlstate or ""
    if sqlstate in _CAUSE_FOR_SQLSTATE:
        return _CAUSE_FOR_SQLSTATE[sqlstate]
    if sqlstate.startswith("08") or (isinstance(exc, psycopg.OperationalError) and not sqlstate):
        return UNREACHABLE  # connection_exception, or libpq lost the connection
    return None
