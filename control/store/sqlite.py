"""SQLite store: the embedded default. One file in WAL mode, ``synchronous=FULL``.

All SQL runs on one dedicated thread so the event loop never blocks on fsync,
and so the single connection is never shared between threads. The data dir and
database files are owner-only: they say who paused whom and why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self, TypeVar

import structlog

from control.domain import Hold, HoldDraft
from control.domain.approvals import ResumeRequest, executed
from control.domain.audit import GENESIS_HASH, AuditEntry, AuditRecord, ChainHead
from control.domain.identity import CertificateRecord, EnrollToken, check_enroll_token
from control.domain.rollout import Run
from control.errors import InvalidInput, PermissionDenied, StoreError, StoreUnavailable
from control.store import (
    AgentChanges,
    ArchivedCounts,
    DashboardSession,
    DecidedLabels,
    LoadedState,
    OutboxFeed,
    RunChange,
    RunCommit,
    SharedState,
    StoredAgent,
    ViolationEvidence,
    causes,
    codec,
    enrolment,
    history,
    outbox,
)
from control.store.outbox import ClaimedMessage, OutboxMessage
from control.store.reserve import Reserve

T = TypeVar("T")

log = structlog.get_logger("killswitch.store")

DB_FILENAME = "killswitch.db"
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
# SQLite's WAL-mode companions of the database file; they hold recent writes too.
_SIDE_FILE_SUFFIXES = ("-wal", "-shm")

# Each entry upgrades the schema by one version; never edit a released entry.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE epoch_counter (id INTEGER PRIMARY KEY CHECK (id = 1), epoch INTEGER NOT NULL);
    INSERT INTO epoch_counter (id, epoch) VALUES (1, 0);
    CREATE TABLE holds (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        scope TEXT NOT NULL,
        reason TEXT NOT NULL,
        ticket TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at REAL NOT NULL,
        created_epoch INTEGER NOT NULL,
        lifted_at REAL,
        lifted_by TEXT NOT NULL DEFAULT '',
        lifted_epoch INTEGER NOT NULL DEFAULT 0,
        keep_spool INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE agents (
        agent_id TEXT PRIMARY KEY,
        labels TEXT NOT NULL,
        desired_mode TEXT NOT NULL,
        desired_hold_ids TEXT NOT NULL,
        desired_reason TEXT NOT NULL,
        desired_epoch INTEGER NOT NULL,
        desired_since REAL NOT NULL,
        desired_purge_spool INTEGER NOT NULL,
        expected_since REAL,
        first_seen REAL,
        last_seen REAL,
        connected_at REAL,
        disconnected_at REAL,
        directive_sent_at REAL,
        directive_sent_epoch INTEGER NOT NULL,
        acked_epoch INTEGER NOT NULL,
        acked_mode TEXT,
        acked_at REAL,
        nack_epoch INTEGER NOT NULL,
        nack_reason TEXT NOT NULL,
        nack_at REAL,
        channels TEXT NOT NULL,
        report TEXT NOT NULL,
        ack_report TEXT NOT NULL,
        purged_events INTEGER NOT NULL,
        quarantined_events INTEGER NOT NULL,
        verified_at REAL,
        lease_expires_at REAL,
        uploads_refused INTEGER NOT NULL,
        violation TEXT NOT NULL,
        violation_at REAL
    );
    """,
    f"""
    CREATE TABLE audit_log (
        seq INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        actor TEXT NOT NULL,
        role TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        reason TEXT NOT NULL,
        ticket TEXT NOT NULL,
        result TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: entries cannot be changed'); END;
    CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: entries cannot be deleted'); END;
    -- INSERT OR REPLACE deletes without firing delete triggers: refuse reused seqs.
    CREATE TRIGGER audit_log_no_overwrite BEFORE INSERT ON audit_log
    WHEN NEW.seq <= (SELECT max(seq) FROM audit_log)
    BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: seq already written'); END;
    CREATE TABLE audit_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL,
        hash TEXT NOT NULL
    );
    INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '{GENESIS_HASH}');
    CREATE TRIGGER audit_head_forward_only BEFORE UPDATE ON audit_head
    WHEN NEW.seq < OLD.seq
    BEGIN SELECT RAISE(ABORT, 'audit_head only moves forward'); END;
    CREATE TABLE resume_requests (
        id TEXT PRIMARY KEY,
        hold_id TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        reason TEXT NOT NULL,
        ticket TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        for_runbook INTEGER NOT NULL,
        state TEXT NOT NULL,
        revision INTEGER NOT NULL,
        approvals TEXT NOT NULL,
        decided_by TEXT NOT NULL,
        decided_at REAL,
        decision_note TEXT NOT NULL,
        lifted_epoch INTEGER NOT NULL
    );
    CREATE TABLE enroll_tokens (
        id TEXT PRIMARY KEY,
        secret_sha256 TEXT NOT NULL,
        uses_left INTEGER NOT NULL,
        expires_at REAL NOT NULL,
        created_by TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        subject TEXT NOT NULL,
        role TEXT NOT NULL,
        not_after REAL NOT NULL,
        issued_at REAL NOT NULL,
        revoked_at REAL
    );
    CREATE INDEX certificates_by_subject ON certificates (subject);
    """,
    """
    ALTER TABLE holds ADD COLUMN release TEXT;
    CREATE TABLE runbook_runs (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        started_at REAL NOT NULL,
        run TEXT NOT NULL
    );
    """,
    """
    ALTER TABLE agents ADD COLUMN connected INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN acked_since_connect INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN nacked_since_connect INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN written_by TEXT NOT NULL DEFAULT '';
    ALTER TABLE agents ADD COLUMN written_at REAL;
    CREATE TABLE violation_acks (
        agent_id TEXT PRIMARY KEY,
        violation_at REAL NOT NULL
    );
    """,
    """
    CREATE TABLE dashboard_sessions (
        key TEXT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        role TEXT NOT NULL,
        serial TEXT NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (key, kind)
    );
    """,
    # Store health: the beat is a durable write.
    """
    CREATE TABLE store_beat (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        replica_id TEXT NOT NULL,
        beat_at REAL NOT NULL
    );
    """,
    # Violations are durable.
    """
    ALTER TABLE agents ADD COLUMN stopped_at REAL;
    CREATE TABLE violation_evidence (
        id TEXT PRIMARY KEY,
        agent_id TEXT NOT NULL,
        flagged_at REAL NOT NULL,
        evidence TEXT NOT NULL,
        detected_by TEXT NOT NULL,
        epoch INTEGER NOT NULL
    );
    CREATE INDEX violation_evidence_by_agent ON violation_evidence (agent_id, flagged_at);
    CREATE TRIGGER violation_evidence_no_update BEFORE UPDATE ON violation_evidence
    BEGIN SELECT RAISE(ABORT, 'violation_evidence is append-only: entries cannot be changed'); END;
    CREATE TRIGGER violation_evidence_no_delete BEFORE DELETE ON violation_evidence
    BEGIN SELECT RAISE(ABORT, 'violation_evidence is append-only: entries cannot be deleted'); END;
    -- INSERT OR REPLACE deletes without firing delete triggers: refuse reused ids.
    CREATE TRIGGER violation_evidence_no_overwrite BEFORE INSERT ON violation_evidence
    WHEN EXISTS (SELECT 1 FROM violation_evidence WHERE id = NEW.id)
    BEGIN SELECT RAISE(ABORT, 'violation_evidence is append-only: id already written'); END;
    """,
    # History compaction.
    # Finished history is marked archived, and hot reads walk a partial index of the rest.
    """
    ALTER TABLE holds ADD COLUMN archived_at REAL;
    ALTER TABLE resume_requests ADD COLUMN archived_at REAL;
    ALTER TABLE runbook_runs ADD COLUMN ended_at REAL;
    ALTER TABLE runbook_runs ADD COLUMN archived_at REAL;
    UPDATE runbook_runs SET ended_at = json_extract(run, '$.ended_at');
    CREATE INDEX holds_hot ON holds (created_epoch) WHERE archived_at IS NULL;
    CREATE INDEX resume_requests_hot ON resume_requests (created_at, id)
        WHERE archived_at IS NULL;
    CREATE INDEX runbook_runs_hot ON runbook_runs (started_at, id) WHERE archived_at IS NULL;
    """,
    # Server-decided labels.
    # What each agent reported of itself (NULL: never connected), kept apart from the
    # labels the server decides; and the labels a join token pins on its agents.
    """
    ALTER TABLE agents ADD COLUMN reported_labels TEXT;
    ALTER TABLE enroll_tokens ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
    """,
    # Decided labels are shared state.
    # The labels operators decided, apart from the agents' rows (which only the replica
    # serving an agent writes), under a version every label change moves forward.
    """
    CREATE TABLE agent_labels (
        agent_id TEXT PRIMARY KEY,
        labels TEXT NOT NULL,
        set_by TEXT NOT NULL,
        set_at REAL NOT NULL,
        version INTEGER NOT NULL
    );
    CREATE INDEX agent_labels_by_version ON agent_labels (version);
    CREATE TABLE label_counter (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL
    );
    INSERT INTO label_counter (id, version) VALUES (1, 0);
    """,
    # ---- issue 14 (ingest gateway): renumber at merge if another migration lands first.
    # What the ingest gateway reported landing in its sink, per agent: events dated after
    # the agent's newest stop (0 expected), and the newest capture time accepted.
    """
    ALTER TABLE agents ADD COLUMN events_accepted_after_pause INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN last_accepted_event_at REAL;
    """,
    # ---- issue 15 (drill requests): before the claim, whose tests re-run what follows it.
    # A drill request has no hold: it approves starting one drill runbook's exact text.
    """
    ALTER TABLE resume_requests ADD COLUMN drill_runbook TEXT NOT NULL DEFAULT '';
    ALTER TABLE resume_requests ADD COLUMN drill_sha256 TEXT NOT NULL DEFAULT '';
    """,
    # ---- issue 15: one valid certificate per agent id (control.store.enrolment).
    enrolment.CLAIM_MIGRATION,
    # ---- issue 15: a laptop's opt-out is one hold (control.domain.holds.opt_out_hold_id);
    # the lifted ones of earlier cycles, each its own row, are archived now.
    """
    UPDATE holds SET archived_at = (julianday('now') - 2440587.5) * 86400.0
    WHERE kind = 'opt_out' AND lifted_at IS NOT NULL AND archived_at IS NULL;
    """,
    # ---- issue 16: webhook deliveries waiting, durable across restarts (control.store.outbox).
    outbox.SQLITE_MIGRATION,
]


