"""PostgreSQL store: the same contract as SQLite, for servers that share one database.

Every call is one transaction on a pooled psycopg 3 async connection, running the
transaction script every store shares (``control.store.scripts``, which also says
the one order in which they take row locks, so that concurrent writers of several
replicas serialise and never deadlock). Reads that need several tables to agree
(``load``, ``load_shared``, ``read_audit``) run in one REPEATABLE READ snapshot.
Whatever goes into the audit hash is stored as TEXT and DOUBLE PRECISION, which give
back exactly the strings and floats they were given.

Replicas learn of each other's changes by ``NOTIFY``: every transaction that changes
shared state (holds, the epoch, resume requests, certificates, runbook runs,
violation evidence and its acknowledgements, operators' labels) calls ``pg_notify``
before it commits (``Transaction.announce``), and ``watch`` listens on a connection
of its own. One replica drives runbook runs: the one holding a session advisory lock
(``try_lead``) on another connection of its own, which dies with it.

Agent rows change too often to announce: each replica polls for the rows the others
wrote (``agents_written_since``, by the writing transaction's id) and for which
replicas still beat (``beat``, by the database's clock), and shows their agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator
from collections.abc import Callable
from collections.abc import Sequence
from contextlib import asynccontextmanager
from typing import Any
from typing import Self
from typing import TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow
from psycopg.rows import dict_row
from psycopg.types.string import TextLoader
from psycopg_pool import AsyncConnectionPool
from psycopg_pool import PoolTimeout
from structlog import get_logger

from control.errors import InvalidInput
from control.errors import StoreError
from control.errors import StoreUnavailable
from control.errors import one_line
from control.store import AgentChanges
from control.store import ViolationEvidence
from control.store import causes
from control.store import codec
from control.store import outbox
from control.store.codec import Row
from control.store.postgres_schema import MIGRATIONS
from control.store.scripted import ScriptedStore
from control.store.scripts import Script
from control.store.transaction import Dialect
from control.store.transaction import Params
from control.store.transaction import Statements
from control.store.transaction import insert_sql

# MIGRATIONS lives in the schema module beside this one; tests read it from here.
__all__ = ["MIGRATIONS", "PostgresStore", "PostgresTransaction"]

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
# Every transaction that changes shared state notifies its schema's channel on commit:
# one channel per schema, like the lead lock, so deployments (and test runs) sharing a
# database hear only their own. Computed by the server from the connection's schema.
_SHARED_CHANNEL = "'killswitch_' || md5(current_schema())"
# watch reconnects after a jittered delay that doubles from the first to the last,
# and starts again from the first once a connection has lasted WATCH_STABLE_SECONDS.
WATCH_RETRY_FIRST_SECONDS = 0.25
WATCH_RETRY_MAX_SECONDS = 15.0
WATCH_STABLE_SECONDS = 30.0

log = get_logger("killswitch.store")


def _replace(table: str, columns: Sequence[str]) -> str:
    """Insert or replace by the first column, the primary key: the columns not listed
    (``archived_at``) keep what they were."""
    return f"{insert_sql(table, columns, '%s')} {_replace_on_conflict(columns)}"


def _replace_on_conflict(columns: Sequence[str]) -> str:
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns[1:])
    return f"ON CONFLICT ({columns[0]}) DO UPDATE SET {updates}"


# Rows a script reads before changing them are locked (FOR UPDATE): see the lock order
# in control.store.scripts.
POSTGRES = Statements(
    Dialect(placeholder="%s", named=outbox.for_postgres, lock=" FOR UPDATE", replace=_replace)
)
_TRY_LEAD = "SELECT pg_try_advisory_lock(%s::integer, hashtext(current_schema())) AS locked"
# A batch goes through COPY into a staging table, then one upsert statement: see
# PostgresTransaction.upsert_agents for the measurement behind it. The table is created
# once per session and emptied by every commit: the plane flushes four times a second,
# and a table created and dropped per batch would churn the system catalogs as often.
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
_WRITTEN_SINCE = f"{codec.SELECT_AGENTS} WHERE written_xid >= %s::xid8 AND written_by <> %s"
_INSERT_EVIDENCE = (
    f"{insert_sql('violation_evidence', codec.EVIDENCE_COLUMNS, '%s')} ON CONFLICT (id) DO NOTHING"
    " RETURNING 1"
)


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


async def _fetch_one(conn: Connection, query: str, params: Params = ()) -> DictRow | None:
    return await (await conn.execute(query, params)).fetchone()


async def _fetch_all(conn: Connection, query: str, params: Params = ()) -> list[DictRow]:
    return await (await conn.execute(query, params)).fetchall()


async def _close_quietly(conn: Connection) -> None:
    with contextlib.suppress(Exception):
        await conn.close()


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


class PostgresTransaction:
    """``Transaction`` on one pooled connection, inside its ``conn.transaction()``."""

    sql = POSTGRES

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def one(self, query: str, params: Params = ()) -> Row | None:
        return await _fetch_one(self._conn, query, params)

    async def all(self, query: str, params: Params = ()) -> list[Row]:
        return list(await _fetch_all(self._conn, query, params))

    async def execute(self, query: str, params: Params = ()) -> int:
        return (await self._conn.execute(query, params)).rowcount

    async def execute_many(self, query: str, rows: Sequence[Params]) -> None:
        if rows:
            async with self._conn.cursor() as cur:
                await cur.executemany(query, rows)

    async def upsert_agents(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """COPY into a staging table, then one INSERT ... ON CONFLICT. Upserting 10,000
        agents on a local server: 70,000-85,000 rows/s, where a pipelined executemany
        does about 40,000 and one upsert over unnest() arrays 15,000. For ten rows all
        three take 2-4 ms.

        The last row of an agent wins, as with one upsert after another; rows go in
        agent_id order (its first column), so two batches lock shared rows in one order.
        """
        latest = {row[0]: row for row in rows}
        async with self._conn.cursor() as cur, cur.copy(_COPY_AGENT_BATCH) as copy:
            for agent_id in sorted(latest):
                await copy.write_row(_without_nul(latest[agent_id]))
        await self._conn.execute(_UPSERT_AGENT_BATCH)

    async def append_evidence(self, evidence: ViolationEvidence) -> bool:
        row = _without_nul(codec.evidence_to_row(evidence))
        return await self.one(_INSERT_EVIDENCE, row) is not None

    async def announce(self, epoch: int = 0) -> None:
        """Tell every watching replica, once this transaction commits, that shared state
        changed (the payload: the epoch it allocated, if any)."""
        payload = str(epoch) if epoch else ""
        await self._conn.execute(f"SELECT pg_notify({_SHARED_CHANNEL}, %s)", (payload,))


class PostgresStore(ScriptedStore):
    """The ``Store`` contract on a PostgreSQL database, shareable by several servers."""

    sole_writer = False
    _sql = POSTGRES

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

    async def _transaction(self, script: Script[T], *, may_spend_reserve: bool = False) -> T:
        """No reserve here: the database server keeps its own disk."""
        async with self._connection() as conn, conn.transaction():
            return await script(PostgresTransaction(conn))

    async def _read(self, script: Script[T], *, snapshot: bool = False) -> T:
        if snapshot:
            async with self._snapshot() as conn:
                return await script(PostgresTransaction(conn))
        async with self._connection() as conn:
            return await script(PostgresTransaction(conn))

    async def agents_written_since(self, cursor: str, replica_id: str) -> AgentChanges:
        """One snapshot: its horizon first, then the rows at or above the last one."""
        async with self._snapshot() as conn:
            horizon = await _fetch_one(conn, _SNAPSHOT_HORIZON)
            rows = await _fetch_all(conn, _WRITTEN_SINCE, (cursor or "0", replica_id))
            beats = await _fetch_all(conn, _BEAT_AGES)
        assert horizon is not None
        return AgentChanges(
            [codec.agent_from_row(r) for r in rows],
            {r["replica_id"]: float(r["age"]) for r in beats},
            horizon["horizon"],
        )

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
                (named,) = await _fetch_all(conn, f"SELECT {_SHARED_CHANNEL} AS channel")
                channel = sql.Identifier(named["channel"])
                await conn.execute(sql.SQL("LISTEN {}").format(channel))
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
