"""SQLite store: the embedded default. One file in WAL mode, ``synchronous=FULL``.

All SQL runs on one dedicated thread so the event loop never blocks on fsync,
and so the single connection is never shared between threads. The data dir and
database files are owner-only: they say who paused whom and why.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from collections.abc import Coroutine
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from typing import Self
from typing import TypeVar

import structlog

from control.errors import StoreError
from control.errors import StoreUnavailable
from control.store import AgentChanges
from control.store import ViolationEvidence
from control.store import causes
from control.store import codec
from control.store.codec import Row
from control.store.reserve import Reserve
from control.store.scripted import ScriptedStore
from control.store.scripts import Script
from control.store.sqlite_schema import MIGRATIONS
from control.store.transaction import Dialect
from control.store.transaction import Params
from control.store.transaction import Statements
from control.store.transaction import insert_sql

# MIGRATIONS lives in the schema module beside this one; tests read it from here.
__all__ = ["DB_FILENAME", "MIGRATIONS", "SqliteStore", "SqliteTransaction"]

T = TypeVar("T")

log = structlog.get_logger("killswitch.store")

DB_FILENAME = "killswitch.db"
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
# SQLite's WAL-mode companions of the database file; they hold recent writes too.
_SIDE_FILE_SUFFIXES = ("-wal", "-shm")


def _replace(table: str, columns: Sequence[str]) -> str:
    """Insert or replace by primary key: the row as given, whatever was stored."""
    return insert_sql(table, columns, "?").replace("INSERT", "INSERT OR REPLACE", 1)


SQLITE = Statements(Dialect(placeholder="?", named=lambda sql: sql, lock="", replace=_replace))
_UPSERT_AGENT = _replace("agents", codec.AGENT_COLUMNS)
_INSERT_EVIDENCE = insert_sql("violation_evidence", codec.EVIDENCE_COLUMNS, "?")
_BEAT = "INSERT OR REPLACE INTO store_beat (id, replica_id, beat_at) VALUES (1, ?, ?)"


def _complete(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a transaction script to its end, here on the store's thread.

    The scripts are ``async`` so that PostgreSQL's can wait on the network; on SQLite
    every primitive is a plain call that never waits, so the script runs to its end at
    the first step, inside the one transaction this thread has open."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coroutine.close()
    raise RuntimeError("a transaction script waited on something other than its transaction")


class SqliteTransaction:
    """``Transaction`` on the store's one connection, on its thread."""

    sql = SQLITE

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    async def one(self, query: str, params: Params = ()) -> Row | None:
        row: Row | None = self._db.execute(query, params).fetchone()
        return row

    async def all(self, query: str, params: Params = ()) -> list[Row]:
        return self._db.execute(query, params).fetchall()

    async def execute(self, query: str, params: Params = ()) -> int:
        changed = self._db.execute(query, params).rowcount
        # Python reports -1 for a statement opening WITH: SQLite itself knows.
        return changed if changed >= 0 else int(self._db.execute("SELECT changes()").fetchone()[0])

    async def execute_many(self, query: str, rows: Sequence[Params]) -> None:
        self._db.executemany(query, rows)

    async def upsert_agents(self, rows: Sequence[tuple[Any, ...]]) -> None:
        self._db.executemany(_UPSERT_AGENT, rows)

    async def append_evidence(self, evidence: ViolationEvidence) -> bool:
        # Looked up first: the append-only trigger refuses an insert of a stored id
        # before any ON CONFLICT clause could skip it.
        known = "SELECT 1 FROM violation_evidence WHERE id = ?"
        if self._db.execute(known, (evidence.id,)).fetchone() is not None:
            return False
        self._db.execute(_INSERT_EVIDENCE, codec.evidence_to_row(evidence))
        return True

    async def announce(self, epoch: int = 0) -> None:
        """Nobody else writes this file while the server runs: nobody to tell."""


def _make_private(path: Path, mode: int) -> None:
    """chmod ``path`` to ``mode``, warning when others could get at it before."""
    try:
        was = stat.S_IMODE(path.stat().st_mode)
        if was != mode:
            path.chmod(mode)
    except OSError as exc:
        raise StoreError(f"cannot make {path} owner-only (mode {mode:o}): {exc.strerror}") from None
    if was & 0o077:
        log.warning("permissions_tightened", path=str(path), was=f"{was:o}", now=f"{mode:o}")


def _prepare_files(db_path: Path) -> None:
    """Owner-only data dir and database file, created so before SQLite ever opens it."""
    data_dir = db_path.parent
    try:
        data_dir.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create data dir {data_dir}: {exc.strerror}") from None
    _make_private(data_dir, PRIVATE_DIR_MODE)
    try:
        os.close(os.open(db_path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE))
    except OSError as exc:
        raise StoreError(f"cannot create database {db_path}: {exc.strerror}") from None
    _make_private(db_path, PRIVATE_FILE_MODE)


