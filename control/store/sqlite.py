"""SQLite store: the embedded default. One file in WAL mode, ``synchronous=FULL``.

All SQL runs on one dedicated thread so the event loop never blocks on fsync,
and so the single connection is never shared between threads. The data dir and
database files are owner-only: they say who paused whom and why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sqlite3
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self, TypeVar

import structlog

from control.domain import (
    AgentStatus,
    CaptureReport,
    Desired,
    Hold,
    HoldDraft,
    HoldKind,
    Mode,
    Scope,
    ScopeKind,
)
from control.domain.approvals import Approval, ResumeRequest, ResumeState, executed
from control.domain.audit import GENESIS_HASH, AuditEntry, AuditRecord, ChainHead, chain
from control.domain.identity import CertificateRecord, EnrollToken, Role, check_enroll_token
from control.errors import Conflict, InvalidInput, NotFound, PermissionDenied, StoreError, shown
from control.store import LoadedState, RunChange, RunCommit, StoredAgent
from control.store.codec import release_from_json, release_to_json, run_from_json, run_to_json

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
]

_AGENT_COLUMNS = (
    "agent_id",
    "labels",
    "desired_mode",
    "desired_hold_ids",
    "desired_reason",
    "desired_epoch",
    "desired_since",
    "desired_purge_spool",
    "expected_since",
    "first_seen",
    "last_seen",
    "connected_at",
    "disconnected_at",
    "directive_sent_at",
    "directive_sent_epoch",
    "acked_epoch",
    "acked_mode",
    "acked_at",
    "nack_epoch",
    "nack_reason",
    "nack_at",
    "channels",
    "report",
    "ack_report",
    "purged_events",
    "quarantined_events",
    "verified_at",
    "lease_expires_at",
    "uploads_refused",
    "violation",
    "violation_at",
)
_HOLD_COLUMNS = (
    "id",
    "kind",
    "scope",
    "reason",
    "ticket",
    "created_by",
    "created_at",
    "created_epoch",
    "lifted_at",
    "lifted_by",
    "lifted_epoch",
    "keep_spool",
    "release",
)
_AUDIT_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(AuditRecord))
_AUDIT_COLUMNS = ("seq", *_AUDIT_RECORD_FIELDS, "prev_hash", "hash")
_RESUME_COLUMNS = (
    "id",
    "hold_id",
    "requested_by",
    "reason",
    "ticket",
    "created_at",
    "expires_at",
    "for_runbook",
    "state",
    "revision",
    "approvals",
    "decided_by",
    "decided_at",
    "decision_note",
    "lifted_epoch",
)
_TOKEN_COLUMNS = ("id", "secret_sha256", "uses_left", "expires_at", "created_by", "created_at")
_CERTIFICATE_COLUMNS = ("serial", "subject", "role", "not_after", "issued_at", "revoked_at")


def _select(table: str, columns: Sequence[str]) -> str:
    return f"SELECT {', '.join(columns)} FROM {table}"


def _insert(table: str, columns: Sequence[str], *, replace: bool = False) -> str:
    verb = "INSERT OR REPLACE" if replace else "INSERT"
    return f"{verb} INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def _attribute_row(obj: object, columns: Sequence[str]) -> tuple[Any, ...]:
    """For dataclasses whose fields are their columns one to one."""
    return tuple(getattr(obj, column) for column in columns)


_SELECT_HOLDS = _select("holds", _HOLD_COLUMNS)
_INSERT_HOLD = _insert("holds", _HOLD_COLUMNS)
_SELECT_AGENTS = _select("agents", _AGENT_COLUMNS)
_UPSERT_AGENT = _insert("agents", _AGENT_COLUMNS, replace=True)
_SELECT_AUDIT = _select("audit_log", _AUDIT_COLUMNS)
_INSERT_AUDIT = _insert("audit_log", _AUDIT_COLUMNS)
_SELECT_RESUMES = _select("resume_requests", _RESUME_COLUMNS)
_UPSERT_RESUME = _insert("resume_requests", _RESUME_COLUMNS, replace=True)
_SELECT_TOKENS = _select("enroll_tokens", _TOKEN_COLUMNS)
_INSERT_TOKEN = _insert("enroll_tokens", _TOKEN_COLUMNS)
_SELECT_CERTIFICATES = _select("certificates", _CERTIFICATE_COLUMNS)
_INSERT_CERTIFICATE = _insert("certificates", _CERTIFICATE_COLUMNS)


def scope_to_json(scope: Scope) -> str:
    if scope.kind is ScopeKind.SELECTOR:
        return json.dumps({"selector": dict(sorted(scope.match_labels.items()))})
    if scope.kind is ScopeKind.AGENTS:
        return json.dumps({"agents": sorted(scope.agent_ids)})
    return json.dumps({"all": True})


def scope_from_json(text: str) -> Scope:
    data = json.loads(text)
    if "selector" in data:
        return Scope.selector(data["selector"])
    if "agents" in data:
        return Scope.agents(data["agents"])
    return Scope.fleet()


def report_to_json(report: CaptureReport) -> str:
    return json.dumps([report.events_total, report.last_event_at, report.spool_events])


def report_from_json(text: str) -> CaptureReport:
    events_total, last_event_at, spool_events = json.loads(text)
    return CaptureReport(events_total, last_event_at, spool_events)


def _hold_from_row(row: sqlite3.Row) -> Hold:
    return Hold(
        id=row["id"],
        kind=HoldKind(row["kind"]),
        scope=scope_from_json(row["scope"]),
        reason=row["reason"],
        ticket=row["ticket"],
        created_by=row["created_by"],
        created_at=row["created_at"],
        created_epoch=row["created_epoch"],
        lifted_at=row["lifted_at"],
        lifted_by=row["lifted_by"],
        lifted_epoch=row["lifted_epoch"],
        keep_spool=bool(row["keep_spool"]),
        release=release_from_json(row["release"]),
    )


def _agent_to_row(agent: StoredAgent) -> tuple[Any, ...]:
    d, s = agent.desired, agent.status
    return (
        agent.agent_id,
        json.dumps(agent.labels, sort_keys=True),
        d.mode.value,
        json.dumps(list(d.hold_ids)),
        d.reason,
        d.epoch,
        d.since,
        d.purge_spool,
        s.expected_since,
        s.first_seen,
        s.last_seen,
        s.connected_at,
        s.disconnected_at,
        s.directive_sent_at,
        s.directive_sent_epoch,
        s.acked_epoch,
        s.acked_mode.value if s.acked_mode else None,
        s.acked_at,
        s.nack_epoch,
        s.nack_reason,
        s.nack_at,
        json.dumps(s.channels, sort_keys=True),
        report_to_json(s.report),
        report_to_json(s.ack_report),
        s.purged_events,
        s.quarantined_events,
        s.verified_at,
        s.lease_expires_at,
        s.uploads_refused,
        s.violation,
        s.violation_at,
    )


def _agent_from_row(row: sqlite3.Row) -> StoredAgent:
    desired = Desired(
        mode=Mode(row["desired_mode"]),
        hold_ids=tuple(json.loads(row["desired_hold_ids"])),
        reason=row["desired_reason"],
        epoch=row["desired_epoch"],
        since=row["desired_since"],
        purge_spool=bool(row["desired_purge_spool"]),
    )
    status = AgentStatus(
        expected_since=row["expected_since"],
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        connected=False,
        connected_at=row["connected_at"],
        disconnected_at=row["disconnected_at"],
        directive_sent_at=row["directive_sent_at"],
        directive_sent_epoch=row["directive_sent_epoch"],
        acked_epoch=row["acked_epoch"],
        acked_mode=Mode(row["acked_mode"]) if row["acked_mode"] else None,
        acked_at=row["acked_at"],
        nack_epoch=row["nack_epoch"],
        nack_reason=row["nack_reason"],
        nack_at=row["nack_at"],
        channels=json.loads(row["channels"]),
        report=report_from_json(row["report"]),
        ack_report=report_from_json(row["ack_report"]),
        purged_events=row["purged_events"],
        quarantined_events=row["quarantined_events"],
        verified_at=row["verified_at"],
        lease_expires_at=row["lease_expires_at"],
        uploads_refused=row["uploads_refused"],
        violation=row["violation"],
        violation_at=row["violation_at"],
    )
    return StoredAgent(row["agent_id"], json.loads(row["labels"]), desired, status)


def _hold_to_row(hold: Hold) -> tuple[Any, ...]:
    return (
        hold.id,
        hold.kind.value,
        scope_to_json(hold.scope),
        hold.reason,
        hold.ticket,
        hold.created_by,
        hold.created_at,
        hold.created_epoch,
        hold.lifted_at,
        hold.lifted_by,
        hold.lifted_epoch,
        hold.keep_spool,
        release_to_json(hold.release),
    )


def _audit_to_row(entry: AuditEntry) -> tuple[Any, ...]:
    return (
        entry.seq,
        *_attribute_row(entry.record, _AUDIT_RECORD_FIELDS),
        entry.prev_hash,
        entry.hash,
    )


def _audit_from_row(row: sqlite3.Row) -> AuditEntry:
    record = AuditRecord(**{name: row[name] for name in _AUDIT_RECORD_FIELDS})
    return AuditEntry(row["seq"], record, row["prev_hash"], row["hash"])


def _resume_to_row(request: ResumeRequest) -> tuple[Any, ...]:
    return (
        request.id,
        request.hold_id,
        request.requested_by,
        request.reason,
        request.ticket,
        request.created_at,
        request.expires_at,
        request.for_runbook,
        request.state.value,
        request.revision,
        json.dumps([dataclasses.asdict(a) for a in request.approvals]),
        request.decided_by,
        request.decided_at,
        request.decision_note,
        request.lifted_epoch,
    )


def _resume_from_row(row: sqlite3.Row) -> ResumeRequest:
    return ResumeRequest(
        id=row["id"],
        hold_id=row["hold_id"],
        requested_by=row["requested_by"],
        reason=row["reason"],
        ticket=row["ticket"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        for_runbook=bool(row["for_runbook"]),
        state=ResumeState(row["state"]),
        revision=row["revision"],
        approvals=tuple(Approval(**a) for a in json.loads(row["approvals"])),
        decided_by=row["decided_by"],
        decided_at=row["decided_at"],
        decision_note=row["decision_note"],
        lifted_epoch=row["lifted_epoch"],
    )


def _certificate_from_row(row: sqlite3.Row) -> CertificateRecord:
    return CertificateRecord(
        serial=row["serial"],
        subject=row["subject"],
        role=Role(row["role"]),
        not_after=row["not_after"],
        issued_at=row["issued_at"],
        revoked_at=row["revoked_at"],
    )


def _next_epoch(db: sqlite3.Connection) -> int:
    row = db.execute("UPDATE epoch_counter SET epoch = epoch + 1 RETURNING epoch").fetchone()
    return int(row[0])


def _insert_new(db: sqlite3.Connection, sql: str, row: tuple[Any, ...], what: str) -> None:
    """Insert a row whose key must be new; a reused key is the caller's conflict, not a crash."""
    try:
        db.execute(sql, row)
    except sqlite3.IntegrityError as exc:
        if exc.sqlite_errorcode == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY:
            raise Conflict(f"{what} already exists") from None
        raise


