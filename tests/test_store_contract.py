"""The ``Store`` contract, run against every store: SQLite in a temp dir, PostgreSQL in a
schema of its own in the shared ``test`` database, dropped afterwards.

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
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import psycopg
import pytest
import structlog
from psycopg import sql

from control.domain import (
    AgentStatus,
    CaptureReport,
    Desired,
    HoldDraft,
    HoldKind,
    Mode,
    Scope,
    draft_hold,
)
from control.domain.approvals import Approval, ResumeRequest, ResumeState
from control.domain.audit import AuditRecord, ChainHead, verify_chain
from control.domain.identity import CertificateRecord, EnrollToken, Role, hash_secret
from control.domain.release import FULL_SHARE, rank_key
from control.domain.rollout import Run, Runbook, Wave, new_run, start_wave
from control.errors import Conflict, InvalidInput, NotFound, PermissionDenied, StoreError
from control.store import DecidedLabels, RunChange, Store, StoredAgent, ViolationEvidence, enrolment
from control.store.postgres import MIGRATIONS as PG_MIGRATIONS
from control.store.postgres import PostgresStore
from control.store.sqlite import DB_FILENAME, SqliteStore
from control.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
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


def test_holds_epochs_and_agents_survive_reopen(backend: Backend) -> None:
    saved = agent("a")

    async def write(store: Store) -> None:
        h1 = await store.create_hold(draft("h1", Scope.selector({"region": "eu"})), record("pause"))
        h2 = await store.create_hold(draft("h2", Scope.agents(["a", "b"])), record("pause"))
        lifted = await store.lift_hold("h1", "ic-2", 2000.0, record("resume", "ic-2"))
        assert (h1.created_epoch, h2.created_epoch, lifted.lifted_epoch) == (1, 2, 3)
        await store.save_agents([saved])

    async def reopened(store: Store) -> None:
        state = await store.load()
        assert state.shared.epoch == 3
        assert [(h.id, h.active) for h in state.shared.holds] == [("h1", False), ("h2", True)]
        assert state.shared.holds[0].scope == Scope.selector({"region": "eu"})
        assert state.shared.holds[0].lifted_by == "ic-2"
        assert state.shared.holds[1].scope.agent_ids == frozenset({"a", "b"})
        (loaded,) = state.agents
        # Exactly as written, the stream as its replica saw it included (the plane
        # decides what a row means to it). Evidence survives: a violation never clears
        # by itself.
        assert loaded == saved
        # Epochs keep going up across restarts, and so does the audit chain.
        h3 = await store.create_hold(draft("h3"), record("pause"))
        assert h3.created_epoch == 4
        assert await audit_actions(store) == ["pause", "pause", "resume", "pause"]

    run_with_store(backend, write)
    run_with_store(backend, reopened)


def test_agent_batches_upsert_and_the_last_row_of_an_agent_wins(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.save_agents([agent("a"), agent("b")])
        await store.save_agents([agent("b", region="us"), agent("c"), agent("b", region="ap")])
        labels = {a.agent_id: a.labels for a in (await store.load()).agents}
        assert labels == {"a": {"region": "eu"}, "b": {"region": "ap"}, "c": {"region": "eu"}}

    run_with_store(backend, body)


def test_every_write_chains_its_audit_entries_and_moves_the_head(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.create_hold(draft("h1"), record("pause", target="h1"))
        await store.save_agents([], [record("agent_enrolled", "laptop-1")])
        await store.append_audit([record("denied", "eve"), record("audit_read", "sre-1")])
        await store.save_resume_request(resume_request("h1"), record("resume_requested"))
        await store.create_enroll_token(
            EnrollToken("t1", hash_secret("s"), 1, 9000.0, "sre-1", 1000.0),
            record("token_created", "sre-1"),
        )
        await store.record_certificate(certificate("01", "sre-1"), record("cert_issued"))
        await store.record_certificate(certificate("02", "sre-2"), None)
        await store.revoke_certificates("01", 1500.0, record("cert_revoked"))
        await store.execute_resume(resume_request("h1"), 2000.0, record("resume", "approver-1"))
        await store.enrol_agent("t1", "s", agent_cert("03", "laptop-1"), record("enrolled"))
        await store.append_audit([])

        assert await audit_actions(store) == [
            "pause",
            "agent_enrolled",
            "denied",
            "audit_read",
            "resume_requested",
            "token_created",
            "cert_issued",
            "cert_revoked",
            "resume",
            "enrolled",
        ]
        entries, head = await store.read_audit(0, 1000)
        assert head == ChainHead(10, entries[-1].hash)
        assert entries[0].record == record("pause", target="h1")

    run_with_store(backend, body)


def test_timestamps_come_back_exact_and_hash_the_same(backend: Backend) -> None:
    awkward = [0.1 + 0.2, 1e-300, 1.7976931348623157e308, 1_700_000_000.123456789, 2**53 + 1]

    async def body(store: Store) -> None:
        await store.append_audit([record("tick", at=at) for at in awkward])
        hold = dataclasses.replace(draft("h1"), created_at=0.1 + 0.2)
        await store.create_hold(hold, record("pause"))
        entries, head = await store.read_audit(0, 100)
        assert verify_chain(entries, head) is None
        assert [e.record.at for e in entries[:-1]] == [float(at) for at in awkward]
        assert (await store.load()).shared.holds[0].created_at == 0.1 + 0.2

    run_with_store(backend, body)


def test_read_audit_pages_by_seq(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.append_audit([record(f"action-{n}") for n in range(1, 6)])
        page, head = await store.read_audit(after_seq=2, limit=2)
        assert [e.seq for e in page] == [3, 4]
        assert head.seq == 5
        assert (await store.read_audit(after_seq=5, limit=2))[0] == []
        with pytest.raises(InvalidInput, match="limit must be at least 1"):
            await store.read_audit(0, 0)

    run_with_store(backend, body)


def test_refused_lift_changes_nothing_and_appends_no_audit_entry(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.create_hold(draft("h1"), record("pause"))
        await store.lift_hold("h1", "ic-1", 2000.0, record("resume"))
        before = await store.read_audit(0, 100)
        with pytest.raises(NotFound, match="unknown hold 'nope'"):
            await store.lift_hold("nope", "ic-1", 2001.0, record("resume"))
        with pytest.raises(Conflict, match="'h1' was already lifted at epoch 2"):
            await store.lift_hold("h1", "ic-1", 2001.0, record("resume"))
        with pytest.raises(Conflict, match="hold 'h1' already exists"):
            await store.create_hold(draft("h1"), record("pause"))
        assert await store.read_audit(0, 100) == before
        assert (await store.load()).shared.epoch == 2, "refused writes allocate no epoch"

    run_with_store(backend, body)


def test_a_failed_audit_append_rolls_back_the_state_change(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.create_hold(draft("h1"), record("pause"))
        # The next audit insert fails, after the hold change ran.
        backend.break_audit_inserts("disk on fire")
        with pytest.raises(StoreError, match="disk on fire"):
            await store.create_hold(draft("h2"), record("pause"))
        with pytest.raises(StoreError, match="disk on fire"):
            await store.lift_hold("h1", "ic-1", 2000.0, record("resume"))
        state = await store.load()
        assert [(h.id, h.active) for h in state.shared.holds] == [("h1", True)]
        assert state.shared.epoch == 1
        assert (await store.read_audit(0, 100))[1].seq == 1

    run_with_store(backend, body)


def test_execute_resume_lifts_and_records_the_request_in_one_step(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.create_hold(draft("h1"), record("pause"))
        request = resume_request("h1")
        await store.save_resume_request(request, record("resume_requested"))
        hold = await store.execute_resume(request, 2000.0, record("resume", "approver-1"))
        assert (hold.id, hold.lifted_at, hold.lifted_by, hold.lifted_epoch) == (
            "h1",
            2000.0,
            "approver-1",
            2,
        )
        (stored,) = (await store.load()).shared.resume_requests
        assert stored == dataclasses.replace(request, state=ResumeState.EXECUTED, lifted_epoch=2)

        before = await store.read_audit(0, 100)
        with pytest.raises(Conflict, match="already lifted"):
            await store.execute_resume(request, 2001.0, record("resume"))
        other = dataclasses.replace(request, id="resume-2", hold_id="nope")
        with pytest.raises(NotFound, match="unknown hold 'nope'"):
            await store.execute_resume(other, 2001.0, record("resume"))
        assert await store.read_audit(0, 100) == before
        assert [r.id for r in (await store.load()).shared.resume_requests] == ["resume-1"]

    run_with_store(backend, body)


def test_requests_and_revocations_survive_reopen(backend: Backend) -> None:
    edited = dataclasses.replace(resume_request("h1"), revision=3, approvals=())

    async def write(store: Store) -> None:
        await store.create_hold(draft("h1"), record("pause"))
        await store.save_resume_request(resume_request("h1"), record("resume_requested"))
        await store.save_resume_request(edited, record("resume_edited"))
        await store.record_certificate(certificate("01", "sre-1"), record("cert_issued"))
        await store.record_certificate(certificate("02", "sre-2"), record("cert_issued"))
        await store.revoke_certificates("02", 1500.0, record("cert_revoked"))

    async def read(store: Store) -> None:
        state = await store.load()
        assert state.shared.resume_requests == [edited]
        assert state.shared.revoked == {"02": "sre-2"}
        assert [c.revoked_at for c in await store.list_certificates()] == [None, 1500.0]

    run_with_store(backend, write)
    run_with_store(backend, read)


def test_approvals_round_trip(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.save_resume_request(resume_request("h1"), record("resume_requested"))
        (loaded,) = (await store.load()).shared.resume_requests
        assert loaded == resume_request("h1")

    run_with_store(backend, body)


def test_enroll_token_uses_are_taken_one_at_a_time(backend: Backend) -> None:
    token = EnrollToken("t1", hash_secret("right"), 2, 5000.0, "sre-1", 1000.0)

    async def uses_left() -> int:
        rows = await asyncio.to_thread(backend.sql, "SELECT uses_left FROM enroll_tokens")
        return int(rows[0][0])

    async def body(store: Store) -> None:
        await store.create_enroll_token(token, record("token_created"))
        with pytest.raises(Conflict, match="enrolment token 't1' already exists"):
            await store.create_enroll_token(token, record("token_created"))
        await store.enrol_agent("t1", "right", agent_cert("01", "a"), record("enrolled"))
        assert await uses_left() == 1

        async def refusal(token_id: str, secret: str, now: float) -> str:
            with pytest.raises(PermissionDenied) as refused:
                await store.enrol_agent(token_id, secret, agent_cert("02", "b", now), record("x"))
            return str(refused.value)

        assert await refusal("t1", "wrong", 1000.0) == "unknown enrolment token"
        assert await refusal("t9", "right", 1000.0) == "unknown enrolment token"
        assert await refusal("t1", "right", 5000.0) == "enrolment token expired"
        assert await uses_left() == 1, "refusals take no use"
        await store.enrol_agent("t1", "right", agent_cert("03", "c"), record("enrolled"))
        assert await refusal("t1", "right", 1000.0) == "enrolment token has no uses left"
        assert await uses_left() == 0
        assert [c.serial for c in await store.list_certificates()] == ["01", "03"]
        assert await audit_actions(store) == ["token_created", "enrolled", "enrolled"]

    run_with_store(backend, body)


def test_an_agent_id_holds_one_valid_certificate(backend: Backend) -> None:
    """A second enrolment is refused while the first certificate is valid, and takes
    no token use; a revoked or an expired one no longer counts."""
    token = EnrollToken("t1", hash_secret("s"), 9, 99_000.0, "ic-1", 1000.0)

    async def body(store: Store) -> None:
        await store.create_enroll_token(token, record("token_created"))
        await store.enrol_agent("t1", "s", agent_cert("01", "laptop-1"), record("enrolled"))
        with pytest.raises(Conflict, match=r"laptop-1 already has a valid certificate \(serial 01"):
            await store.enrol_agent("t1", "s", agent_cert("02", "laptop-1", 1500.0), record("x"))
        await store.revoke_certificates("01", 1600.0, record("cert_revoked"))
        await store.enrol_agent("t1", "s", agent_cert("03", "laptop-1", 1700.0), record("enrolled"))
        # 03 expires at 2700.
        with pytest.raises(Conflict, match=r"\(serial 03\)"):
            await store.enrol_agent("t1", "s", agent_cert("04", "laptop-1", 2699.0), record("x"))
        await store.enrol_agent("t1", "s", agent_cert("05", "laptop-1", 2700.0), record("enrolled"))
        assert [c.serial for c in await store.list_certificates()] == ["01", "03", "05"]
        rows = await asyncio.to_thread(backend.sql, "SELECT uses_left FROM enroll_tokens")
        assert rows == [(6,)], "refused enrolments take no use"

    run_with_store(backend, body)


def test_concurrent_enrolments_of_one_agent_id_issue_one_certificate(backend: Backend) -> None:
    """Two stores on one database (replicas, on PostgreSQL) or one store, enrolling one
    id with two tokens at once, ten times over: each time exactly one wins."""
    rounds = 10

    async def body(store: Store) -> None:
        other = await backend.open() if isinstance(backend, PostgresBackend) else store
        try:
            for n in range(rounds):
                for token_id in (f"a{n}", f"b{n}"):
                    await store.create_enroll_token(
                        EnrollToken(token_id, hash_secret("s"), 1, 9000.0, "ic-1", 1000.0),
                        record("token_created"),
                    )
                outcomes = await asyncio.gather(
                    store.enrol_agent(f"a{n}", "s", agent_cert(f"a{n}", f"l{n}"), record("e")),
                    other.enrol_agent(f"b{n}", "s", agent_cert(f"b{n}", f"l{n}"), record("e")),
                    return_exceptions=True,
                )
                refused = [o for o in outcomes if isinstance(o, BaseException)]
                assert len(refused) == 1, outcomes
                assert isinstance(refused[0], Conflict), refused
                assert "already has a valid certificate" in str(refused[0])
        finally:
            if other is not store:
                await other.close()
        subjects = [c.subject for c in await store.list_certificates()]
        assert sorted(subjects) == sorted(f"l{n}" for n in range(rounds))

    run_with_store(backend, body)


def test_migration_gives_the_claim_to_each_agents_newest_certificate(backend: Backend) -> None:
    """A database from before the constraint, holding two live certificates of one agent
    (the bug), migrates: the newest holds the claim, and both still refuse enrolment."""

    async def before(store: Store) -> None:
        for serial, issued_at in (("01", 1000.0), ("02", 1100.0)):
            await store.record_certificate(agent_cert(serial, "laptop-1", issued_at), None)
        await store.create_enroll_token(
            EnrollToken("t1", hash_secret("s"), 1, 9000.0, "ic-1", 1000.0), record("t")
        )

    async def after(store: Store) -> None:
        with pytest.raises(Conflict, match=r"\(serial 01\)"):
            await store.enrol_agent("t1", "s", agent_cert("03", "laptop-1", 1200.0), record("x"))

    run_with_store(backend, before)
    backend.sql("DROP INDEX certificates_one_enrolment_claim")
    backend.sql("ALTER TABLE certificates DROP COLUMN enrolment_claim")
    if isinstance(backend, PostgresBackend):
        before_claims = PG_MIGRATIONS.index(enrolment.CLAIM_MIGRATION)
        backend.sql(f"DELETE FROM schema_version WHERE version > {before_claims}")
    else:
        backend.set_schema_version(SQLITE_MIGRATIONS.index(enrolment.CLAIM_MIGRATION))
    run_with_store(backend, after)
    claims = backend.sql("SELECT serial FROM certificates WHERE enrolment_claim = 'laptop-1'")
    assert claims == [("02",)]


def test_revocation_by_serial_and_by_subject(backend: Backend) -> None:
    async def body(store: Store) -> None:
        for cert in (
            certificate("01", "alice", issued_at=1000.0),
            certificate("02", "alice", issued_at=1100.0),
            certificate("03", "alice", issued_at=1200.0),
            certificate("04", "bob"),
        ):
            await store.record_certificate(cert, None)
        with pytest.raises(Conflict, match="certificate with serial 04 already exists"):
            await store.record_certificate(certificate("04", "bob"), None)

        by_serial = await store.revoke_certificates("02", 1500.0, record("cert_revoked"))
        assert [(c.serial, c.revoked_at) for c in by_serial] == [("02", 1500.0)]
        by_subject = await store.revoke_certificates("alice", 1600.0, record("cert_revoked"))
        assert [(c.serial, c.revoked_at) for c in by_subject] == [("01", 1600.0), ("03", 1600.0)]
        with pytest.raises(Conflict, match="every certificate matching 'alice' is already"):
            await store.revoke_certificates("alice", 1700.0, record("cert_revoked"))
        with pytest.raises(NotFound, match="no certificate with subject or serial 'carol'"):
            await store.revoke_certificates("carol", 1700.0, record("cert_revoked"))

        revoked_at = {c.serial: c.revoked_at for c in await store.list_certificates()}
        assert revoked_at == {"01": 1600.0, "02": 1500.0, "03": 1600.0, "04": None}
        assert set((await store.load()).shared.revoked) == {"01", "02", "03"}
        assert await audit_actions(store) == ["cert_revoked", "cert_revoked"]

    run_with_store(backend, body)


def test_triggers_keep_the_audit_log_append_only(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.append_audit([record("one"), record("two")])

    run_with_store(backend, body)
    with pytest.raises(SqlRefused, match="entries cannot be changed"):
        backend.sql("UPDATE audit_log SET actor = 'someone-else' WHERE seq = 1")
    with pytest.raises(SqlRefused, match="entries cannot be deleted"):
        backend.sql("DELETE FROM audit_log WHERE seq = 2")
    with pytest.raises(SqlRefused, match="only moves forward"):
        backend.sql("UPDATE audit_head SET seq = 1")
    assert backend.sql("SELECT count(*), max(seq) FROM audit_log") == [(2, 2)]
    assert backend.sql("SELECT seq FROM audit_head") == [(2,)]


def test_appended_entries_are_logged_after_commit_only(backend: Backend) -> None:
    async def body(store: Store) -> None:
        with structlog.testing.capture_logs() as logs:
            await store.create_hold(draft("h1"), record("pause", "ic-7"))
            with pytest.raises(NotFound):
                await store.lift_hold("nope", "ic-7", 2000.0, record("resume", "ic-7"))
        _, head = await store.read_audit(0, 10)
        appended = [line for line in logs if line["event"] == "audit_appended"]
        assert appended == [
            {
                "event": "audit_appended",
                "log_level": "info",
                "seq": 1,
                "hash": head.hash,
                "action": "pause",
                "actor": "ic-7",
            }
        ]

    run_with_store(backend, body)


def test_a_run_step_commits_its_hold_changes_under_one_epoch(backend: Backend) -> None:
    """Take-over: lift the approved hold, create the rollout hold, consume the request."""
    book = Runbook("staged", "seed", (Wave("1%", share=100), Wave("all", share=FULL_SHARE)))
    run = new_run(
        book, file_name="f.yaml", source="name: staged", started_by="ic-1", now=1.0, epoch=1
    )
    rollout = dataclasses.replace(
        draft("h-rollout"), kind=HoldKind.ROLLOUT, release=book.release_through(0, FIRST_CUT)
    )

    async def body(store: Store) -> None:
        await store.create_hold(draft("h1"), record("pause"))
        request = resume_request("h1")
        started = start_wave(run, 0, now=2.0, cutoff=FIRST_CUT)
        change = RunChange(
            version(started, 1),
            "automation-1",
            2.0,
            create=rollout,
            lift_hold_id="h1",
            executed_request=request,
        )
        commit = await store.commit_run(change, [record("runbook.start")])
        assert commit.epoch == 2
        assert [(h.id, h.active) for h in commit.holds] == [("h1", False), ("h-rollout", True)]
        # A refused step changes nothing: the hold it would lift is gone.
        before = await store.read_audit(0, 100)
        again = dataclasses.replace(change, run=version(started, 2))
        with pytest.raises(Conflict, match="already lifted"):
            await store.commit_run(again, [record("runbook.start")])
        assert await store.read_audit(0, 100) == before
        # Widening the release is a step of its own, with its own epoch.
        widened = await store.commit_run(
            RunChange(
                version(started, 2),
                "control-plane",
                3.0,
                release=("h-rollout", book.release_through(1, LAST_CUT)),
            ),
            [],
        )
        assert widened.epoch == 3
        assert widened.holds[0].release == book.release_through(1, LAST_CUT)
        # A step that touches no hold allocates no epoch.
        last = version(started, 3)
        assert (await store.commit_run(RunChange(last, "control-plane", 4.0), [])).epoch == 0
        state = await store.load()
        assert (state.shared.epoch, state.shared.runs) == (3, [last])
        holds = {h.id: h for h in state.shared.holds}
        assert holds["h-rollout"].release == book.release_through(1, LAST_CUT)
        assert holds["h1"].lifted_by == "automation-1"
        (stored_request,) = state.shared.resume_requests
        assert (stored_request.state, stored_request.lifted_epoch) == (ResumeState.EXECUTED, 2)
        assert await audit_actions(store) == ["pause", "runbook.start"]

    run_with_store(backend, body)


def version(run: Run, number: int) -> Run:
    return dataclasses.replace(run, version=number)


def staged_run(run_id: str = "run-1") -> Run:
    book = Runbook("staged", "seed", (Wave("1%", share=100), Wave("all", share=FULL_SHARE)))
    run = new_run(
        book, file_name="f.yaml", source="name: staged", started_by="ic-1", now=1.0, epoch=1
    )
    return dataclasses.replace(run, id=run_id)


def test_a_run_step_based_on_a_stale_version_is_refused(backend: Backend) -> None:
    """Two writers (replicas, or a tick and an abort) never both move one run."""
    run = staged_run()

    async def body(store: Store) -> None:
        await store.create_hold(draft("h1"), record("pause"))
        await store.commit_run(RunChange(version(run, 1), "ic-1", 1.0), [record("runbook.start")])
        moved = version(start_wave(run, 0, now=2.0, cutoff=FIRST_CUT), 2)
        await store.commit_run(RunChange(moved, "control-plane", 2.0), [record("wave")])
        state, audit = await store.load(), await store.read_audit(0, 100)

        stale = [
            # Based on version 1, which is no longer the stored one.
            RunChange(version(run, 2), "ic-2", 3.0, lift_hold_id="h1"),
            # A first step of a run that is already stored.
            RunChange(version(run, 1), "ic-2", 3.0, create=draft("h2")),
            # A step from the future.
            RunChange(version(run, 4), "ic-2", 3.0),
            RunChange(version(run, 0), "ic-2", 3.0),
        ]
        for change in stale:
            with pytest.raises(Conflict, match=r"run run-1 was changed by another writer"):
                await store.commit_run(change, [record("runbook.abort", "ic-2")])
        assert await store.load() == state, "no hold, epoch or run changed"
        assert await store.read_audit(0, 100) == audit, "and no audit entry"
        assert [r.version for r in state.shared.runs] == [2]

    run_with_store(backend, body)


def test_a_run_stored_without_a_version_is_version_0(backend: Backend) -> None:
    """Runs stored before versions existed: their next step is version 1."""
    run = staged_run()

    async def body(store: Store) -> None:
        await store.commit_run(RunChange(version(run, 1), "ic-1", 1.0), [])
        backend.strip_run_versions()
        (old,) = (await store.load()).shared.runs
        assert old == version(run, 0)
        await store.commit_run(RunChange(version(run, 1), "ic-1", 2.0), [])
        assert [r.version for r in (await store.load_shared()).runs] == [1]

    run_with_store(backend, body)


def test_load_shared_is_load_without_the_agents(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.save_agents([agent("a")])
        await store.create_hold(draft("h1"), record("pause"))
        await store.create_hold(draft("h2"), record("pause"))
        await store.lift_hold("h2", "ic-1", 2000.0, record("resume"))
        await store.save_resume_request(resume_request("h1"), record("resume_requested"))
        await store.record_certificate(certificate("01", "sre-1"), None)
        await store.record_certificate(certificate("02", "sre-2"), None)
        await store.revoke_certificates("02", 1500.0, record("cert_revoked"))
        await store.commit_run(RunChange(version(staged_run(), 1), "ic-1", 1.0), [])

        loaded, shared = await store.load(), await store.load_shared()
        assert shared == loaded.shared
        assert (shared.epoch, [h.id for h in shared.holds]) == (3, ["h1", "h2"])
        assert (len(shared.resume_requests), shared.revoked) == (1, {"02": "sre-2"})
        assert [r.id for r in shared.runs] == ["run-1"]
        assert await store.load_agent("a") == loaded.agents[0]
        assert await store.load_agent("nobody") is None

    run_with_store(backend, body)


def test_one_store_alone_leads(backend: Backend) -> None:
    async def body(store: Store) -> None:
        assert await store.try_lead()
        assert await store.try_lead(), "and keeps the lead"

    run_with_store(backend, body)


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


def test_two_deciders_at_once_cannot_both_win(backend: Backend) -> None:
    """A request write is a compare-and-set on its revision and state."""
    pending = pending_request()
    edited = dataclasses.replace(pending, revision=2, reason="all clear, really")

    async def body(store: Store) -> None:
        await store.create_hold(draft("h1"), record("pause"))
        await store.save_resume_request(pending, record("resume.request"))
        # Both approvers saw revision 1, pending; the first decision wins.
        await store.save_resume_request(
            decided(pending, ResumeState.APPROVED, "approver-1"), record("resume.approve")
        )
        before = await store.load(), await store.read_audit(0, 100)
        with pytest.raises(Conflict, match=r"changed meanwhile \(now revision 1, approved\)"):
            await store.save_resume_request(
                decided(pending, ResumeState.DENIED, "approver-2"), record("resume.deny")
            )
        # Nor can the second approve it again.
        with pytest.raises(Conflict, match=r"changed meanwhile \(now revision 1, approved\)"):
            await store.save_resume_request(
                decided(pending, ResumeState.APPROVED, "approver-2"), record("resume.approve")
            )
        assert (await store.load(), await store.read_audit(0, 100)) == before

        # The requester edits (approvals dropped); a decision on revision 1 is now stale,
        # and so is executing it.
        await store.save_resume_request(edited, record("resume.edit"))
        stale = decided(pending, ResumeState.APPROVED, "approver-2")
        with pytest.raises(Conflict, match=r"changed meanwhile \(now revision 2, pending\)"):
            await store.save_resume_request(stale, record("resume.approve"))
        with pytest.raises(Conflict, match="changed since it was approved"):
            await store.execute_resume(stale, 2000.0, record("resume"))
        assert (await store.load()).shared.holds[0].active, "the hold stays"

        # Revision 2, approved and executed: then nothing more is written over it, and
        # no run can consume it.
        approved = decided(edited, ResumeState.APPROVED, "approver-2")
        await store.save_resume_request(approved, record("resume.approve"))
        await store.execute_resume(approved, 2000.0, record("resume"))
        with pytest.raises(Conflict, match="resume-1' is executed"):
            await store.save_resume_request(
                dataclasses.replace(approved, revision=3), record("resume.edit")
            )
        consume = RunChange(version(staged_run(), 1), "ic-1", 2001.0, executed_request=approved)
        with pytest.raises(Conflict, match="resume-1' is executed"):
            await store.commit_run(consume, [record("runbook.start")])
        state = await store.load()
        ((stored,), runs) = state.shared.resume_requests, state.shared.runs
        assert (stored.state, stored.revision, runs) == (ResumeState.EXECUTED, 2, [])

    run_with_store(backend, body)


async def nothing(store: Store) -> None:
    """Open and close: that alone creates or migrates the schema."""


def test_newer_schema_is_refused_with_a_clear_error(backend: Backend) -> None:
    run_with_store(backend, nothing)
    backend.set_schema_version(99)
    with pytest.raises(StoreError, match=r"schema version 99, newer than .* upgrade the server"):
        run_with_store(backend, nothing)


def test_an_acknowledged_violation_is_shared_state_with_its_audit_entry(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.acknowledge_violation("a", 2.6, record("agent.acknowledge_violation"))
        await store.acknowledge_violation("b", 5.0, record("agent.acknowledge_violation"))
        await store.acknowledge_violation("a", 9.5, record("agent.acknowledge_violation"))
        assert (await store.load_shared()).violation_acks == {"a": 9.5, "b": 5.0}
        assert (await store.load()).shared.violation_acks == {"a": 9.5, "b": 5.0}
        assert await audit_actions(store) == ["agent.acknowledge_violation"] * 3

    run_with_store(backend, body)


def test_a_replica_never_reads_back_its_own_rows(backend: Backend) -> None:
    """SQLite has one writer, which knows its rows; PostgreSQL leaves out the reader's."""

    async def body(store: Store) -> None:
        await store.save_agents([agent("a")])  # written by replica-a
        await store.beat("replica-a")
        changes = await store.agents_written_since("", "replica-a")
        assert changes.rows == []

    run_with_store(backend, body)


