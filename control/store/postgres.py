"""PostgreSQL store: the same contract as SQLite, for servers that share one database.

Every call is one transaction on a pooled psycopg 3 async connection. What keeps
several replicas (or several calls of one) from stepping on each other is row locks
taken in one fixed order, so that they serialise and never deadlock:

1. the ``epoch_counter`` row, first in every transaction that changes a hold: the
   epoch is allocated by ``UPDATE ... RETURNING``, so epochs follow commit order (and
   likewise the ``label_counter`` row, first in a transaction that decides labels);
2. the rows the change reads before writing (``SELECT ... FOR UPDATE``);
3. the ``audit_head`` row, last: appending audit entries moves it.

Reads that need several tables to agree (``load``, ``load_shared``, ``read_audit``)
run in one REPEATABLE READ snapshot. Whatever goes into the audit hash is stored as
TEXT and DOUBLE PRECISION, which give back exactly the strings and floats they were
given.

Replicas learn of each other's changes by ``NOTIFY``: every transaction that changes
shared state (holds, the epoch, resume requests, certificates, runbook runs,
violation evidence and its acknowledgements, operators' labels) calls ``pg_notify``
before it commits, and ``watch`` listens on a connection of its own. One replica
drives runbook runs: the one holding a session advisory lock (``try_lead``) on
another connection of its own, which dies with it.

Agent rows change too often to announce: each replica polls for the rows the others
wrote (``agents_written_since``, by the writing transaction's id) and for which
replicas still beat (``beat``, by the database's clock), and shows their agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Self, TypeVar

import psycopg
from psycopg import AsyncConnection, sql
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg.types.string import TextLoader
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from structlog import get_logger

from control.domain import Hold, HoldDraft
from control.domain.approvals import ResumeRequest, executed
from control.domain.audit import GENESIS_HASH, AuditEntry, AuditRecord, ChainHead
from control.domain.identity import CertificateRecord, EnrollToken, check_enroll_token
from control.domain.rollout import Run
from control.errors import InvalidInput, PermissionDenied, StoreError, StoreUnavailable, one_line
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

T = TypeVar("T")
Connection = AsyncConnection[DictRow]

DEFAULT_POOL_SIZE = 4
# Used unless the DSN sets its own connect_timeout.
CONNECT_TIMEOUT_SECONDS = 5
# Find a silently dead network (a partition, a failover without RST) in about 25 s
# when idle and 30 s with a query in flight, instead of the kernel's two hours.
TCP_TIMEOUTS = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
# How long a call waits for a pooled connection before it fails.
CHECKOUT_TIMEOUT_SECONDS = 10.0
# A replica that dies inside a transaction must not hold the epoch row for hours.
IDLE_IN_TRANSACTION_TIMEOUT = "30s"
# Key of the advisory lock that serialises migrations of replicas starting together.
MIGRATION_LOCK_KEY = 0x6B696C6C  # "kill"
# The lead lock: this class and a hash of the store's schema, so that deployments in
# different schemas of one database each have a leader. (Two-key advisory locks never
# collide with the one-key migration lock.)
LEAD_LOCK_CLASS = 0x6C656164  # "lead"
# try_lead answers from its last check for this long: the runner asks every tick.
LEAD_CHECK_SECONDS = 1.0
# A check that takes longer than this (a partition) gives up the lead.
LEAD_CHECK_TIMEOUT_SECONDS = 5.0
# Every transaction that changes shared state notifies this channel on commit.
SHARED_CHANNEL = "killswitch_shared"
# watch reconnects after a jittered delay that doubles from the first to the last,
# and starts again from the first once a connection has lasted WATCH_STABLE_SECONDS.
WATCH_RETRY_FIRST_SECONDS = 0.25
WATCH_RETRY_MAX_SECONDS = 15.0
WATCH_STABLE_SECONDS = 30.0

log = get_logger("killswitch.store")

# Each entry upgrades the schema by one version; never edit a released entry.
# Version 1 holds what SQLite reached in three: keep the two schemas' content alike.
MIGRATIONS: list[str] = [
    f"""
    CREATE TABLE epoch_counter (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        epoch BIGINT NOT NULL
    );
    INSERT INTO epoch_counter (id, epoch) VALUES (1, 0);
    -- The counters: a row whose column (the trigger's argument) never goes down.
    CREATE FUNCTION forward_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP <> 'UPDATE'
            OR (to_jsonb(NEW) ->> TG_ARGV[0])::bigint < (to_jsonb(OLD) ->> TG_ARGV[0])::bigint
        THEN
            RAISE EXCEPTION '% only moves forward', TG_TABLE_NAME;
        END IF;
        RETURN NEW;
    END $$;
    CREATE TRIGGER epoch_counter_forward_only BEFORE UPDATE OR DELETE ON epoch_counter
        FOR EACH ROW EXECUTE FUNCTION forward_only('epoch');
    CREATE TRIGGER epoch_counter_no_truncate BEFORE TRUNCATE ON epoch_counter
        FOR EACH STATEMENT EXECUTE FUNCTION forward_only('epoch');

    -- scope and labels are JSONB: validated label and id strings, worth querying.
    -- Documents with floats or agent-supplied strings are TEXT: written and read
    -- back byte for byte by control.store.codec.
    CREATE TABLE holds (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        scope JSONB NOT NULL,
        reason TEXT NOT NULL,
        ticket TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        created_epoch BIGINT NOT NULL,
        lifted_at DOUBLE PRECISION,
        lifted_by TEXT NOT NULL DEFAULT '',
        lifted_epoch BIGINT NOT NULL DEFAULT 0,
        keep_spool BOOLEAN NOT NULL DEFAULT FALSE,
        release TEXT
    );
    CREATE TABLE agents (
        agent_id TEXT PRIMARY KEY,
        labels JSONB NOT NULL,
        desired_mode TEXT NOT NULL,
        desired_hold_ids TEXT NOT NULL,
        desired_reason TEXT NOT NULL,
        desired_epoch BIGINT NOT NULL,
        desired_since DOUBLE PRECISION NOT NULL,
        desired_purge_spool BOOLEAN NOT NULL,
        expected_since DOUBLE PRECISION,
        first_seen DOUBLE PRECISION,
        last_seen DOUBLE PRECISION,
        connected_at DOUBLE PRECISION,
        disconnected_at DOUBLE PRECISION,
        directive_sent_at DOUBLE PRECISION,
        directive_sent_epoch BIGINT NOT NULL,
        acked_epoch BIGINT NOT NULL,
        acked_mode TEXT,
        acked_at DOUBLE PRECISION,
        nack_epoch BIGINT NOT NULL,
        nack_reason TEXT NOT NULL,
        nack_at DOUBLE PRECISION,
        channels TEXT NOT NULL,
        report TEXT NOT NULL,
        ack_report TEXT NOT NULL,
        purged_events BIGINT NOT NULL,
        quarantined_events BIGINT NOT NULL,
        verified_at DOUBLE PRECISION,
        lease_expires_at DOUBLE PRECISION,
        uploads_refused BIGINT NOT NULL,
        violation TEXT NOT NULL,
        violation_at DOUBLE PRECISION
    );

    CREATE TABLE audit_log (
        seq BIGINT PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
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
    CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'audit_log is append-only: entries cannot be %',
            CASE TG_OP WHEN 'UPDATE' THEN 'changed' WHEN 'DELETE' THEN 'deleted'
            ELSE 'truncated' END;
    END $$;
    CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
        FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
    CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
        FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
    CREATE TABLE audit_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq BIGINT NOT NULL,
        hash TEXT NOT NULL
    );
    INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '{GENESIS_HASH}');
    CREATE TRIGGER audit_head_forward_only BEFORE UPDATE OR DELETE ON audit_head
        FOR EACH ROW EXECUTE FUNCTION forward_only('seq');
    CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON audit_head
        FOR EACH STATEMENT EXECUTE FUNCTION forward_only('seq');

    CREATE TABLE resume_requests (
        id TEXT PRIMARY KEY,
        hold_id TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        reason TEXT NOT NULL,
        ticket TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        for_runbook BOOLEAN NOT NULL,
        state TEXT NOT NULL,
        revision BIGINT NOT NULL,
        approvals TEXT NOT NULL,
        decided_by TEXT NOT NULL,
        decided_at DOUBLE PRECISION,
        decision_note TEXT NOT NULL,
        lifted_epoch BIGINT NOT NULL
    );
    CREATE TABLE enroll_tokens (
        id TEXT PRIMARY KEY,
        secret_sha256 TEXT NOT NULL,
        uses_left BIGINT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        created_by TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        subject TEXT NOT NULL,
        role TEXT NOT NULL,
        not_after DOUBLE PRECISION NOT NULL,
        issued_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION
    );
    CREATE INDEX certificates_by_subject ON certificates (subject);
    CREATE TABLE runbook_runs (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        run TEXT NOT NULL
    );
    """,
    # Version 2: what another replica needs to show an agent it does not serve.
    """
    ALTER TABLE agents
        ADD COLUMN connected BOOLEAN NOT NULL DEFAULT FALSE,
        ADD COLUMN acked_since_connect BOOLEAN NOT NULL DEFAULT FALSE,
        ADD COLUMN nacked_since_connect BOOLEAN NOT NULL DEFAULT FALSE,
        ADD COLUMN written_by TEXT NOT NULL DEFAULT '',
        ADD COLUMN written_at DOUBLE PRECISION,
        -- The writing transaction: readers ask for rows newer than a snapshot horizon.
        ADD COLUMN written_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
    CREATE INDEX agents_by_written_xid ON agents (written_xid);
    CREATE TABLE replicas (
        replica_id TEXT PRIMARY KEY,
        started_at DOUBLE PRECISION NOT NULL,
        beat_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE violation_acks (
        agent_id TEXT PRIMARY KEY,
        violation_at DOUBLE PRECISION NOT NULL
    );
    """,
    # Version 3: dashboard sessions any replica can check.
    """
    CREATE TABLE dashboard_sessions (
        key TEXT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        role TEXT NOT NULL,
        serial TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (key, kind)
    );
    """,
    # Violations are durable.
    # Version 4: evidence any replica appends, and the stop a later pause ack keeps.
    """
    ALTER TABLE agents ADD COLUMN stopped_at DOUBLE PRECISION;
    CREATE TABLE violation_evidence (
        id TEXT PRIMARY KEY,
        agent_id TEXT NOT NULL,
        flagged_at DOUBLE PRECISION NOT NULL,
        evidence TEXT NOT NULL,
        detected_by TEXT NOT NULL,
        epoch BIGINT NOT NULL
    );
    CREATE INDEX violation_evidence_by_agent ON violation_evidence (agent_id, flagged_at);
    CREATE FUNCTION violation_evidence_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'violation_evidence is append-only: entries cannot be %',
            CASE TG_OP WHEN 'UPDATE' THEN 'changed' WHEN 'DELETE' THEN 'deleted'
            ELSE 'truncated' END;
    END $$;
    CREATE TRIGGER violation_evidence_no_change BEFORE UPDATE OR DELETE ON violation_evidence
        FOR EACH ROW EXECUTE FUNCTION violation_evidence_append_only();
    CREATE TRIGGER violation_evidence_no_truncate BEFORE TRUNCATE ON violation_evidence
        FOR EACH STATEMENT EXECUTE FUNCTION violation_evidence_append_only();
    """,
    # History compaction.
    # Version 5: finished history is marked archived; hot reads walk a partial index of the rest.
    """
    ALTER TABLE holds ADD COLUMN archived_at DOUBLE PRECISION;
    ALTER TABLE resume_requests ADD COLUMN archived_at DOUBLE PRECISION;
    ALTER TABLE runbook_runs
        ADD COLUMN ended_at DOUBLE PRECISION,
        ADD COLUMN archived_at DOUBLE PRECISION;
    UPDATE runbook_runs SET ended_at = (run::jsonb ->> 'ended_at')::double precision;
    CREATE INDEX holds_hot ON holds (created_epoch, id) WHERE archived_at IS NULL;
    CREATE INDEX resume_requests_hot ON resume_requests (created_at, id)
        WHERE archived_at IS NULL;
    CREATE INDEX runbook_runs_hot ON runbook_runs (started_at, id) WHERE archived_at IS NULL;
    """,
    # Server-decided labels.
    # Version 6: what each agent reported of itself (NULL: never connected), kept apart
    # from the labels the server decides; and the labels a join token pins.
    """
    ALTER TABLE agents ADD COLUMN reported_labels TEXT;
    ALTER TABLE enroll_tokens ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
    """,
    # Decided labels are shared state.
    # Version 7: the labels operators decided, apart from the agents' rows (which only
    # the replica serving an agent writes), under a version every label change takes
    # from one counter row: its lock makes versions commit in order, so a replica that
    # reads what is newer than the last version it saw never skips one.
    """
    CREATE TABLE label_counter (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version BIGINT NOT NULL
    );
    INSERT INTO label_counter (id, version) VALUES (1, 0);
    CREATE TRIGGER label_counter_forward_only BEFORE UPDATE OR DELETE ON label_counter
        FOR EACH ROW EXECUTE FUNCTION forward_only('version');
    CREATE TRIGGER label_counter_no_truncate BEFORE TRUNCATE ON label_counter
        FOR EACH STATEMENT EXECUTE FUNCTION forward_only('version');
    CREATE TABLE agent_labels (
        agent_id TEXT PRIMARY KEY,
        labels JSONB NOT NULL,
        set_by TEXT NOT NULL,
        set_at DOUBLE PRECISION NOT NULL,
        version BIGINT NOT NULL
    );
    CREATE INDEX agent_labels_by_version ON agent_labels (version);
    """,
    # ---- issue 14 (ingest gateway): renumber at merge if another migration lands first.
    # Version 11: what the ingest gateway reported landing in its sink, per agent: events
    # dated after the agent's newest stop (0 expected), and the newest capture time.
    """
    ALTER TABLE agents ADD COLUMN events_accepted_after_pause BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN last_accepted_event_at DOUBLE PRECISION;
    """,
    # ---- issue 15 (drill requests): before the claim, whose tests re-run what follows it.
    # Version 12: a drill request has no hold; it approves one drill runbook's exact text.
    """
    ALTER TABLE resume_requests ADD COLUMN drill_runbook TEXT NOT NULL DEFAULT '';
    ALTER TABLE resume_requests ADD COLUMN drill_sha256 TEXT NOT NULL DEFAULT '';
    """,
    # ---- issue 15: one valid certificate per agent id (control.store.enrolment).
    enrolment.CLAIM_MIGRATION,
    # ---- issue 15: a laptop's opt-out is one hold (control.domain.holds.opt_out_hold_id);
    # the lifted ones of earlier cycles, each its own row, are archived now.
    """
    UPDATE holds SET archived_at = extract(epoch FROM now())
    WHERE kind = 'opt_out' AND lifted_at IS NOT NULL AND archived_at IS NULL;
    """,
    # ---- issue 16: webhook deliveries waiting, durable across restarts (control.store.outbox).
    outbox.POSTGRES_MIGRATION,
]


def _insert(table: str, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})"


def _replace_on_conflict(columns: Sequence[str]) -> str:
    """Insert or replace by the first column, the primary key."""
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns[1:])
    return f"ON CONFLICT ({columns[0]}) DO UPDATE SET {updates}"


def _upsert(table: str, columns: Sequence[str]) -> str:
    return f"{_insert(table, columns)} {_replace_on_conflict(columns)}"


_SELECT_HOLDS = codec.select_sql("holds", codec.HOLD_COLUMNS)
_INSERT_HOLD = _insert("holds", codec.HOLD_COLUMNS)
_REACTIVATE_HOLD = codec.reactivating(_INSERT_HOLD)
_SELECT_AGENTS = codec.SELECT_AGENTS
_SELECT_AUDIT = codec.select_sql("audit_log", codec.AUDIT_COLUMNS)
_INSERT_AUDIT = _insert("audit_log", codec.AUDIT_COLUMNS)
_SELECT_RESUMES = codec.select_sql("resume_requests", codec.RESUME_COLUMNS)
_UPSERT_RESUME = _upsert("resume_requests", codec.RESUME_COLUMNS)
_SELECT_TOKENS = codec.select_sql("enroll_tokens", codec.TOKEN_COLUMNS)
_INSERT_TOKEN = _insert("enroll_tokens", codec.TOKEN_COLUMNS)
_SELECT_CERTIFICATES = codec.select_sql("certificates", codec.CERTIFICATE_COLUMNS)
_INSERT_CERTIFICATE = _insert("certificates", codec.CERTIFICATE_COLUMNS)
# Under READ COMMITTED two enrolments may both find no valid certificate: the claim's
# unique index lets exactly one insert (the other waits for it, then inserts nothing).
_RELEASE_CLAIM, _VALID_CERTIFICATE, _INSERT_CLAIMING_CERTIFICATE = enrolment.statements("%s")
_UPSERT_RUN = _upsert("runbook_runs", codec.RUN_COLUMNS)
_INSERT_RUN = _insert("runbook_runs", codec.RUN_COLUMNS)
_TRY_LEAD = "SELECT pg_try_advisory_lock(%s::integer, hashtext(current_schema())) AS locked"
# A batch goes through COPY into a staging table, then one upsert statement: see
# save_agents for the measurement behind it. The table is created once per session and
# emptied by every commit: the plane flushes four times a second, and a table created
# and dropped per batch would churn the system catalogs as often.
# Its defaults fill written_xid with the writing transaction's id.
_CREATE_AGENT_BATCH = (
    "CREATE TEMP TABLE agent_batch (LIKE agents INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
_AGENT_LIST = ", ".join(codec.AGENT_COLUMNS)
_COPY_AGENT_BATCH = f"COPY agent_batch ({_AGENT_LIST}) FROM STDIN"
# A row never goes back to an older stream: once an agent has connected to another
# replica (a later connected_at), the replica it left cannot overwrite that row with
# its disconnect. A disconnected row may be updated by any replica (desired state).
_UPSERT_AGENT_BATCH = (
    f"INSERT INTO agents ({_AGENT_LIST}, written_xid)"
    f" SELECT {_AGENT_LIST}, written_xid FROM agent_batch"
    f" {_replace_on_conflict((*codec.AGENT_COLUMNS, 'written_xid'))}"
    " WHERE agents.connected_at IS NULL"
    " OR EXCLUDED.connected_at > agents.connected_at"
    " OR (EXCLUDED.connected_at = agents.connected_at"
    "     AND (EXCLUDED.written_by = agents.written_by OR NOT agents.connected))"
)
# Every transaction older than the horizon has ended: rows written later have a
# written_xid at or above it, whatever order the writers commit in.
_SNAPSHOT_HORIZON = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS horizon"
_DB_NOW = "extract(epoch FROM clock_timestamp())"
_BEAT = (
    "INSERT INTO replicas (replica_id, started_at, beat_at)"
    f" VALUES (%(replica)s, {_DB_NOW}, {_DB_NOW})"
    " ON CONFLICT (replica_id) DO UPDATE SET beat_at = EXCLUDED.beat_at"
)
# Replicas gone for a day are forgotten; their agents' rows read as disconnected.
_FORGET_REPLICAS = f"DELETE FROM replicas WHERE beat_at < {_DB_NOW} - 86400"
_BEAT_AGES = f"SELECT replica_id, {_DB_NOW} - beat_at AS age FROM replicas"
_UPSERT_VIOLATION_ACK = _upsert("violation_acks", codec.VIOLATION_ACK_COLUMNS)
_INSERT_DASHBOARD_SESSION = _insert("dashboard_sessions", codec.DASHBOARD_SESSION_COLUMNS)
_DASHBOARD_SESSION_LIST = ", ".join(codec.DASHBOARD_SESSION_COLUMNS)
_INSERT_EVIDENCE = (
    f"{_insert('violation_evidence', codec.EVIDENCE_COLUMNS)} ON CONFLICT (id) DO NOTHING"
    " RETURNING 1"
)
_NEXT_LABEL_VERSION = "UPDATE label_counter SET version = version + 1 RETURNING version"
_UPSERT_DECIDED_LABELS = codec.upsert_decided_labels("%s")
_SELECT_DECIDED_LABELS = f"{codec.SELECT_DECIDED_LABELS} WHERE version > %s ORDER BY version"
_HOT_HOLDS, _HOT_RESUMES, _HOT_RUNS = history.hot_reads("created_epoch, id")
# Rows another compactor is archiving are skipped, never waited for: compaction takes
# no other lock, so it can neither deadlock with a write nor hold one up for long.
_ARCHIVE_BATCHES = history.archive_batches(lambda n: f"%({n})s", " FOR UPDATE SKIP LOCKED")
_ARCHIVED_HOLD, _ARCHIVED_RESUME, _ARCHIVED_RUN = history.archived_lookups(lambda n: f"%({n})s")


def _where(dsn: str) -> str:
    """host:port and database of a DSN, for messages: never the DSN, which may hold a password."""
    params = conninfo_to_dict(dsn)
    host = params.get("host") or os.environ.get("PGHOST") or "localhost"
    port = params.get("port") or os.environ.get("PGPORT") or "5432"
    dbname = params.get("dbname") or os.environ.get("PGDATABASE") or "(default database)"
    return f"{host}:{port}/{dbname}"


def _reason(exc: psycopg.Error) -> str:
    """libpq's one-line why, without its preamble and hints."""
    if exc.diag.message_primary:
        return one_line(RuntimeError(exc.diag.message_primary))
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    reason = first_line.rpartition(" failed: ")[2].removeprefix("FATAL:")
    return one_line(RuntimeError(reason))


def _without_nul(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """PostgreSQL text cannot hold U+0000, which an agent may send (a nack reason):
    one agent must not make the whole batch unwritable."""
    return tuple(v.replace("\x00", "\ufffd") if isinstance(v, str) else v for v in row)


_ENQUEUE = outbox.for_postgres(outbox.ENQUEUE)
_DELIVERED = outbox.for_postgres(outbox.DELIVERED)
_RETRY = outbox.for_postgres(outbox.RETRY)
_PRUNE = outbox.for_postgres(outbox.PRUNE)


async def _enqueue(conn: Connection, messages: Sequence[OutboxMessage]) -> None:
    if messages:
        async with conn.cursor() as cur:
            await cur.executemany(_ENQUEUE, [m.params() for m in messages])


async def _execute(conn: Connection, query: str, params: dict[str, Any]) -> None:
    await conn.execute(query, params)


async def _fetch_one(conn: Connection, query: str, params: Sequence[Any] = ()) -> DictRow | None:
    cur = await conn.execute(query, params)
    return await cur.fetchone()


async def _fetch_all(conn: Connection, query: str, params: Sequence[Any] = ()) -> list[DictRow]:
    cur = await conn.execute(query, params)
    return await cur.fetchall()


async def _announce(conn: Connection, epoch: int = 0) -> None:
    """Tell every watching replica, once this transaction commits, that shared state
    changed (the payload: the epoch it allocated, if any)."""
    await conn.execute("SELECT pg_notify(%s, %s)", (SHARED_CHANNEL, str(epoch) if epoch else ""))


async def _read_shared(conn: Connection) -> SharedState:
    """In the caller's snapshot."""
    epoch_row = await _fetch_one(conn, "SELECT epoch FROM epoch_counter")
    holds = await _fetch_all(conn, _HOT_HOLDS)
    requests = await _fetch_all(conn, _HOT_RESUMES)
    revoked = await _fetch_all(conn, codec.SELECT_REVOKED)
    runs = await _fetch_all(conn, _HOT_RUNS)
    acks = await _fetch_all(conn, codec.SELECT_VIOLATION_ACKS)
    evidence = await _fetch_all(conn, codec.SELECT_UNACKNOWLEDGED_EVIDENCE)
    return SharedState(
        epoch=0 if epoch_row is None else int(epoch_row["epoch"]),
        holds=[codec.hold_from_row(r) for r in holds],
        resume_requests=[codec.resume_from_row(r) for r in requests],
        revoked={r["serial"]: r["subject"] for r in revoked},
        runs=[codec.run_from_json(r["run"]) for r in runs],
        violation_acks={r["agent_id"]: r["violation_at"] for r in acks},
        violations=[codec.evidence_from_row(r) for r in evidence],
    )


async def _locked_request(conn: Connection, request_id: str) -> DictRow | None:
    return await _fetch_one(conn, f"{_SELECT_RESUMES} WHERE id = %s FOR UPDATE", (request_id,))


async def _close_quietly(conn: Connection) -> None:
    with contextlib.suppress(Exception):
        await conn.close()


async def _next_epoch(conn: Connection) -> int:
    row = await _fetch_one(conn, "UPDATE epoch_counter SET epoch = epoch + 1 RETURNING epoch")
    assert row is not None, "migration 1 inserts the epoch_counter row"
    return int(row["epoch"])


async def _insert_new(conn: Connection, query: str, row: tuple[Any, ...], what: str) -> None:
    """Insert a row whose key must be new."""
    if await _fetch_one(conn, f"{query} ON CONFLICT DO NOTHING RETURNING 1", row) is None:
        raise codec.already_exists(what)


async def _active_hold(conn: Connection, hold_id: str) -> Hold:
    row = await _fetch_one(conn, f"{_SELECT_HOLDS} WHERE id = %s FOR UPDATE", (hold_id,))
    return codec.active_hold(row, hold_id)


async def _lift(conn: Connection, hold_id: str, lifted_by: str, at: float, epoch: int) -> Hold:
    """The caller allocated ``epoch`` first: the epoch row is always the first lock taken."""
    hold = await _active_hold(conn, hold_id)
    await conn.execute(
        "UPDATE holds SET lifted_at = %s, lifted_by = %s, lifted_epoch = %s WHERE id = %s",
        (at, lifted_by, epoch, hold_id),
    )
    return codec.lifted(hold, lifted_by, at, epoch)


async def _read_head(conn: Connection, *, for_update: bool = False) -> ChainHead:
    lock = " FOR UPDATE" if for_update else ""
    row = await _fetch_one(conn, f"SELECT seq, hash FROM audit_head WHERE id = 1{lock}")
    assert row is not None, "migration 1 inserts the audit_head row"
    return ChainHead(row["seq"], row["hash"])


async def _append_audit(conn: Connection, records: Sequence[AuditRecord]) -> list[AuditEntry]:
    """Chain ``records`` after the stored head and move the head, in the caller's transaction.

    The head row lock serialises appends of every replica: the last lock a write takes.
    """
    if not records:
        return []
    entries = codec.chain_after(await _read_head(conn, for_update=True), records)
    async with conn.cursor() as cur:
        await cur.executemany(_INSERT_AUDIT, [codec.audit_to_row(e) for e in entries])
    await conn.execute(
        "UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1",
        (entries[-1].seq, entries[-1].hash),
    )
    return entries


async def _schema_version(conn: Connection) -> int:
    row = await _fetch_one(conn, "SELECT coalesce(max(version), 0) AS version FROM schema_version")
    return 0 if row is None else int(row["version"])


async def _migrate(conn: Connection, schema: str | None, where: str) -> None:
    """Apply pending migrations one transaction each, under an advisory lock: replicas
    starting together take turns, and each applies only what is still missing."""
    while True:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            # Asked first: CREATE SCHEMA IF NOT EXISTS needs the right to create one.
            if schema is not None and not await _fetch_one(
                conn, "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)
            ):
                await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version INTEGER PRIMARY KEY,"
                " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            version = await _schema_version(conn)
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"database {where} has schema version {version}, newer than this"
                    f" server understands ({len(MIGRATIONS)}); upgrade the server"
                )
            if version == len(MIGRATIONS):
                return
            await conn.execute(MIGRATIONS[version])
            await conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version + 1,))


