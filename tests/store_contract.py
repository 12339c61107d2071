"""The ``Store`` contract's test bench: each store's database (SQLite in a temp dir,
PostgreSQL in a schema of its own in the shared ``test`` database, dropped afterwards),
the ``backend`` fixture over both, and the objects the contract tests store.

The contract itself is in the ``test_store_contract_*`` modules, one per concern.
PostgreSQL is at ``$KILLSWITCH_TEST_POSTGRES`` (a DSN; default: trust auth on 127.0.0.1).
When it is unreachable its half of the suite is skipped, or fails under CI=true.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from typing import Protocol

import psycopg
import pytest
from psycopg import sql

from control.domain import AgentStatus
from control.domain import CaptureReport
from control.domain import Desired
from control.domain import HoldDraft
from control.domain import HoldKind
from control.domain import Mode
from control.domain import Scope
from control.domain import draft_hold
from control.domain.approvals import Approval
from control.domain.approvals import ResumeRequest
from control.domain.approvals import ResumeState
from control.domain.audit import AuditRecord
from control.domain.audit import verify_chain
from control.domain.identity import CertificateRecord
from control.domain.identity import Role
from control.domain.release import FULL_SHARE
from control.domain.release import rank_key
from control.domain.rollout import Run
from control.domain.rollout import Runbook
from control.domain.rollout import Wave
from control.domain.rollout import new_run
from control.store import DecidedLabels
from control.store import Store
from control.store import StoredAgent
from control.store import ViolationEvidence
from control.store.postgres import PostgresStore
from control.store.sqlite import DB_FILENAME
from control.store.sqlite import SqliteStore
from tests.conftest import missing_tool

# Rank keys of the last laptop released through waves 1 and 2 of a staged run.
FIRST_CUT = rank_key("seed", "laptop-1")
LAST_CUT = "f" * 64
POSTGRES_DSN = os.environ.get(
    "KILLSWITCH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


class SqlRefused(Exception):
    """A statement the database refused, whichever database it was."""


class Backend(Protocol):
    """One store's database, reopened as often as a test likes, plus a side door to it."""

    async def open(self) -> Store: ...

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        """Run one statement on a connection of its own, committed; raises ``SqlRefused``."""

    def break_audit_inserts(self, message: str) -> None:
        """From now on, inserting an audit entry fails with ``message``."""

    def set_schema_version(self, version: int) -> None: ...

    def strip_run_versions(self) -> None:
        """Make every stored run look as it was stored before runs had versions."""


class SqliteBackend:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    async def open(self) -> SqliteStore:
        return await SqliteStore.open(self.data_dir)

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.data_dir / DB_FILENAME)
        try:
            rows = conn.execute(statement).fetchall()
            conn.commit()
            return rows
        except sqlite3.DatabaseError as exc:
            raise SqlRefused(str(exc)) from exc
        finally:
            conn.close()

    def break_audit_inserts(self, message: str) -> None:
        self.sql(
            "CREATE TRIGGER fail_audit BEFORE INSERT ON audit_log"
            f" BEGIN SELECT RAISE(ABORT, '{message}'); END"
        )

    def set_schema_version(self, version: int) -> None:
        self.sql(f"PRAGMA user_version={version}")

    def strip_run_versions(self) -> None:
        self.sql("UPDATE runbook_runs SET run = json_remove(run, '$.version')")


class PostgresBackend:
    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.schema = schema

    async def open(self, pool_size: int = 2) -> PostgresStore:
        return await PostgresStore.open(self.dsn, schema=self.schema, pool_size=pool_size)

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
            try:
                cur = conn.execute(statement)
            except psycopg.Error as exc:
                raise SqlRefused(exc.diag.message_primary or str(exc)) from exc
            return cur.fetchall() if cur.description else []

    def break_audit_inserts(self, message: str) -> None:
        self.sql(
            "CREATE FUNCTION fail_audit() RETURNS trigger LANGUAGE plpgsql AS"
            f" $$ BEGIN RAISE EXCEPTION '{message}'; END $$;"
            " CREATE TRIGGER fail_audit BEFORE INSERT ON audit_log"
            " FOR EACH ROW EXECUTE FUNCTION fail_audit()"
        )

    def set_schema_version(self, version: int) -> None:
        self.sql(f"INSERT INTO schema_version (version) VALUES ({version})")

    def strip_run_versions(self) -> None:
        self.sql("UPDATE runbook_runs SET run = (run::jsonb - 'version')::text")


@functools.cache
def postgres_unreachable() -> str:
    """Why the test PostgreSQL cannot be used; empty when it can. Asked once per session."""
    try:
        psycopg.connect(POSTGRES_DSN, connect_timeout=3).close()
    except psycopg.Error as exc:
        return f"PostgreSQL unreachable at {POSTGRES_DSN} ({str(exc).strip().splitlines()[0]})"
    return ""


def postgres_backend() -> Iterator[PostgresBackend]:
    """A fresh schema per test (the store creates it), dropped afterwards."""
    if why := postgres_unreachable():
        missing_tool(f"{why}; start it or point KILLSWITCH_TEST_POSTGRES at one")
    # Upper case and a space: every use of the name must quote it.
    schema = f"Killswitch test {uuid.uuid4().hex[:12]}"
    yield PostgresBackend(POSTGRES_DSN, schema)
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def each_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """For a fixture parametrised ``["sqlite", "postgres"]``: that store's database."""
    if request.param == "sqlite":
        yield SqliteBackend(tmp_path)
    else:
        yield from postgres_backend()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from each_backend(request, tmp_path)