def _get_hold(db: sqlite3.Connection, hold_id: str) -> Hold | None:
    row = db.execute(f"{_SELECT_HOLDS} WHERE id = ?", (hold_id,)).fetchone()
    return None if row is None else _hold_from_row(row)


def _active_hold(db: sqlite3.Connection, hold_id: str) -> Hold:
    hold = _get_hold(db, hold_id)
    if hold is None:
        raise NotFound(f"unknown hold {hold_id!r}")
    if not hold.active:
        raise Conflict(f"hold {hold_id!r} was already lifted at epoch {hold.lifted_epoch}")
    return hold


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
    return dataclasses.replace(hold, lifted_at=lifted_at, lifted_by=lifted_by, lifted_epoch=epoch)


def _read_head(db: sqlite3.Connection) -> ChainHead:
    seq, head_hash = db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
    return ChainHead(seq, head_hash)


def _append_audit(db: sqlite3.Connection, records: Sequence[AuditRecord]) -> list[AuditEntry]:
    """Chain ``records`` after the stored head and move the head, in the caller's transaction."""
    previous: AuditEntry | ChainHead = _read_head(db)
    entries: list[AuditEntry] = []
    for record in records:
        previous = chain(previous, record)
        db.execute(_INSERT_AUDIT, _audit_to_row(previous))
        entries.append(previous)
    if entries:
        db.execute(
            "UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (previous.seq, previous.hash)
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

    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None

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
            return await loop.run_in_executor(self._executor, fn)
        except sqlite3.Error as exc:
            raise StoreError(f"database {self._path} failed: {exc}") from exc

    async def _write(
        self, records: Sequence[AuditRecord], change: Callable[[sqlite3.Connection], T]
    ) -> T:
        return await self._run(lambda: self._commit(records, change))

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
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        for entry in entries:
            log.info(
                "audit_appended",
                seq=entry.seq,
                hash=entry.hash,
                action=entry.record.action,
                actor=entry.record.actor,
            )
        return result

    async def load(self) -> LoadedState:
        def read() -> LoadedState:
            db = self._db
            epoch = db.execute("SELECT epoch FROM epoch_counter").fetchone()[0]
            holds = [
                _hold_from_row(r) for r in db.execute(f"{_SELECT_HOLDS} ORDER BY created_epoch")
            ]
            agents = [_agent_from_row(r) for r in db.execute(_SELECT_AGENTS)]
            requests = [
                _resume_from_row(r)
                for r in db.execute(f"{_SELECT_RESUMES} ORDER BY created_at, id")
            ]
            revoked = {
                row[0]
                for row in db.execute(
                    "SELECT serial FROM certificates WHERE revoked_at IS NOT NULL"
                )
            }
            runs = [
                run_from_json(row[0])
                for row in db.execute("SELECT run FROM runbook_runs ORDER BY started_at, id")
            ]
            return LoadedState(epoch, holds, agents, requests, revoked, runs)

        return await self._run(read)

    async def create_hold(self, draft: HoldDraft, audit: AuditRecord) -> Hold:
        def insert(db: sqlite3.Connection) -> Hold:
            hold = Hold.committed(draft, _next_epoch(db))
            _insert_new(db, _INSERT_HOLD, _hold_to_row(hold), f"hold {hold.id!r}")
            return hold

        return await self._write([audit], insert)

    async def lift_hold(
        self, hold_id: str, lifted_by: str, lifted_at: float, audit: AuditRecord
    ) -> Hold:
        return await self._write([audit], lambda db: _lift(db, hold_id, lifted_by, lifted_at))

    async def save_agents(
        self, agents: Sequence[StoredAgent], audit: Sequence[AuditRecord] = ()
    ) -> None:
        rows = [_agent_to_row(a) for a in agents]
        if rows or audit:
            await self._write(audit, lambda db: db.executemany(_UPSERT_AGENT, rows))

    async def append_audit(self, records: Sequence[AuditRecord]) -> None:
        if records:
            await self._write(records, lambda db: None)

    async def read_audit(self, after_seq: int, limit: int) -> tuple[list[AuditEntry], ChainHead]:
        if limit < 1:
            raise InvalidInput(f"limit must be at least 1, got {limit}")

        # No transaction needed: writes run on this same thread, never in between.
        def read() -> tuple[list[AuditEntry], ChainHead]:
            db = self._db
            rows = db.execute(
                f"{_SELECT_AUDIT} WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
            )
            return [_audit_from_row(r) for r in rows], _read_head(db)

        return await self._run(read)

    async def save_resume_request(self, request: ResumeRequest, audit: AuditRecord) -> None:
        await self._write([audit], lambda db: db.execute(_UPSERT_RESUME, _resume_to_row(request)))

    async def execute_resume(
        self, request: ResumeRequest, lifted_at: float, audit: AuditRecord
    ) -> Hold:
        """The lift is attributed to the audit record's actor: whoever executes the resume."""

        def lift_and_record(db: sqlite3.Connection) -> Hold:
            hold = _lift(db, request.hold_id, audit.actor, lifted_at)
            db.execute(_UPSERT_RESUME, _resume_to_row(executed(request, hold.lifted_epoch)))
            return hold

        return await self._write([audit], lift_and_record)

    async def commit_run(self, change: RunChange, audit: Sequence[AuditRecord]) -> RunCommit:
        def apply(db: sqlite3.Connection) -> RunCommit:
            touches_holds = change.create or change.lift_hold_id or change.release
            epoch = _next_epoch(db) if touches_holds else 0
            holds: list[Hold] = []
            if change.lift_hold_id:
                holds.append(_lift(db, change.lift_hold_id, change.by, change.at, epoch))
            if change.create is not None:
                hold = Hold.committed(change.create, epoch)
                _insert_new(db, _INSERT_HOLD, _hold_to_row(hold), f"hold {hold.id!r}")
                holds.append(hold)
            if change.release is not None:
                hold_id, release = change.release
                hold = dataclasses.replace(_active_hold(db, hold_id), release=release)
                db.execute(
                    "UPDATE holds SET release = ? WHERE id = ?",
                    (release_to_json(release), hold_id),
                )
                holds.append(hold)
            if change.executed_request is not None:
                done = executed(change.executed_request, epoch)
                db.execute(_UPSERT_RESUME, _resume_to_row(done))
            run = change.run
            db.execute(
                "INSERT OR REPLACE INTO runbook_runs (id, state, started_at, run)"
                " VALUES (?, ?, ?, ?)",
                (run.id, run.state.value, run.started_at, run_to_json(run)),
            )
            return RunCommit(holds, epoch)

        return await self._write(audit, apply)

    async def create_enroll_token(self, token: EnrollToken, audit: AuditRecord) -> None:
        row = _attribute_row(token, _TOKEN_COLUMNS)
        await self._write(
            [audit], lambda db: _insert_new(db, _INSERT_TOKEN, row, f"enrolment token {token.id!r}")
        )

    async def consume_enroll_token(self, token_id: str, secret: str, now: float) -> None:
        def take_one_use(db: sqlite3.Connection) -> None:
            row = db.execute(f"{_SELECT_TOKENS} WHERE id = ?", (token_id,)).fetchone()
            token = None if row is None else EnrollToken(*row)
            reason = check_enroll_token(token, secret, now)
            if reason:
                raise PermissionDenied(reason)
            db.execute(
                "UPDATE enroll_tokens SET uses_left = uses_left - 1 WHERE id = ?", (token_id,)
            )

        await self._write((), take_one_use)

    async def record_certificate(
        self, certificate: CertificateRecord, audit: AuditRecord | None
    ) -> None:
        row = _attribute_row(certificate, _CERTIFICATE_COLUMNS)
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
            if not rows:
                raise NotFound(f"no certificate with subject or serial {shown(subject_or_serial)}")
            unrevoked = [c for c in map(_certificate_from_row, rows) if not c.revoked]
            if not unrevoked:
                raise Conflict(
                    f"every certificate matching {subject_or_serial!r} is already revoked"
                )
            db.executemany(
                "UPDATE certificates SET revoked_at = ? WHERE serial = ?",
                [(revoked_at, c.serial) for c in unrevoked],
            )
            return [dataclasses.replace(c, revoked_at=revoked_at) for c in unrevoked]

        return await self._write([audit], revoke)

    async def list_certificates(self) -> list[CertificateRecord]:
        def read() -> list[CertificateRecord]:
            rows = self._db.execute(f"{_SELECT_CERTIFICATES} ORDER BY issued_at, serial")
            return [_certificate_from_row(r) for r in rows]

        return await self._run(read)

    async def close(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(close)
        self._executor.shutdown(wait=True)