def evidence(
    evidence_id: str, agent_id: str, at: float, text: str = "spool grew"
) -> ViolationEvidence:
    return ViolationEvidence(evidence_id, agent_id, at, text, "replica-b", 4)


def sighting(found: ViolationEvidence) -> tuple[ViolationEvidence, AuditRecord]:
    return found, record("agent.violation", "control-plane", found.agent_id, at=found.flagged_at)


def test_violation_evidence_is_appended_once_and_read_until_acknowledged(
    backend: Backend,
) -> None:
    a1, b1, a2 = evidence("e1", "a", 5.0), evidence("e2", "b", 6.0), evidence("e3", "a", 0.1 + 7)

    async def body(store: Store) -> None:
        await store.record_violations([sighting(a2), sighting(a1)])
        await store.record_violations([sighting(b1)])
        # A retry after an unknown outcome: no second row, no second audit entry.
        await store.record_violations([sighting(a1), sighting(b1)])
        await store.record_violations([])
        assert (await store.load_shared()).violations == [a1, b1, a2]
        assert await audit_actions(store) == ["agent.violation"] * 3
        # An acknowledgement covers evidence up to its time; later evidence stays.
        await store.acknowledge_violation("a", 5.0, record("agent.acknowledge_violation"))
        assert (await store.load_shared()).violations == [b1, a2]

    async def reopened(store: Store) -> None:
        assert (await store.load()).shared.violations == [b1, a2]

    run_with_store(backend, body)
    run_with_store(backend, reopened)
    with pytest.raises(SqlRefused, match="append-only: entries cannot be changed"):
        backend.sql("UPDATE violation_evidence SET evidence = 'nothing' WHERE id = 'e2'")
    with pytest.raises(SqlRefused, match="append-only: entries cannot be deleted"):
        backend.sql("DELETE FROM violation_evidence WHERE id = 'e2'")
    assert backend.sql("SELECT count(*) FROM violation_evidence") == [(3,)]


