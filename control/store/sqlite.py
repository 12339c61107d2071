"""SQLite store: the embedded default. One file in WAL mode, ``synchronous=FULL``.

All SQL runs on one dedicated thread so the event loop never blocks on fsync,
and so the single connection is never shared between threads.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

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
from control.errors import Conflict, NotFound, StoreError
from control.store import LoadedState, StoredAgent

T = TypeVar("T")

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
]

_AGENT_COLUMNS = (
    "agent_id, labels, desired_mode, desired_hold_ids, desired_reason, desired_epoch,"
    " desired_since, desired_purge_spool, expected_since, first_seen, last_seen, connected_at,"
    " disconnected_at,"
    " directive_sent_at, directive_sent_epoch, acked_epoch, acked_mode, acked_at, nack_epoch,"
    " nack_reason, nack_at, channels, report, ack_report, purged_events, quarantined_events,"
    " verified_at, lease_expires_at, uploads_refused, violation, violation_at"
)
_HOLD_COLUMNS = (
    "id, kind, scope, reason, ticket, created_by, created_at, created_epoch, lifted_at,"
    " lifted_by, lifted_epoch, keep_spool"
)


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


class SqliteStore:
    """The ``Store`` contract on one SQLite file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, data_dir: Path) -> SqliteStore:
        store = cls(data_dir / "killswitch.db")
        await store._run(store._connect)
        return store

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn)

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("store is closed")
        return self._conn

    def _connect(self) -> None:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create data dir {self._path.parent}: {exc.strerror}"
            ) from None
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

    def _migrate(self) -> None:
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(
                f"database {self._path} has schema version {version}, newer than this"
                f" server understands ({len(MIGRATIONS)}); upgrade the server"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={number}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    @staticmethod
    def _next_epoch(db: sqlite3.Connection) -> int:
        row = db.execute("UPDATE epoch_counter SET epoch = epoch + 1 RETURNING epoch").fetchone()
        return int(row[0])

    async def load(self) -> LoadedState:
        def read() -> LoadedState:
            db = self._db
            epoch = db.execute("SELECT epoch FROM epoch_counter").fetchone()[0]
            holds = [
                _hold_from_row(r)
                for r in db.execute(f"SELECT {_HOLD_COLUMNS} FROM holds ORDER BY created_epoch")
            ]
            agents = [
                _agent_from_row(r) for r in db.execute(f"SELECT {_AGENT_COLUMNS} FROM agents")
            ]
            return LoadedState(epoch=epoch, holds=holds, agents=agents)

        return await self._run(read)

    async def create_hold(self, draft: HoldDraft) -> Hold:
        def insert(db: sqlite3.Connection) -> Hold:
            epoch = self._next_epoch(db)
            hold = Hold.committed(draft, epoch)
            db.execute(
                f"INSERT INTO holds ({_HOLD_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    hold.id,
                    hold.kind.value,
                    scope_to_json(hold.scope),
                    hold.reason,
                    hold.ticket,
                    hold.created_by,
                    hold.created_at,
                    epoch,
                    None,
                    "",
                    0,
                    hold.keep_spool,
                ),
            )
            return hold

        return await self._run(lambda: self._transaction(insert))

    async def lift_hold(self, hold_id: str, lifted_by: str, lifted_at: float) -> Hold:
        def lift(db: sqlite3.Connection) -> Hold:
            row = db.execute(
                f"SELECT {_HOLD_COLUMNS} FROM holds WHERE id = ?", (hold_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"unknown hold {hold_id!r}")
            if row["lifted_at"] is not None:
                raise Conflict(
                    f"hold {hold_id!r} was already lifted at epoch {row['lifted_epoch']}"
                )
            epoch = self._next_epoch(db)
            db.execute(
                "UPDATE holds SET lifted_at = ?, lifted_by = ?, lifted_epoch = ? WHERE id = ?",
                (lifted_at, lifted_by, epoch, hold_id),
            )
            return _hold_from_row(
                db.execute(f"SELECT {_HOLD_COLUMNS} FROM holds WHERE id = ?", (hold_id,)).fetchone()
            )

        return await self._run(lambda: self._transaction(lift))

    async def save_agents(self, agents: Sequence[StoredAgent]) -> None:
        rows = [_agent_to_row(a) for a in agents]
        placeholders = ",".join("?" * len(rows[0])) if rows else ""

        def upsert(db: sqlite3.Connection) -> None:
            db.executemany(
                f"INSERT OR REPLACE INTO agents ({_AGENT_COLUMNS}) VALUES ({placeholders})", rows
            )

        if rows:
            await self._run(lambda: self._transaction(upsert))

    async def close(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(close)
        self._executor.shutdown(wait=True)