def _insert(table: str, columns: Sequence[str], *, replace: bool = False) -> str:
    verb = "INSERT OR REPLACE" if replace else "INSERT"
    return f"{verb} INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


_SELECT_HOLDS = codec.select_sql("holds", codec.HOLD_COLUMNS)
_INSERT_HOLD = _insert("holds", codec.HOLD_COLUMNS)
_REACTIVATE_HOLD = codec.reactivating(_INSERT_HOLD)
_SELECT_AGENTS = codec.SELECT_AGENTS
_UPSERT_AGENT = _insert("agents", codec.AGENT_COLUMNS, replace=True)
_SELECT_AUDIT = codec.select_sql("audit_log", codec.AUDIT_COLUMNS)
_INSERT_AUDIT = _insert("audit_log", codec.AUDIT_COLUMNS)
_SELECT_RESUMES = codec.select_sql("resume_requests", codec.RESUME_COLUMNS)
_UPSERT_RESUME = _insert("resume_requests", codec.RESUME_COLUMNS, replace=True)
_SELECT_TOKENS = codec.select_sql("enroll_tokens", codec.TOKEN_COLUMNS)
_INSERT_TOKEN = _insert("enroll_tokens", codec.TOKEN_COLUMNS)
_SELECT_CERTIFICATES = codec.select_sql("certificates", codec.CERTIFICATE_COLUMNS)
_INSERT_CERTIFICATE = _insert("certificates", codec.CERTIFICATE_COLUMNS)
# BEGIN IMMEDIATE already serialises enrolments here; the claim's index is the backstop.
_RELEASE_CLAIM, _VALID_CERTIFICATE, _INSERT_CLAIMING_CERTIFICATE = enrolment.statements("?")
_UPSERT_RUN = _insert("runbook_runs", codec.RUN_COLUMNS, replace=True)
_UPSERT_VIOLATION_ACK = _insert("violation_acks", codec.VIOLATION_ACK_COLUMNS, replace=True)
_INSERT_DASHBOARD_SESSION = _insert("dashboard_sessions", codec.DASHBOARD_SESSION_COLUMNS)
_DASHBOARD_SESSION_LIST = ", ".join(codec.DASHBOARD_SESSION_COLUMNS)
_BEAT = "INSERT OR REPLACE INTO store_beat (id, replica_id, beat_at) VALUES (1, ?, ?)"
_INSERT_EVIDENCE = _insert("violation_evidence", codec.EVIDENCE_COLUMNS)
_UPSERT_DECIDED_LABELS = codec.upsert_decided_labels("?")
_SELECT_DECIDED_LABELS = f"{codec.SELECT_DECIDED_LABELS} WHERE version > ? ORDER BY version"
_HOT_HOLDS, _HOT_RESUMES, _HOT_RUNS = history.hot_reads("created_epoch")
_ARCHIVE_BATCHES = history.archive_batches(lambda name: f":{name}", "")
_ARCHIVED_HOLD, _ARCHIVED_RESUME, _ARCHIVED_RUN = history.archived_lookups(lambda n: f":{n}")