def test_violation_evidence_is_stored_with_its_audit_entry_or_not_at_all(backend: Backend) -> None:
    async def write(store: Store) -> None:
        with pytest.raises(StoreError, match="audit is down"):
            await store.record_violations([sighting(evidence("e1", "a", 5.0))])
        assert (await store.load_shared()).violations == []

    run_with_store(backend, nothing)
    backend.break_audit_inserts("audit is down")
    run_with_store(backend, write)


def test_reported_labels_are_stored_apart_from_the_servers(backend: Backend) -> None:
    """What an agent claims survives a restart next to, never instead of, its labels;
    an agent that never connected has reported nothing (None), not "no labels"."""
    claimed = dataclasses.replace(
        agent("a", org="finance"),
        status=dataclasses.replace(agent("a").status, reported_labels={"org": "marketing"}),
    )
    silent = dataclasses.replace(agent("b", org="finance"), status=AgentStatus())
    bare = dataclasses.replace(
        agent("c"), status=dataclasses.replace(agent("c").status, reported_labels={})
    )

    async def write(store: Store) -> None:
        await store.save_agents([claimed, silent, bare])

    async def reopened(store: Store) -> None:
        rows = {a.agent_id: a for a in (await store.load()).agents}
        assert rows["a"] == claimed
        assert rows["a"].labels == {"org": "finance"}
        assert rows["a"].status.reported_labels == {"org": "marketing"}
        assert rows["b"].status.reported_labels is None
        assert rows["c"].status.reported_labels == {}
        assert await store.load_agent("a") == claimed

    run_with_store(backend, write)
    run_with_store(backend, reopened)