class SqliteStore(ScriptedStore):
    """The ``Store`` contract on one SQLite file."""

    sole_writer = True
    _sql = SQLITE

    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None
        self._reserve = Reserve(path.parent)
        self._failed: Callable[[StoreUnavailable], None] = lambda error: None

    @classmethod
    async def open(cls, data_dir: Path) -> Self:
        store = cls(data_dir / DB_FILENAME)
        try:
            await store._run(store._connect)
        except BaseException:
            await store.close()
            raise
        return store

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, lambda: self._classified(fn))
        except StoreUnavailable as exc:
            self._failed(exc)
            raise

    def _classified(self, fn: Callable[[], T]) -> T:
        """Run ``fn``; a SQLite failure becomes a StoreError, with its cause when it is
        about writing (on this thread: finding the cause may touch the disk)."""
        try:
            return fn()
        except sqlite3.Error as exc:
            cause = causes.from_sqlite(exc, self._path.parent)
            if cause is None:
                raise StoreError(f"database {self._path} failed: {exc}") from exc
            raise causes.unavailable(cause) from exc

    def report_failures_to(self, failed: Callable[[StoreUnavailable], None]) -> None:
        self._failed = failed

    async def _transaction(self, script: Script[T], *, may_spend_reserve: bool = False) -> T:
        if may_spend_reserve:
            return await self._run(lambda: self._commit_from_reserve(script))
        return await self._run(lambda: self._commit(script))

    async def _read(self, script: Script[T], *, snapshot: bool = False) -> T:
        """No transaction needed for one statement: writes run on this same thread,
        never in between."""
        if snapshot:
            return await self._run(lambda: self._snapshot(script))
        return await self._run(lambda: _complete(script(SqliteTransaction(self._db))))

    def _commit_from_reserve(self, script: Script[T]) -> T:
        """Commit; if the disk is full, free the reserve and commit once more. On this
        thread, so no other write takes the freed space in between."""
        try:
            return self._commit(script)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_FULL or not self._reserve.release():
                raise
        log.warning("store_reserve_spent", cause=causes.DISK_FULL, path=str(self._reserve.path))
        return self._commit(script)

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("store is closed")
        return self._conn

    def _connect(self) -> None:
        _prepare_files(self._path)
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a hold is on disk before `pause` returns, even across power loss.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            self._conn = conn
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open database {self._path}: {exc}") from None
        if not self._reserve.ensure():
            log.warning("store_reserve_missing", cause=causes.ON_RESERVE, path=str(self._path))
        # SQLite gives these the database file's mode; make sure of it anyway.
        for suffix in _SIDE_FILE_SUFFIXES:
            side_file = self._path.with_name(self._path.name + suffix)
            if side_file.exists():
                _make_private(side_file, PRIVATE_FILE_MODE)

    def _migrate(self) -> None:
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(
                f"database {self._path} has schema version {version}, newer than this"
                f" server understands ({len(MIGRATIONS)}); upgrade the server"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            # One script per transaction; executescript, because trigger bodies contain ';'.
            try:
                db.executescript(
                    f"BEGIN IMMEDIATE; {script}; PRAGMA user_version={number}; COMMIT;"
                )
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _commit(self, script: Script[T]) -> T:
        """Run ``script`` in one write transaction: ``BEGIN IMMEDIATE`` takes the file's
        write lock first, so the transaction never fails halfway for want of it."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = _complete(script(SqliteTransaction(db)))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return result

    def _snapshot(self, script: Script[T]) -> T:
        """Several reads in one read transaction: another process writing the file (the
        CLI's ``init``) is seen entirely or not at all."""
        db = self._db
        db.execute("BEGIN")
        try:
            return _complete(script(SqliteTransaction(db)))
        finally:
            db.execute("COMMIT")

    async def agents_written_since(self, cursor: str, replica_id: str) -> AgentChanges:
        """Only this server writes the file."""
        return AgentChanges([], {}, cursor)

    async def watch(self, changed: Callable[[], None]) -> None:
        """Nobody else writes this file while the server runs: nothing to watch."""

    async def try_lead(self) -> bool:
        """One server per file: it always leads."""
        return True

    async def beat(self, replica_id: str) -> None:
        """A durable write (a row, committed with ``synchronous=FULL``), then the reserve
        put back if it was spent: the store is healthy only when both work."""

        def beat() -> None:
            self._commit(lambda tx: tx.execute(_BEAT, (replica_id, time.time())))
            if not self._reserve.ensure():
                raise causes.unavailable(causes.ON_RESERVE)

        await self._run(beat)

    async def close(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(close)
        self._executor.shutdown(wait=True)