def draft(hold_id: str, scope: Scope | None = None) -> HoldDraft:
    return draft_hold(
        hold_id=hold_id,
        kind=HoldKind.INCIDENT,
        scope=scope or Scope.fleet(),
        reason="leak",
        ticket="INC-1",
        created_by="ic-1",
        created_at=1000.0,
    )


def record(action: str, actor: str = "ic-1", target: str = "", at: float = 1000) -> AuditRecord:
    # An int timestamp on purpose: it must hash the same after a trip through a float column.
    return AuditRecord(at=at, actor=actor, role="incident-commander", action=action, target=target)


def run_with_store(backend: Backend, body: Callable[[Store], Awaitable[None]]) -> None:
    """Open the store, run ``body`` against it, close it whatever happens."""

    async def main() -> None:
        store = await backend.open()
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


async def audit_actions(store: Store) -> list[str]:
    entries, head = await store.read_audit(0, 1000)
    assert verify_chain(entries, head) is None
    return [e.record.action for e in entries]


def resume_request(hold_id: str) -> ResumeRequest:
    return ResumeRequest(
        id="resume-1",
        hold_id=hold_id,
        requested_by="ic-1",
        reason="all clear",
        ticket="INC-1",
        created_at=1000.0,
        expires_at=4600.0,
        state=ResumeState.APPROVED,
        revision=2,
        approvals=(Approval("approver-1", 1100.0, 2, "checked with legal"),),
        decided_by="approver-1",
        decided_at=1100.0,
        decision_note="checked with legal",
    )


def certificate(serial: str, subject: str, issued_at: float = 1000.0) -> CertificateRecord:
    return CertificateRecord(serial, subject, Role.SRE, not_after=9000.0, issued_at=issued_at)


def agent_cert(serial: str, agent_id: str, issued_at: float = 1000.0) -> CertificateRecord:
    """An enrolment's certificate, valid for 1000 s."""
    return CertificateRecord(serial, agent_id, Role.AGENT, issued_at + 1000.0, issued_at)


def agent(agent_id: str, nack_reason: str = "", **labels: str) -> StoredAgent:
    status = AgentStatus(
        first_seen=1.0,
        last_seen=2.0,
        connected=True,
        acked_epoch=2,
        acked_mode=Mode.PAUSED,
        acked_at=2.0,
        nack_reason=nack_reason,
        channels={"screen": False},
        report=CaptureReport(events_total=50, last_event_at=1.9, spool_events=0),
        ack_report=CaptureReport(events_total=48, last_event_at=1.8, spool_events=2),
        purged_events=7,
        verified_at=2.5,
        lease_expires_at=61.0,
        uploads_refused=3,
        violation="events_captured_total rose from 48 to 50",
        violation_at=2.6,
    )
    desired = Desired(Mode.PAUSED, ("h2",), "leak", 2, 1.5)
    return StoredAgent(agent_id, labels or {"region": "eu"}, desired, status, "replica-a", 2.7)


def version(run: Run, number: int) -> Run:
    return dataclasses.replace(run, version=number)


def staged_run(run_id: str = "run-1") -> Run:
    book = Runbook("staged", "seed", (Wave("1%", share=100), Wave("all", share=FULL_SHARE)))
    run = new_run(
        book, file_name="f.yaml", source="name: staged", started_by="ic-1", now=1.0, epoch=1
    )
    return dataclasses.replace(run, id=run_id)


def pending_request(hold_id: str = "h1") -> ResumeRequest:
    return dataclasses.replace(
        resume_request(hold_id),
        state=ResumeState.PENDING,
        revision=1,
        approvals=(),
        decided_by="",
        decided_at=None,
        decision_note="",
    )


def decided(request: ResumeRequest, state: ResumeState, by: str) -> ResumeRequest:
    return dataclasses.replace(request, state=state, decided_by=by, decided_at=1200.0)


async def nothing(store: Store) -> None:
    """Open and close: that alone creates or migrates the schema."""


def evidence(
    evidence_id: str, agent_id: str, at: float, text: str = "spool grew"
) -> ViolationEvidence:
    return ViolationEvidence(evidence_id, agent_id, at, text, "replica-b", 4)


def sighting(found: ViolationEvidence) -> tuple[ViolationEvidence, AuditRecord]:
    return found, record("agent.violation", "control-plane", found.agent_id, at=found.flagged_at)


def decision(agent_id: str, by: str = "ic-1", at: float = 1000.0, **labels: str) -> DecidedLabels:
    return DecidedLabels(agent_id, labels, by, at)


# ------------------------------------------------------------------ watching PostgreSQL

WATCH_WAIT_SECONDS = 5.0


class Changes:
    """A ``watch`` callback that a test can wait on."""

    def __init__(self) -> None:
        self.calls = 0
        self._event = asyncio.Event()

    def __call__(self) -> None:
        self.calls += 1
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def happened(self) -> bool:
        return self._event.is_set()

    async def wait(self, what: str) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), WATCH_WAIT_SECONDS)
        except TimeoutError:
            raise AssertionError(
                f"changed() not called within {WATCH_WAIT_SECONDS}s after {what}"
            ) from None
        self._event.clear()


@asynccontextmanager
async def watching(
    watcher: PostgresStore, writer: Store
) -> AsyncIterator[tuple[Changes, asyncio.Task[None]]]:
    """``watcher`` watching what is committed (by ``writer``), and the watch; the watch
    cancelled and both stores closed afterwards."""
    changes = Changes()
    watch = asyncio.create_task(watcher.watch(changes))
    try:
        yield changes, watch
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await asyncio.gather(writer.close(), watcher.close())