def test_a_join_token_keeps_the_labels_it_pins(backend: Backend) -> None:
    pinned = EnrollToken(
        "t1", hash_secret("s"), 1, 5000.0, "ic-1", 1000.0, {"org": "finance", "ring": "canary"}
    )
    plain = EnrollToken("t2", hash_secret("s"), 1, 5000.0, "ic-1", 1000.0)

    async def body(store: Store) -> None:
        await store.create_enroll_token(pinned, record("token_created"))
        await store.create_enroll_token(plain, record("token_created"))
        # The token as it was before this use: what the enrolment pins.
        enrolled = await store.enrol_agent("t1", "s", agent_cert("01", "a"), record("enrolled"))
        assert enrolled == pinned
        assert (await store.enrol_agent("t2", "s", agent_cert("02", "b"), record("e"))).labels == {}

    run_with_store(backend, body)


def decision(agent_id: str, by: str = "ic-1", at: float = 1000.0, **labels: str) -> DecidedLabels:
    return DecidedLabels(agent_id, labels, by, at)


def test_decided_labels_are_read_back_by_version_only_when_they_change(backend: Backend) -> None:
    """An import that changes nothing moves no version; a replica reading past its cursor
    gets exactly the agents whose decided labels changed, each once, newest value."""

    async def body(store: Store) -> None:
        await store.save_agents(
            [], [record("inventory.import")], [decision("a", org="sales"), decision("b", org="hr")]
        )
        first = await store.labels_decided_since(0)
        assert [(d.agent_id, d.labels, d.set_by) for d in first] == [
            ("a", {"org": "sales"}, "ic-1"),
            ("b", {"org": "hr"}, "ic-1"),
        ]
        cursor = first[-1].version
        assert cursor > 0 and {d.version for d in first} == {cursor}
        assert await store.labels_decided_since(cursor) == []
        # b unchanged, a relabelled, c new: only a and c come back, past the cursor.
        await store.save_agents(
            [],
            [record("inventory.import", "ic-2")],
            [
                decision("a", "ic-2", 2000.0, org="finance"),
                decision("b", "ic-2", 2000.0, org="hr"),
                decision("c", "ic-2", 2000.0, org="finance"),
            ],
        )
        second = await store.labels_decided_since(cursor)
        assert [(d.agent_id, d.labels, d.set_by, d.set_at) for d in second] == [
            ("a", {"org": "finance"}, "ic-2", 2000.0),
            ("c", {"org": "finance"}, "ic-2", 2000.0),
        ]
        assert min(d.version for d in second) > cursor
        # Nothing changes: nothing to read, however often the import is repeated.
        await store.save_agents([], [], [decision("a", org="finance")])
        assert await store.labels_decided_since(second[-1].version) == []
        assert await audit_actions(store) == ["inventory.import"] * 2

    async def reopened(store: Store) -> None:
        everything = {d.agent_id: d.labels for d in await store.labels_decided_since(0)}
        assert everything == {"a": {"org": "finance"}, "b": {"org": "hr"}, "c": {"org": "finance"}}

    run_with_store(backend, body)
    run_with_store(backend, reopened)