_NEXT_LABEL_VERSION = "UPDATE label_counter SET version = version + 1 RETURNING version"


def _read_shared(db: sqlite3.Connection) -> SharedState:
    epoch = db.execute("SELECT epoch FROM epoch_counter").fetchone()[0]
    holds = [codec.hold_from_row(r) for r in db.execute(_HOT_HOLDS)]
    requests = [codec.resume_from_row(r) for r in db.execute(_HOT_RESUMES)]
    revoked = dict(db.execute(codec.SELECT_REVOKED).fetchall())
    runs = [codec.run_from_json(row[0]) for row in db.execute(_HOT_RUNS)]
    acks = dict(db.execute(codec.SELECT_VIOLATION_ACKS).fetchall())
    evidence = [
        codec.evidence_from_row(r) for r in db.execute(codec.SELECT_UNACKNOWLEDGED_EVIDENCE)
    ]
    return SharedState(epoch, holds, requests, revoked, runs, acks, evidence)


def _stored_request(db: sqlite3.Connection, request_id: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = db.execute(
        f"{_SELECT_RESUMES} WHERE id = ?", (request_id,)
    ).fetchone()
    return row


def _next_epoch(db: sqlite3.Connection) -> int:
    row = db.execute("UPDATE epoch_counter SET epoch = epoch + 1 RETURNING epoch").fetchone()
    return int(row[0])


def _insert_new(db: sqlite3.Connection, sql: str, row: tuple[Any, ...], what: str) -> None:
    """Insert a row whose key must be new."""
    try:
        db.execute(sql, row)
    except sqlite3.IntegrityError as exc:
        if exc.sqlite_errorcode == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY:
            raise codec.already_exists(what) from None
        raise


def _active_hold(db: sqlite3.Connection, hold_id: str) -> Hold:
    return codec.active_hold(
        db.execute(f"{_SELECT_HOLDS} WHERE id = ?", (hold_id,)).fetchone(), hold_id
    )


def _lift(
    db: sqlite3.Connection,
    hold_id: str,
    lifted_by: str,
    lifted_at: float,
    epoch: int | None = None,
) -> Hold:
    hold = _active_hold(db, hold_id)
    epoch = epoch or _next_epoch(db)
    db.execute(
        "UPDATE holds SET lifted_at = ?, lifted_by = ?, lifted_epoch = ? WHERE id = ?",
        (lifted_at, lifted_by, epoch, hold_id),
    )
    return codec.lifted(hold, lifted_by, lifted_at, epoch)


def _read_head(db: sqlite3.Connection) -> ChainHead:
    seq, head_hash = db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
    return ChainHead(seq, head_hash)


def _append_audit(db: sqlite3.Connection, records: Sequence[AuditRecord]) -> list[AuditEntry]:
    """Chain ``records`` after the stored head and move the head, in the caller's transaction."""
    entries = codec.chain_after(_read_head(db), records)
    db.executemany(_INSERT_AUDIT, map(codec.audit_to_row, entries))
    if entries:
        db.execute(
            "UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1",
            (entries[-1].seq, entries[-1].hash),
        )
    return entries


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


class SqliteStore:
    """The ``Store`` contract on one SQLite file."""

    sole_writer = True

    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None
        self._reserve = Reserve(path.parent)
        self._failed: Callable[[StoreUnavailable], None] = lambda error: None
        self.outbox_feed: OutboxFeed | None = None

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

    async def _write(
        self,
        records: Sequence[AuditRecord],
        change: Callable[[sqlite3.Connection], T],
        *,
        may_spend_reserve: bool = False,
    ) -> T:
        if may_spend_reserve:
            return await self._run(lambda: self._commit_from_reserve(records, change))
        return await self._run(lambda: self._commit(records, change))

    def _commit_from_reserve(
        self, records: Sequence[AuditRecord], change: Callable[[sqlite3.Connection], T]
    ) -> T:
        """Commit; if the disk is full, free the reserve and commit once more. On this
        thread, so no other write takes the freed space in between."""
        try:
            return self._commit(records, change)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_FULL or not self._reserve.release():
                raise
        log.warning("store_reserve_spent", cause=causes.DISK_FULL, path=str(self._reserve.path))
        return self._commit(records, change)

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

    def _commit(
        self, records: Sequence[AuditRecord], change: Callable[[sqlite3.Connection], T]
    ) -> T:
        """Apply ``change`` and append its audit entries in one transaction, then log them.

        The log line carries each entry's hash off the database: an anchor that a
        consistently cut log and head cannot match.
        """
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = change(db)
            entries = _append_audit(db, records)
            if self.outbox_feed is not None and entries:
                messages = self.outbox_feed(entries)
                db.executemany(outbox.ENQUEUE, [m.params() for m in messages])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        codec.log_appended(entries)
        return result

    def _snapshot(self, read: Callable[[sqlite3.Connection], T]) -> T:
        """Several reads in one read transaction: another process writing the file (the
        CLI's ``init``) is seen entirely or not at all."""
        db = self._db
        db.execute("BEGIN")
        try:
            return read(db)
        finally:
            db.execute("COMMIT")

    async def load(self) -> LoadedState:
        def read(db: sqlite3.Connection) -> LoadedState:
            agents = [codec.agent_from_row(r) for r in db.execute(_SELECT_AGENTS)]
            return LoadedState(_read_shared(db), agents)

        return await self._run(lambda: self._snapshot(read))

    async def load_shared(self) -> SharedState:
        return await self._run(lambda: self._snapshot(_read_shared))

    async def archive_history(self, before: float, now: float, limit: int) -> ArchivedCounts:
        params = {"before": before, "now": now, "limit": limit}

        def archived(db: sqlite3.Connection, sql: str) -> int:
            db.execute(sql, params)
            # Not the cursor's rowcount: Python reports -1 for a statement opening WITH.
            return int(db.execute("SELECT changes()").fetchone()[0])

        def archive(db: sqlite3.Connection) -> ArchivedCounts:
            return ArchivedCounts(*(archived(db, sql) for sql in _ARCHIVE_BATCHES))

        return await self._write((), archive)

    async def archived_hold(self, hold_id: str) -> Hold | None:
        row = await self._read_one(_ARCHIVED_HOLD, hold_id)
        return None if row is None else codec.hold_from_row(row)

    async def archived_request(self, request_id: str) -> ResumeRequest | None:
        row = await self._read_one(_ARCHIVED_RESUME, request_id)
        return None if row is None else codec.resume_from_row(row)

    async def archived_run(self, run_id: str) -> Run | None:
        row = await self._read_one(_ARCHIVED_RUN, run_id)
        return None if row is None else codec.run_from_json(row[0])

    async def _read_one(self, sql: str, item_id: str) -> sqlite3.Row | None:
        return await self._run(lambda: self._db.execute(sql, {"id": item_id}).fetchone())

    async def load_agent(self, agent_id: str) -> StoredAgent | None:
        def read() -> StoredAgent | None:
            row = self._db.execute(f"{_SELECT_AGENTS} WHERE agent_id = ?", (agent_id,)).fetchone()
            return None if row is None else codec.agent_from_row(row)

        return await self._run(read)

    async def agents_written_since(self, cursor: str, replica_id: str) -> AgentChanges:
        """Only this server writes the file."""
        return AgentChanges([], {}, cursor)

    async def acknowledge_violation(
        self, agent_id: str, violation_at: float, audit: AuditRecord
    ) -> None:
        await self._write(
            [audit], lambda db: db.execute(_UPSERT_VIOLATION_ACK, (agent_id, violation_at))
        )

    async def record_violations(
        self, found: Sequence[tuple[ViolationEvidence, AuditRecord]]
    ) -> None:
        # Filled by the change, before _commit appends it: only new evidence is audited.
        audit: list[AuditRecord] = []

        def append_new(db: sqlite3.Connection) -> None:
            for evidence, record in found:
                known = "SELECT 1 FROM violation_evidence WHERE id = ?"
                if db.execute(known, (evidence.id,)).fetchone() is None:
                    db.execute(_INSERT_EVIDENCE, codec.evidence_to_row(evidence))
                    audit.append(record)

        if found:
            await self._write(audit, append_new)

    async def create_hold(self, draft: HoldDraft, audit: AuditRecord) -> Hold:
        def insert(db: sqlite3.Connection) -> Hold:
            hold = Hold.committed(draft, _next_epoch(db))
            _insert_new(db, _INSERT_HOLD, codec.hold_to_row(hold), f"hold {hold.id!r}")
            return hold

        # A pause must commit on a full disk too: see control.store.reserve.
        return await self._write([audit], insert, may_spend_reserve=True)

    async def reactivate_hold(self, draft: HoldDraft, audit: AuditRecord) -> Hold:
        def upsert(db: sqlite3.Connection) -> Hold:
            hold = Hold.committed(draft, _next_epoch(db))
            if db.execute(_REACTIVATE_HOLD, codec.hold_to_row(hold)).fetchone() is None:
                raise codec.still_active(hold.id)
            return hold

        return await self._write([audit], upsert, may_spend_reserve=True)

    async def lift_hold(
        self, hold_id: str, lifted_by: str, lifted_at: float, audit: AuditRecord
    ) -> Hold:
        return await self._write([audit], lambda db: _lift(db, hold_id, lifted_by, lifted_at))

    async def save_agents(
        self,
        agents: Sequence[StoredAgent],
        audit: Sequence[AuditRecord] = (),
        labels: Sequence[DecidedLabels] = (),
    ) -> None:
        rows = [codec.agent_to_row(a) for a in agents]

        def upsert(db: sqlite3.Connection) -> None:
            db.executemany(_UPSERT_AGENT, rows)
            if labels:
                version = db.execute(_NEXT_LABEL_VERSION).fetchone()[0]
                decided = [codec.decided_labels_to_row(d, version) for d in labels]
                db.executemany(_UPSERT_DECIDED_LABELS, decided)

        if rows or audit or labels:
            await self._write(audit, upsert)

    async def labels_decided_since(self, version: int) -> list[DecidedLabels]:
        def read() -> list[DecidedLabels]:
            rows = self._db.execute(_SELECT_DECIDED_LABELS, (version,))
            return [codec.decided_labels_from_row(r) for r in rows]

        return await self._run(read)

    async def append_audit(self, records: Sequence[AuditRecord]) -> None:
        if records:
            await self._write(records, lambda db: None)

    async def enqueue_webhooks(self, messages: Sequence[OutboxMessage]) -> None:
        await self._write(
            (), lambda db: db.executemany(outbox.ENQUEUE, [m.params() for m in messages])
        )

    async def claim_webhooks(self, now: float, until: float, limit: int) -> list[ClaimedMessage]:
        def claim(db: sqlite3.Connection) -> list[ClaimedMessage]:
            params = {"now": now, "until": until, "limit": limit}
            return [ClaimedMessage(*row) for row in db.execute(outbox.SQLITE_CLAIM, params)]

        return await self._write((), claim)

    async def webhook_delivered(self, message_id: int, now: float) -> None:
        await self._write(
            (), lambda db: db.execute(outbox.DELIVERED, {"id": message_id, "now": now})
        )

    async def webhook_retry(self, message_id: int, next_at: float, error: str) -> None:
        params = {"id": message_id, "next_at": next_at, "error": error}
        await self._write((), lambda db: db.execute(outbox.RETRY, params))

    async def prune_webhooks(self, delivered_before: float) -> int:
        params = {"before": delivered_before}
        return await self._write((), lambda db: db.execute(outbox.PRUNE, params).rowcount)

    async def read_audit(self, after_seq: int, limit: int) -> tuple[list[AuditEntry], ChainHead]:
        if limit < 1:
            raise InvalidInput(f"limit must be at least 1, got {limit}")

        # No transaction needed: writes run on this same thread, never in between.
        def read() -> tuple[list[AuditEntry], ChainHead]:
            db = self._db
            rows = db.execute(
                f"{_SELECT_AUDIT} WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
            )
            return [codec.audit_from_row(r) for r in rows], _read_head(db)

        return await self._run(read)

    async def save_resume_request(self, request: ResumeRequest, audit: AuditRecord) -> None:
        """Refused with ``Conflict`` unless it is a new request, an edit of an open one, or
        a decision on a pending one: see ``codec.check_request_write``."""

        def upsert(db: sqlite3.Connection) -> None:
            codec.check_request_write(_stored_request(db, request.id), request)
            db.execute(_UPSERT_RESUME, codec.resume_to_row(request))

        await self._write([audit], upsert)

    async def execute_resume(
        self, request: ResumeRequest, lifted_at: float, audit: AuditRecord
    ) -> Hold:
        """The lift is attributed to the audit record's actor: whoever executes the resume."""

        def lift_and_record(db: sqlite3.Connection) -> Hold:
            hold = _lift(db, request.hold_id, audit.actor, lifted_at)
            codec.check_request_executable(_stored_request(db, request.id), request)
            db.execute(_UPSERT_RESUME, codec.resume_to_row(executed(request, hold.lifted_epoch)))
            return hold

        return await self._write([audit], lift_and_record)

    async def commit_run(self, change: RunChange, audit: Sequence[AuditRecord]) -> RunCommit:
        def apply(db: sqlite3.Connection) -> RunCommit:
            stored = db.execute(
                "SELECT run FROM runbook_runs WHERE id = ?", (change.run.id,)
            ).fetchone()
            codec.check_run_version(None if stored is None else stored[0], change.run)
            touches_holds = change.create or change.lift_hold_id or change.release
            epoch = _next_epoch(db) if touches_holds else 0
            holds: list[Hold] = []
            if change.lift_hold_id:
                holds.append(_lift(db, change.lift_hold_id, change.by, change.at, epoch))
            if change.create is not None:
                hold = Hold.committed(change.create, epoch)
                _insert_new(db, _INSERT_HOLD, codec.hold_to_row(hold), f"hold {hold.id!r}")
                holds.append(hold)
            if change.release is not None:
                hold_id, release = change.release
                hold = dataclasses.replace(_active_hold(db, hold_id), release=release)
                db.execute(
                    "UPDATE holds SET release = ? WHERE id = ?",
                    (codec.release_to_json(release), hold_id),
                )
                holds.append(hold)
            if change.executed_request is not None:
                request = change.executed_request
                codec.check_request_executable(_stored_request(db, request.id), request)
                db.execute(_UPSERT_RESUME, codec.resume_to_row(executed(request, epoch)))
            db.execute(_UPSERT_RUN, codec.run_to_row(change.run))
            return RunCommit(holds, epoch)

        return await self._write(audit, apply)

    async def create_enroll_token(self, token: EnrollToken, audit: AuditRecord) -> None:
        row = codec.token_to_row(token)
        await self._write(
            [audit], lambda db: _insert_new(db, _INSERT_TOKEN, row, f"enrolment token {token.id!r}")
        )

    async def enrol_agent(
        self, token_id: str, secret: str, certificate: CertificateRecord, audit: AuditRecord
    ) -> EnrollToken:
        agent_id, now = certificate.subject, certificate.issued_at
        claiming = (*codec.fields_of(certificate, codec.CERTIFICATE_COLUMNS), agent_id)

        def enrol(db: sqlite3.Connection) -> EnrollToken:
            row = db.execute(f"{_SELECT_TOKENS} WHERE id = ?", (token_id,)).fetchone()
            token = None if row is None else codec.token_from_row(row)
            reason = check_enroll_token(token, secret, now)
            if reason or token is None:
                raise PermissionDenied(reason)
            db.execute(_RELEASE_CLAIM, (agent_id, now))
            if valid := db.execute(_VALID_CERTIFICATE, (agent_id, now)).fetchone():
                raise enrolment.already_enrolled(agent_id, valid["serial"])
            if db.execute(_INSERT_CLAIMING_CERTIFICATE, claiming).fetchone() is None:
                raise codec.already_exists(f"certificate with serial {certificate.serial}")
            db.execute(
                "UPDATE enroll_tokens SET uses_left = uses_left - 1 WHERE id = ?", (token_id,)
            )
            return token

        return await self._write([audit], enrol)

    async def record_certificate(
        self, certificate: CertificateRecord, audit: AuditRecord | None
    ) -> None:
        row = codec.fields_of(certificate, codec.CERTIFICATE_COLUMNS)
        what = f"certificate with serial {certificate.serial}"
        await self._write(
            [] if audit is None else [audit],
            lambda db: _insert_new(db, _INSERT_CERTIFICATE, row, what),
        )

    async def revoke_certificates(
        self, subject_or_serial: str, revoked_at: float, audit: AuditRecord
    ) -> list[CertificateRecord]:
        def revoke(db: sqlite3.Connection) -> list[CertificateRecord]:
            rows = (
                db.execute(
                    f"{_SELECT_CERTIFICATES} WHERE serial = ?", (subject_or_serial,)
                ).fetchall()
                or db.execute(
                    f"{_SELECT_CERTIFICATES} WHERE subject = ? ORDER BY issued_at, serial",
                    (subject_or_serial,),
                ).fetchall()
            )
            unrevoked = codec.to_revoke(subject_or_serial, rows)
            db.executemany(
                "UPDATE certificates SET revoked_at = ? WHERE serial = ?",
                [(revoked_at, c.serial) for c in unrevoked],
            )
            return [dataclasses.replace(c, revoked_at=revoked_at) for c in unrevoked]

        return await self._write([audit], revoke)

    async def list_certificates(self) -> list[CertificateRecord]:
        def read() -> list[CertificateRecord]:
            rows = self._db.execute(f"{_SELECT_CERTIFICATES} ORDER BY issued_at, serial")
            return [codec.certificate_from_row(r) for r in rows]

        return await self._run(read)

    async def watch(self, changed: Callable[[], None]) -> None:
        """Nobody else writes this file while the server runs: nothing to watch."""

    async def try_lead(self) -> bool:
        """One server per file: it always leads."""
        return True

    async def save_dashboard_session(self, session: DashboardSession, now: float) -> None:
        def save(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM dashboard_sessions WHERE expires_at <= ?", (now,))
            db.execute(_INSERT_DASHBOARD_SESSION, codec.dashboard_session_to_row(session))

        await self._write([], save)

    async def dashboard_session(self, key: str, kind: str) -> DashboardSession | None:
        def read() -> DashboardSession | None:
            row = self._db.execute(
                f"SELECT {_DASHBOARD_SESSION_LIST} FROM dashboard_sessions"
                " WHERE key = ? AND kind = ?",
                (key, kind),
            ).fetchone()
            return None if row is None else codec.dashboard_session_from_row(row)

        return await self._run(read)

    async def delete_dashboard_session(self, key: str, kind: str) -> DashboardSession | None:
        def delete(db: sqlite3.Connection) -> DashboardSession | None:
            row = db.execute(
                "DELETE FROM dashboard_sessions WHERE key = ? AND kind = ?"
                f" RETURNING {_DASHBOARD_SESSION_LIST}",
                (key, kind),
            ).fetchone()
            return None if row is None else codec.dashboard_session_from_row(row)

        return await self._write([], delete)

    async def beat(self, replica_id: str) -> None:
        """A durable write (a row, committed with ``synchronous=FULL``), then the reserve
        put back if it was spent: the store is healthy only when both work."""

        def beat() -> None:
            self._commit((), lambda db: db.execute(_BEAT, (replica_id, time.time())))
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