async def _answering(pool: AsyncConnectionPool[Connection]) -> Connection:
    """A pooled connection that answers an empty query.

    One that does not means the server restarted or failed over, so the other idle
    ones are dead too: check them all at once, rather than one per step of the pool's
    own check-on-checkout backoff (1 s, 2 s, 4 s ...), and take a fresh one.
    """
    conn = await pool.getconn()
    try:
        await conn.execute("")
    except psycopg.OperationalError:
        await pool.putconn(conn)
        # Shielded: a check cancelled halfway (a ping's timeout) would lose the
        # connections it had taken out of the pool, and the pool would never refill.
        await asyncio.shield(pool.check())
        return await pool.getconn()
    except BaseException:
        await pool.putconn(conn)
        raise
    return conn


class PostgresStore:
    """The ``Store`` contract on a PostgreSQL database, shareable by several servers."""

    sole_writer = False

    def __init__(self, dsn: str, schema: str | None, pool_size: int) -> None:
        self._dsn = dsn
        self._schema = schema
        self._where = _where(dsn)
        self._pool: AsyncConnectionPool[Connection] | None = None
        self._pool_size = pool_size
        self._closed = False
        # Connections of watch(), closed by close().
        self._listeners: set[Connection] = set()
        # try_lead's connection, which holds the lead lock while this store leads.
        self._lead_conn: Connection | None = None
        self._leading = False
        self._lead_checked_at = -LEAD_CHECK_SECONDS
        self._lead_lock = asyncio.Lock()
        self._lead_failing = False
        self._failed: Callable[[StoreUnavailable], None] = lambda error: None
        self.outbox_feed: OutboxFeed | None = None

    @classmethod
    async def open(
        cls, dsn: str, *, schema: str | None = None, pool_size: int = DEFAULT_POOL_SIZE
    ) -> Self:
        """Connect, migrate, then open the pool. ``schema`` (created if missing) is
        put first on every connection's search_path."""
        if pool_size < 1:
            raise InvalidInput(f"pool_size must be at least 1, got {pool_size}")
        try:
            store = cls(dsn, schema, pool_size)
        except psycopg.ProgrammingError as exc:
            raise StoreError(f"invalid PostgreSQL DSN: {_reason(exc)}") from None
        try:
            conn = await Connection.connect(dsn, **store._connect_kwargs())
        except psycopg.OperationalError as exc:
            raise StoreError(
                f"cannot connect to PostgreSQL at {store._where}: {_reason(exc)}"
            ) from None
        try:
            async with conn:
                await store._configure(conn)
                await _migrate(conn, schema, store._where)
            await store._open_pool()
        except psycopg.Error as exc:
            await store.close()
            raise StoreError(f"cannot open PostgreSQL at {store._where}: {_reason(exc)}") from None
        except BaseException:
            await store.close()
            raise
        return store

    def _connect_kwargs(self) -> dict[str, Any]:
        """Defaults for what the DSN leaves out: bounded connects and TCP timeouts."""
        given = conninfo_to_dict(self._dsn)
        defaults = {"connect_timeout": CONNECT_TIMEOUT_SECONDS, **TCP_TIMEOUTS}
        return {
            "autocommit": True,
            "row_factory": dict_row,
            **{k: v for k, v in defaults.items() if k not in given},
        }

    async def _configure(self, conn: Connection) -> None:
        """Every new connection: this store's schema first, and commits that are durable
        (``synchronous_commit=off`` would lose an acknowledged pause in a crash)."""
        # JSONB comes back as its text, which control.store.codec decodes.
        conn.adapters.register_loader("jsonb", TextLoader)
        search_path = sql.Identifier(self._schema).as_string(conn) if self._schema else None
        await conn.execute(
            "SELECT set_config('search_path', coalesce(%s, current_setting('search_path')), false),"
            " set_config('synchronous_commit', CASE current_setting('synchronous_commit')"
            "   WHEN 'off' THEN 'on' ELSE current_setting('synchronous_commit') END, false),"
            " set_config('idle_in_transaction_session_timeout', %s, false)",
            (search_path, IDLE_IN_TRANSACTION_TIMEOUT),
        )

    async def _dedicated(self) -> Connection:
        """A connection of its own, outside the pool: for LISTEN and the lead lock."""
        conn = await Connection.connect(self._dsn, **self._connect_kwargs())
        try:
            await self._configure(conn)
        except BaseException:
            await _close_quietly(conn)
            raise
        return conn

    async def _configure_pooled(self, conn: Connection) -> None:
        """Connections of the pool, opened once the schema is migrated."""
        await self._configure(conn)
        # A read-only database (a hot standby, default_transaction_read_only): keep the
        # connection, so writes fail saying so rather than finding no connection.
        # _connection closes it at its first refused write; its replacement makes the
        # staging table once the database takes writes again.
        with contextlib.suppress(pg_errors.ReadOnlySqlTransaction):
            await conn.execute(_CREATE_AGENT_BATCH)

    async def _open_pool(self) -> None:
        pool = AsyncConnectionPool(
            self._dsn,
            connection_class=Connection,
            kwargs=self._connect_kwargs(),
            min_size=self._pool_size,
            max_size=self._pool_size,
            open=False,
            configure=self._configure_pooled,
            timeout=CHECKOUT_TIMEOUT_SECONDS,
            name="killswitch",
        )
        self._pool = pool
        await pool.open(wait=True, timeout=CONNECT_TIMEOUT_SECONDS * 2)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        """A pooled connection; every database failure becomes a one-line StoreError."""
        if self._pool is None:
            raise StoreError("store is closed")
        pool = self._pool
        try:
            conn = await _answering(pool)
            try:
                yield conn
            except (pg_errors.ReadOnlySqlTransaction, pg_errors.UndefinedTable):
                await conn.close()  # see _configure_pooled: the pool opens a new one
                raise
            finally:
                await pool.putconn(conn)
        except PoolTimeout:
            raise StoreError(
                f"PostgreSQL at {self._where} unavailable: no connection within"
                f" {CHECKOUT_TIMEOUT_SECONDS:g} s"
            ) from None
        except psycopg.Error as exc:
            cause = causes.from_postgres(exc)
            if cause is None:
                raise StoreError(f"PostgreSQL at {self._where} failed: {_reason(exc)}") from exc
            error = causes.unavailable(cause)
            self._failed(error)
            raise error from exc

    def report_failures_to(self, failed: Callable[[StoreUnavailable], None]) -> None:
        self._failed = failed

    @asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[Connection]:
        """Several reads that must agree with each other, as of one moment."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield conn

    async def _write(
        self, records: Sequence[AuditRecord], change: Callable[[Connection], Awaitable[T]]
    ) -> T:
        """Apply ``change`` and append its audit entries in one transaction, then log them."""
        async with self._connection() as conn, conn.transaction():
            result = await change(conn)
            entries = await _append_audit(conn, records)
            if self.outbox_feed is not None and entries:
                await _enqueue(conn, self.outbox_feed(entries))
        codec.log_appended(entries)
        return result

    async def load(self) -> LoadedState:
        async with self._snapshot() as conn:
            shared = await _read_shared(conn)
            agents = await _fetch_all(conn, f"{_SELECT_AGENTS} ORDER BY agent_id")
        return LoadedState(shared, [codec.agent_from_row(r) for r in agents])

    async def load_shared(self) -> SharedState:
        async with self._snapshot() as conn:
            return await _read_shared(conn)

    async def archive_history(self, before: float, now: float, limit: int) -> ArchivedCounts:
        """Announced to nobody: each replica forgets archived history by itself (its
        resync and its own compaction)."""
        params = {"before": before, "now": now, "limit": limit}

        async def archive(conn: Connection) -> ArchivedCounts:
            counts = [(await conn.execute(sql, params)).rowcount for sql in _ARCHIVE_BATCHES]
            return ArchivedCounts(*counts)

        return await self._write((), archive)

    async def archived_hold(self, hold_id: str) -> Hold | None:
        row = await self._read_one(_ARCHIVED_HOLD, hold_id)
        return None if row is None else codec.hold_from_row(row)

    async def archived_request(self, request_id: str) -> ResumeRequest | None:
        row = await self._read_one(_ARCHIVED_RESUME, request_id)
        return None if row is None else codec.resume_from_row(row)

    async def archived_run(self, run_id: str) -> Run | None:
        row = await self._read_one(_ARCHIVED_RUN, run_id)
        return None if row is None else codec.run_from_json(row["run"])

    async def _read_one(self, query: str, item_id: str) -> DictRow | None:
        async with self._connection() as conn:
            cur = await conn.execute(query, {"id": item_id})
            return await cur.fetchone()

    async def load_agent(self, agent_id: str) -> StoredAgent | None:
        async with self._connection() as conn:
            row = await _fetch_one(conn, f"{_SELECT_AGENTS} WHERE agent_id = %s", (agent_id,))
        return None if row is None else codec.agent_from_row(row)

    async def agents_written_since(self, cursor: str, replica_id: str) -> AgentChanges:
        """One snapshot: its horizon first, then the rows at or above the last one."""
        async with self._snapshot() as conn:
            horizon = await _fetch_one(conn, _SNAPSHOT_HORIZON)
            rows = await _fetch_all(
                conn,
                f"{_SELECT_AGENTS} WHERE written_xid >= %s::xid8 AND written_by <> %s",
                (cursor or "0", replica_id),
            )
            beats = await _fetch_all(conn, _BEAT_AGES)
        assert horizon is not None
        return AgentChanges(
            [codec.agent_from_row(r) for r in rows],
            {r["replica_id"]: float(r["age"]) for r in beats},
            horizon["horizon"],
        )

    async def acknowledge_violation(
        self, agent_id: str, violation_at: float, audit: AuditRecord
    ) -> None:
        async def record(conn: Connection) -> None:
            await conn.execute(_UPSERT_VIOLATION_ACK, (agent_id, violation_at))
            await _announce(conn)

        await self._write([audit], record)

    async def record_violations(
        self, found: Sequence[tuple[ViolationEvidence, AuditRecord]]
    ) -> None:
        # Filled by the change, before _write appends it: only new evidence is audited.
        audit: list[AuditRecord] = []

        async def append_new(conn: Connection) -> None:
            for evidence, record in found:
                row = _without_nul(codec.evidence_to_row(evidence))
                if await _fetch_one(conn, _INSERT_EVIDENCE, row) is not None:
                    audit.append(record)
            if audit:
                await _announce(conn)

        if found:
            await self._write(audit, append_new)

    async def create_hold(self, draft: HoldDraft, audit: AuditRecord) -> Hold:
        async def insert(conn: Connection) -> Hold:
            hold = Hold.committed(draft, await _next_epoch(conn))
            await _insert_new(conn, _INSERT_HOLD, codec.hold_to_row(hold), f"hold {hold.id!r}")
            await _announce(conn, hold.created_epoch)
            return hold

        return await self._write([audit], insert)

    async def reactivate_hold(self, draft: HoldDraft, audit: AuditRecord) -> Hold:
        async def upsert(conn: Connection) -> Hold:
            hold = Hold.committed(draft, await _next_epoch(conn))
            if await _fetch_one(conn, _REACTIVATE_HOLD, codec.hold_to_row(hold)) is None:
                raise codec.still_active(hold.id)
            await _announce(conn, hold.created_epoch)
            return hold

        return await self._write([audit], upsert)

    async def lift_hold(
        self, hold_id: str, lifted_by: str, lifted_at: float, audit: AuditRecord
    ) -> Hold:
        async def lift(conn: Connection) -> Hold:
            epoch = await _next_epoch(conn)
            hold = await _lift(conn, hold_id, lifted_by, lifted_at, epoch)
            await _announce(conn, epoch)
            return hold

        return await self._write([audit], lift)

    async def save_agents(
        self,
        agents: Sequence[StoredAgent],
        audit: Sequence[AuditRecord] = (),
        labels: Sequence[DecidedLabels] = (),
    ) -> None:
        """COPY into a staging table, then one INSERT ... ON CONFLICT. Upserting 10,000
        agents on a local server: 70,000-85,000 rows/s, where a pipelined executemany
        does about 40,000 and one upsert over unnest() arrays 15,000. For ten rows all
        three take 2-4 ms.

        The last row of an agent wins, as with one upsert after another; rows go in
        agent_id order, so two batches lock shared rows in the same order. Decided
        labels take the label counter's row first (as a hold change takes the epoch's).
        """
        latest = {agent.agent_id: agent for agent in agents}
        rows = [_without_nul(codec.agent_to_row(latest[key])) for key in sorted(latest)]
        decided = sorted(labels, key=lambda d: d.agent_id)

        async def upsert(conn: Connection) -> None:
            if decided:
                counter = await _fetch_one(conn, _NEXT_LABEL_VERSION)
                assert counter is not None
                async with conn.cursor() as cur:
                    await cur.executemany(
                        _UPSERT_DECIDED_LABELS,
                        [codec.decided_labels_to_row(d, counter["version"]) for d in decided],
                    )
                await _announce(conn)
            if not rows:
                return
            async with conn.cursor() as cur, cur.copy(_COPY_AGENT_BATCH) as copy:
                for row in rows:
                    await copy.write_row(row)
            await conn.execute(_UPSERT_AGENT_BATCH)

        if rows or audit or decided:
            await self._write(audit, upsert)

    async def labels_decided_since(self, version: int) -> list[DecidedLabels]:
        async with self._connection() as conn:
            rows = await _fetch_all(conn, _SELECT_DECIDED_LABELS, (version,))
        return [codec.decided_labels_from_row(r) for r in rows]

    async def append_audit(self, records: Sequence[AuditRecord]) -> None:
        if records:
            await self._write(records, lambda conn: _nothing())

    async def enqueue_webhooks(self, messages: Sequence[OutboxMessage]) -> None:
        await self._write((), lambda conn: _enqueue(conn, messages))

    async def claim_webhooks(self, now: float, until: float, limit: int) -> list[ClaimedMessage]:
        async def claim(conn: Connection) -> list[ClaimedMessage]:
            params = {"now": now, "until": until, "limit": limit}
            rows = await (await conn.execute(outbox.POSTGRES_CLAIM, params)).fetchall()
            return [ClaimedMessage(**row) for row in rows]

        return await self._write((), claim)

    async def webhook_delivered(self, message_id: int, now: float) -> None:
        params = {"id": message_id, "now": now}
        await self._write((), lambda conn: _execute(conn, _DELIVERED, params))

    async def webhook_retry(self, message_id: int, next_at: float, error: str) -> None:
        params = {"id": message_id, "next_at": next_at, "error": error}
        await self._write((), lambda conn: _execute(conn, _RETRY, params))

    async def prune_webhooks(self, delivered_before: float) -> int:
        async def prune(conn: Connection) -> int:
            return (await conn.execute(_PRUNE, {"before": delivered_before})).rowcount

        return await self._write((), prune)

    async def read_audit(self, after_seq: int, limit: int) -> tuple[list[AuditEntry], ChainHead]:
        if limit < 1:
            raise InvalidInput(f"limit must be at least 1, got {limit}")
        # One snapshot: a head read after the page could be ahead of it.
        async with self._snapshot() as conn:
            rows = await _fetch_all(
                conn, f"{_SELECT_AUDIT} WHERE seq > %s ORDER BY seq LIMIT %s", (after_seq, limit)
            )
            head = await _read_head(conn)
        return [codec.audit_from_row(r) for r in rows], head

    async def save_resume_request(self, request: ResumeRequest, audit: AuditRecord) -> None:
        """Refused with ``Conflict`` unless it is a new request, an edit of an open one, or
        a decision on a pending one: see ``codec.check_request_write``."""

        async def upsert(conn: Connection) -> None:
            codec.check_request_write(await _locked_request(conn, request.id), request)
            await conn.execute(_UPSERT_RESUME, codec.resume_to_row(request))
            await _announce(conn)

        await self._write([audit], upsert)

    async def execute_resume(
        self, request: ResumeRequest, lifted_at: float, audit: AuditRecord
    ) -> Hold:
        """The lift is attributed to the audit record's actor: whoever executes the resume."""

        async def lift_and_record(conn: Connection) -> Hold:
            epoch = await _next_epoch(conn)
            hold = await _lift(conn, request.hold_id, audit.actor, lifted_at, epoch)
            codec.check_request_executable(await _locked_request(conn, request.id), request)
            await conn.execute(_UPSERT_RESUME, codec.resume_to_row(executed(request, epoch)))
            await _announce(conn, epoch)
            return hold

        return await self._write([audit], lift_and_record)

    async def commit_run(self, change: RunChange, audit: Sequence[AuditRecord]) -> RunCommit:
        async def apply(conn: Connection) -> RunCommit:
            touches_holds = change.create or change.lift_hold_id or change.release
            epoch = await _next_epoch(conn) if touches_holds else 0
            # After the epoch row, as every lock: two steps of one run take turns here,
            # and the second finds the version the first stored.
            stored = await _fetch_one(
                conn, "SELECT run FROM runbook_runs WHERE id = %s FOR UPDATE", (change.run.id,)
            )
            codec.check_run_version(None if stored is None else stored["run"], change.run)
            holds: list[Hold] = []
            if change.lift_hold_id:
                holds.append(await _lift(conn, change.lift_hold_id, change.by, change.at, epoch))
            if change.create is not None:
                hold = Hold.committed(change.create, epoch)
                await _insert_new(conn, _INSERT_HOLD, codec.hold_to_row(hold), f"hold {hold.id!r}")
                holds.append(hold)
            if change.release is not None:
                hold_id, release = change.release
                hold = await _active_hold(conn, hold_id)
                await conn.execute(
                    "UPDATE holds SET release = %s WHERE id = %s",
                    (codec.release_to_json(release), hold_id),
                )
                holds.append(dataclasses.replace(hold, release=release))
            if change.executed_request is not None:
                request = change.executed_request
                codec.check_request_executable(await _locked_request(conn, request.id), request)
                await conn.execute(_UPSERT_RESUME, codec.resume_to_row(executed(request, epoch)))
            if stored is not None:
                await conn.execute(_UPSERT_RUN, codec.run_to_row(change.run))
            else:
                # A first step inserted by another writer meanwhile: no row was there to lock.
                await _insert_new(
                    conn, _INSERT_RUN, codec.run_to_row(change.run), f"run {change.run.id}"
                )
            await _announce(conn, epoch)
            return RunCommit(holds, epoch)

        return await self._write(audit, apply)

    async def create_enroll_token(self, token: EnrollToken, audit: AuditRecord) -> None:
        row = codec.token_to_row(token)

        async def insert(conn: Connection) -> None:
            await _insert_new(conn, _INSERT_TOKEN, row, f"enrolment token {token.id!r}")

        await self._write([audit], insert)

    async def enrol_agent(
        self, token_id: str, secret: str, certificate: CertificateRecord, audit: AuditRecord
    ) -> EnrollToken:
        agent_id, now = certificate.subject, certificate.issued_at
        claiming = (*codec.fields_of(certificate, codec.CERTIFICATE_COLUMNS), agent_id)

        async def enrol(conn: Connection) -> EnrollToken:
            row = await _fetch_one(conn, f"{_SELECT_TOKENS} WHERE id = %s FOR UPDATE", (token_id,))
            token = None if row is None else codec.token_from_row(row)
            reason = check_enroll_token(token, secret, now)
            if reason or token is None:
                raise PermissionDenied(reason)
            await conn.execute(_RELEASE_CLAIM, (agent_id, now))
            if valid := await _fetch_one(conn, _VALID_CERTIFICATE, (agent_id, now)):
                raise enrolment.already_enrolled(agent_id, valid["serial"])
            if await _fetch_one(conn, _INSERT_CLAIMING_CERTIFICATE, claiming) is None:
                # Another enrolment took the claim after our read: the insert waited for
                # it to commit, and this read (a new statement) sees its certificate.
                if valid := await _fetch_one(conn, _VALID_CERTIFICATE, (agent_id, now)):
                    raise enrolment.already_enrolled(agent_id, valid["serial"])
                raise codec.already_exists(f"certificate with serial {certificate.serial}")
            await conn.execute(
                "UPDATE enroll_tokens SET uses_left = uses_left - 1 WHERE id = %s", (token_id,)
            )
            await _announce(conn)
            return token

        return await self._write([audit], enrol)

    async def record_certificate(
        self, certificate: CertificateRecord, audit: AuditRecord | None
    ) -> None:
        row = codec.fields_of(certificate, codec.CERTIFICATE_COLUMNS)
        what = f"certificate with serial {certificate.serial}"

        async def insert(conn: Connection) -> None:
            await _insert_new(conn, _INSERT_CERTIFICATE, row, what)
            await _announce(conn)

        await self._write([] if audit is None else [audit], insert)

    async def revoke_certificates(
        self, subject_or_serial: str, revoked_at: float, audit: AuditRecord
    ) -> list[CertificateRecord]:
        async def revoke(conn: Connection) -> list[CertificateRecord]:
            rows = await _fetch_all(
                conn, f"{_SELECT_CERTIFICATES} WHERE serial = %s FOR UPDATE", (subject_or_serial,)
            ) or await _fetch_all(
                conn,
                f"{_SELECT_CERTIFICATES} WHERE subject = %s ORDER BY issued_at, serial FOR UPDATE",
                (subject_or_serial,),
            )
            unrevoked = codec.to_revoke(subject_or_serial, rows)
            await conn.execute(
                "UPDATE certificates SET revoked_at = %s WHERE serial = ANY(%s)",
                (revoked_at, [c.serial for c in unrevoked]),
            )
            await _announce(conn)
            return [dataclasses.replace(c, revoked_at=revoked_at) for c in unrevoked]

        return await self._write([audit], revoke)

    async def list_certificates(self) -> list[CertificateRecord]:
        async with self._connection() as conn:
            rows = await _fetch_all(conn, f"{_SELECT_CERTIFICATES} ORDER BY issued_at, serial")
        return [codec.certificate_from_row(r) for r in rows]

    async def watch(self, changed: Callable[[], None]) -> None:
        """LISTEN on a connection of its own; ``changed()`` for every notification (this
        store's own included), and once each time listening starts, for what a lost
        connection (or the time before the first) may have missed."""
        delay = WATCH_RETRY_FIRST_SECONDS
        loop = asyncio.get_running_loop()
        while not self._closed:
            listening_since: float | None = None
            conn: Connection | None = None
            try:
                conn = await self._dedicated()
                self._listeners.add(conn)
                if self._closed:
                    break
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(SHARED_CHANNEL)))
                listening_since = loop.time()
                if delay > WATCH_RETRY_FIRST_SECONDS:
                    log.info("store_watch_listening", database=self._where)
                changed()
                async for _ in conn.notifies():
                    changed()
                reason = "connection closed"
            except psycopg.Error as exc:
                reason = _reason(exc)
            finally:
                if conn is not None:
                    self._listeners.discard(conn)
                    await _close_quietly(conn)
            if self._closed:
                break
            if listening_since is not None and loop.time() - listening_since >= (
                WATCH_STABLE_SECONDS
            ):
                delay = WATCH_RETRY_FIRST_SECONDS
            pause = delay * random.uniform(0.5, 1.5)
            log.warning(
                "store_watch_lost", database=self._where, error=reason, retry_in=round(pause, 2)
            )
            await asyncio.sleep(pause)
            delay = min(delay * 2, WATCH_RETRY_MAX_SECONDS)

    async def try_lead(self) -> bool:
        """Hold the lead lock on a connection of its own. Answered from the last check
        for ``LEAD_CHECK_SECONDS``; a check is one round trip. Never raises: a database
        that does not answer means not leading."""
        async with self._lead_lock:
            if time.monotonic() - self._lead_checked_at >= LEAD_CHECK_SECONDS:
                was = self._leading
                self._leading = await self._check_lead()
                self._lead_checked_at = time.monotonic()
                if self._leading != was:
                    log.info("lead_taken" if self._leading else "lead_lost", database=self._where)
            return self._leading

    async def _check_lead(self) -> bool:
        if self._closed:
            return False
        try:
            async with asyncio.timeout(LEAD_CHECK_TIMEOUT_SECONDS):
                if self._lead_conn is None:
                    self._lead_conn = await self._dedicated()
                    self._leading = False
                if self._leading:
                    # The lock lasts as long as the session: is it still there?
                    await self._lead_conn.execute("SELECT 1")
                    return True
                row = await _fetch_one(self._lead_conn, _TRY_LEAD, (LEAD_LOCK_CLASS,))
                self._lead_failing = False
                return bool(row is not None and row["locked"])
        except (psycopg.Error, OSError, TimeoutError) as exc:
            # A broken or stuck session: drop it (the server releases its lock when it
            # notices) and try a new one next time. Logged once per outage.
            if self._lead_conn is not None or not self._lead_failing:
                error = _reason(exc) if isinstance(exc, psycopg.Error) else repr(exc)
                log.warning("lead_check_failed", database=self._where, error=error)
            self._lead_failing = True
            await self._drop_lead_connection()
            return False
        except BaseException:
            await self._drop_lead_connection()
            raise

    async def _drop_lead_connection(self) -> None:
        conn, self._lead_conn = self._lead_conn, None
        self._leading = False
        if conn is not None:
            await _close_quietly(conn)

    async def save_dashboard_session(self, session: DashboardSession, now: float) -> None:
        async def save(conn: Connection) -> None:
            await conn.execute("DELETE FROM dashboard_sessions WHERE expires_at <= %s", (now,))
            await conn.execute(_INSERT_DASHBOARD_SESSION, codec.dashboard_session_to_row(session))

        await self._write([], save)

    async def dashboard_session(self, key: str, kind: str) -> DashboardSession | None:
        async with self._connection() as conn:
            row = await _fetch_one(
                conn,
                f"SELECT {_DASHBOARD_SESSION_LIST} FROM dashboard_sessions"
                " WHERE key = %s AND kind = %s",
                (key, kind),
            )
        return None if row is None else codec.dashboard_session_from_row(row)

    async def delete_dashboard_session(self, key: str, kind: str) -> DashboardSession | None:
        async def delete(conn: Connection) -> DictRow | None:
            return await _fetch_one(
                conn,
                "DELETE FROM dashboard_sessions WHERE key = %s AND kind = %s"
                f" RETURNING {_DASHBOARD_SESSION_LIST}",
                (key, kind),
            )

        row = await self._write([], delete)
        return None if row is None else codec.dashboard_session_from_row(row)

    async def beat(self, replica_id: str) -> None:
        async with self._connection() as conn:
            await conn.execute(_BEAT, {"replica": replica_id})
            await conn.execute(_FORGET_REPLICAS)

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._listeners):
            await _close_quietly(conn)
        async with self._lead_lock:
            await self._drop_lead_connection()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


async def _nothing() -> None:
    """The change of a write that only appends audit entries."""