def test_an_agents_row_reads_back_with_its_decided_labels(backend: Backend) -> None:
    """The replica serving an agent writes its row with the labels it knew; an import
    on another replica decided newer ones. Every read of the row (a restart, a failover's
    recall) must give the decided labels, or a pause by selector could miss the laptop."""
    stale = agent("a", org="marketing")
    self_labelled = agent("b", org="sales")  # labelled by its first report: no decision

    async def body(store: Store) -> None:
        await store.save_agents([stale, self_labelled])
        await store.save_agents([], [record("inventory.import")], [decision("a", org="finance")])
        await store.save_agents([stale])  # written again, by a replica not caught up yet
        rows = {a.agent_id: a for a in (await store.load()).agents}
        assert rows["a"] == dataclasses.replace(stale, labels={"org": "finance"})
        assert rows["b"] == self_labelled
        loaded = await store.load_agent("a")
        assert loaded is not None and loaded.labels == {"org": "finance"}

    run_with_store(backend, body)


def test_decided_labels_are_stored_with_their_audit_entries_or_not_at_all(
    backend: Backend,
) -> None:
    async def write(store: Store) -> None:
        with pytest.raises(StoreError, match="audit is down"):
            await store.save_agents(
                [agent("a")], [record("inventory.import")], [decision("a", org="finance")]
            )
        assert await store.labels_decided_since(0) == []
        assert (await store.load()).agents == []

    run_with_store(backend, nothing)
    backend.break_audit_inserts("audit is down")
    run_with_store(backend, write)


def test_a_lifted_hold_is_reactivated_in_place(backend: Backend) -> None:
    """A laptop's opt-out: each cycle re-activates one row, never adds one, archived or not."""
    opt_out = dataclasses.replace(
        draft("opt-out-laptop-1", Scope.agents(["laptop-1"])), kind=HoldKind.OPT_OUT
    )

    async def body(store: Store) -> None:
        first = await store.reactivate_hold(opt_out, record("hold.create"))
        with pytest.raises(Conflict, match="hold 'opt-out-laptop-1' is already active"):
            await store.reactivate_hold(opt_out, record("hold.create"))
        await store.lift_hold(opt_out.id, "employee-1", 1100.0, record("hold.lift"))
        again = await store.reactivate_hold(
            dataclasses.replace(opt_out, reason="again", created_at=1200.0), record("hold.create")
        )
        assert (again.id, again.reason, again.active) == (opt_out.id, "again", True)
        assert again.created_epoch > first.created_epoch
        await store.lift_hold(opt_out.id, "employee-1", 1300.0, record("hold.lift"))
        assert (await store.archive_history(2000.0, 2000.0, 10)).holds == 1
        assert (await store.load()).shared.holds == []
        third = await store.reactivate_hold(opt_out, record("hold.create"))
        assert (await store.load()).shared.holds == [third]
        assert await store.archived_hold(opt_out.id) is None
        assert backend.sql("SELECT count(*) FROM holds") == [(1,)]
        assert await audit_actions(store) == ["hold.create", "hold.lift"] * 2 + ["hold.create"]

    run_with_store(backend, body)


def test_upgrading_archives_the_lifted_opt_outs_of_earlier_cycles(backend: Backend) -> None:
    """A database from before one-hold opt-outs, with a row per cycle: the lifted ones
    leave the hot path (still readable as archived); the active one stays."""

    def opt_out(hold_id: str) -> HoldDraft:
        return dataclasses.replace(draft(hold_id, Scope.agents(["l1"])), kind=HoldKind.OPT_OUT)

    async def before(store: Store) -> None:
        for hold_id in ("hold-000000000001", "hold-000000000002"):
            await store.create_hold(opt_out(hold_id), record("hold.create"))
            await store.lift_hold(hold_id, "employee-1", 1100.0, record("hold.lift"))
        await store.create_hold(opt_out("hold-000000000003"), record("hold.create"))
        await store.create_hold(draft("hold-000000000004"), record("hold.create"))
        await store.lift_hold("hold-000000000004", "approver-1", 1100.0, record("hold.lift"))

    async def after(store: Store) -> None:
        hot = {h.id for h in (await store.load()).shared.holds}
        assert hot == {"hold-000000000003", "hold-000000000004"}
        assert await store.archived_hold("hold-000000000001") is not None

    run_with_store(backend, before)
    postgres = isinstance(backend, PostgresBackend)
    migrations = PG_MIGRATIONS if postgres else SQLITE_MIGRATIONS
    version = next(n for n, script in enumerate(migrations) if "kind = 'opt_out'" in script)
    if postgres:
        backend.sql(f"DELETE FROM schema_version WHERE version > {version}")
    else:
        backend.set_schema_version(version)
    run_with_store(backend, after)
