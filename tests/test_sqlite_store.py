"""The SQLite store against its contract, on a real file."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import structlog

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
from control.domain.audit import GENESIS_HASH, AuditRecord, ChainHead, verify_chain
from control.domain.identity import CertificateRecord, EnrollToken, Role, hash_secret
from control.domain.release import FULL_SHARE
from control.domain.rollout import Runbook, Wave, new_run, start_wave
from control.errors import Conflict, InvalidInput, NotFound, PermissionDenied, StoreError
from control.store import RunChange, StoredAgent
from control.store.sqlite import MIGRATIONS, SqliteStore


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


def record(action: str, actor: str = "ic-1", target: str = "") -> AuditRecord:
    # An int timestamp on purpose: it must hash the same after a trip through a REAL column.
    return AuditRecord(
        at=1000, actor=actor, role="incident-commander", action=action, target=target
    )


def run_with_store(data_dir: Path, body: Callable[[SqliteStore], Awaitable[None]]) -> None:
    """Open the store, run ``body`` against it, close it whatever happens."""

    async def main() -> None:
        store = await SqliteStore.open(data_dir)
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


async def audit_actions(store: SqliteStore) -> list[str]:
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


async def _lifecycle(data_dir: Path) -> None:
    store = await SqliteStore.open(data_dir)
    h1 = await store.create_hold(draft("h1", Scope.selector({"region": "eu"})), record("pause"))
    h2 = await store.create_hold(draft("h2", Scope.agents(["a", "b"])), record("pause"))
    lifted = await store.lift_hold("h1", "ic-2", 2000.0, record("resume", "ic-2"))
    assert (h1.created_epoch, h2.created_epoch, lifted.lifted_epoch) == (1, 2, 3)
    with pytest.raises(Conflict):
        await store.lift_hold("h1", "ic-2", 2001.0, record("resume", "ic-2"))
    with pytest.raises(NotFound):
        await store.lift_hold("nope", "ic-2", 2001.0, record("resume", "ic-2"))
    status = AgentStatus(
        first_seen=1.0,
        last_seen=2.0,
        connected=True,
        acked_epoch=2,
        acked_mode=Mode.PAUSED,
        acked_at=2.0,
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
    agent = StoredAgent(
        "a", {"region": "eu"}, Desired(Mode.PAUSED, ("h2",), "leak", 2, 1.5), status
    )
    await store.save_agents([agent])
    await store.close()

    reopened = await SqliteStore.open(data_dir)
    state = await reopened.load()
    assert state.epoch == 3
    assert [(h.id, h.active) for h in state.holds] == [("h1", False), ("h2", True)]
    assert state.holds[0].scope == Scope.selector({"region": "eu"})
    assert state.holds[0].lifted_by == "ic-2"
    assert state.holds[1].scope.agent_ids == frozenset({"a", "b"})
    (loaded,) = state.agents
    assert loaded.desired == agent.desired
    assert loaded.status.acked_epoch == 2 and loaded.status.channels == {"screen": False}
    assert loaded.status.connected is False, "nobody is connected to a process that just started"
    # Evidence survives a restart: a violation never clears by itself.
    expected = dataclasses.replace(status, connected=False, disconnected_at=None)
    assert loaded.status == expected
    # Epochs keep going up across restarts, and so does the audit chain.
    h3 = await reopened.create_hold(draft("h3"), record("pause"))
    assert h3.created_epoch == 4
    assert await audit_actions(reopened) == ["pause", "pause", "resume", "pause"]
    await reopened.close()


def test_holds_epochs_and_agents_survive_reopen(tmp_path: Path) -> None:
    asyncio.run(_lifecycle(tmp_path))


def test_database_uses_wal_and_full_sync(tmp_path: Path) -> None:
    async def open_close() -> None:
        store = await SqliteStore.open(tmp_path)
        await store.close()

    asyncio.run(open_close())
    conn = sqlite3.connect(tmp_path / "killswitch.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_newer_schema_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "killswitch.db")
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        asyncio.run(SqliteStore.open(tmp_path))


def test_unwritable_data_dir_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot create data dir"):
        asyncio.run(SqliteStore.open(blocker / "sub"))


def test_version_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "killswitch.db")
    conn.executescript(MIGRATIONS[0])
    conn.execute("PRAGMA user_version=1")
    conn.execute("UPDATE epoch_counter SET epoch = 7")
    conn.commit()
    conn.close()

    async def body(store: SqliteStore) -> None:
        assert (await store.load()).epoch == 7
        assert await store.read_audit(0, 10) == ([], ChainHead(0, GENESIS_HASH))
        hold = await store.create_hold(draft("h1"), record("pause"))
        assert hold.created_epoch == 8

    run_with_store(tmp_path, body)
    conn = sqlite3.connect(tmp_path / "killswitch.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 3
    conn.close()


def test_every_write_chains_its_audit_entries_and_moves_the_head(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
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
        await store.consume_enroll_token("t1", "s", 1000.0)
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
        ]
        entries, head = await store.read_audit(0, 1000)
        assert head == ChainHead(9, entries[-1].hash)
        assert entries[0].record == record("pause", target="h1")

    run_with_store(tmp_path, body)


def test_read_audit_pages_by_seq(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        await store.append_audit([record(f"action-{n}") for n in range(1, 6)])
        page, head = await store.read_audit(after_seq=2, limit=2)
        assert [e.seq for e in page] == [3, 4]
        assert head.seq == 5
        assert (await store.read_audit(after_seq=5, limit=2))[0] == []
        with pytest.raises(InvalidInput, match="limit must be at least 1"):
            await store.read_audit(0, 0)

    run_with_store(tmp_path, body)


def test_refused_lift_changes_nothing_and_appends_no_audit_entry(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
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
        assert (await store.load()).epoch == 2, "refused writes allocate no epoch"

    run_with_store(tmp_path, body)


def test_a_failed_audit_append_rolls_back_the_state_change(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        await store.create_hold(draft("h1"), record("pause"))
        # Another connection makes the next audit insert fail, after the hold insert ran.
        side = sqlite3.connect(tmp_path / "killswitch.db")
        side.execute(
            "CREATE TRIGGER fail_audit BEFORE INSERT ON audit_log"
            " BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
        )
        side.close()
        with pytest.raises(StoreError, match="disk on fire"):
            await store.create_hold(draft("h2"), record("pause"))
        with pytest.raises(StoreError, match="disk on fire"):
            await store.lift_hold("h1", "ic-1", 2000.0, record("resume"))
        state = await store.load()
        assert [(h.id, h.active) for h in state.holds] == [("h1", True)]
        assert state.epoch == 1
        assert (await store.read_audit(0, 100))[1].seq == 1

    run_with_store(tmp_path, body)


def test_execute_resume_lifts_and_records_the_request_in_one_step(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
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
        (stored,) = (await store.load()).resume_requests
        assert stored == dataclasses.replace(request, state=ResumeState.EXECUTED, lifted_epoch=2)

        before = await store.read_audit(0, 100)
        with pytest.raises(Conflict, match="already lifted"):
            await store.execute_resume(request, 2001.0, record("resume"))
        other = dataclasses.replace(request, id="resume-2", hold_id="nope")
        with pytest.raises(NotFound, match="unknown hold 'nope'"):
            await store.execute_resume(other, 2001.0, record("resume"))
        assert await store.read_audit(0, 100) == before
        assert [r.id for r in (await store.load()).resume_requests] == ["resume-1"]

    run_with_store(tmp_path, body)


def test_requests_and_revocations_survive_reopen(tmp_path: Path) -> None:
    async def write(store: SqliteStore) -> None:
        await store.create_hold(draft("h1"), record("pause"))
        await store.save_resume_request(resume_request("h1"), record("resume_requested"))
        edited = dataclasses.replace(resume_request("h1"), revision=3, approvals=())
        await store.save_resume_request(edited, record("resume_edited"))
        await store.record_certificate(certificate("01", "sre-1"), record("cert_issued"))
        await store.record_certificate(certificate("02", "sre-2"), record("cert_issued"))
        await store.revoke_certificates("02", 1500.0, record("cert_revoked"))

    async def read(store: SqliteStore) -> None:
        state = await store.load()
        assert state.resume_requests == [
            dataclasses.replace(resume_request("h1"), revision=3, approvals=())
        ]
        assert state.revoked_serials == {"02"}
        assert [c.revoked_at for c in await store.list_certificates()] == [None, 1500.0]

    run_with_store(tmp_path, write)
    run_with_store(tmp_path, read)


def test_approvals_round_trip(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        await store.save_resume_request(resume_request("h1"), record("resume_requested"))
        (loaded,) = (await store.load()).resume_requests
        assert loaded == resume_request("h1")

    run_with_store(tmp_path, body)


def test_enroll_token_uses_are_taken_one_at_a_time(tmp_path: Path) -> None:
    token = EnrollToken("t1", hash_secret("right"), 2, 5000.0, "sre-1", 1000.0)

    async def uses_left(store: SqliteStore) -> int:
        def read() -> int:
            conn = sqlite3.connect(tmp_path / "killswitch.db")
            try:
                return int(conn.execute("SELECT uses_left FROM enroll_tokens").fetchone()[0])
            finally:
                conn.close()

        return await asyncio.to_thread(read)

    async def body(store: SqliteStore) -> None:
        await store.create_enroll_token(token, record("token_created"))
        with pytest.raises(Conflict, match="enrolment token 't1' already exists"):
            await store.create_enroll_token(token, record("token_created"))
        await store.consume_enroll_token("t1", "right", 1000.0)
        assert await uses_left(store) == 1

        async def refusal(token_id: str, secret: str, now: float) -> str:
            with pytest.raises(PermissionDenied) as refused:
                await store.consume_enroll_token(token_id, secret, now)
            return str(refused.value)

        assert await refusal("t1", "wrong", 1000.0) == "unknown enrolment token"
        assert await refusal("t9", "right", 1000.0) == "unknown enrolment token"
        assert await refusal("t1", "right", 5000.0) == "enrolment token expired"
        assert await uses_left(store) == 1, "refusals take no use"
        await store.consume_enroll_token("t1", "right", 1000.0)
        assert await refusal("t1", "right", 1000.0) == "enrolment token has no uses left"
        assert await uses_left(store) == 0

    run_with_store(tmp_path, body)


def test_revocation_by_serial_and_by_subject(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
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
        assert (await store.load()).revoked_serials == {"01", "02", "03"}
        assert await audit_actions(store) == ["cert_revoked", "cert_revoked"]

    run_with_store(tmp_path, body)


def test_triggers_keep_the_audit_log_append_only(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        await store.append_audit([record("one"), record("two")])

    run_with_store(tmp_path, body)
    conn = sqlite3.connect(tmp_path / "killswitch.db")
    with pytest.raises(sqlite3.IntegrityError, match="entries cannot be changed"):
        conn.execute("UPDATE audit_log SET actor = 'someone-else' WHERE seq = 1")
    with pytest.raises(sqlite3.IntegrityError, match="entries cannot be deleted"):
        conn.execute("DELETE FROM audit_log WHERE seq = 2")
    with pytest.raises(sqlite3.IntegrityError, match="seq already written"):
        conn.execute("INSERT OR REPLACE INTO audit_log SELECT * FROM audit_log WHERE seq = 1")
    with pytest.raises(sqlite3.IntegrityError, match="only moves forward"):
        conn.execute("UPDATE audit_head SET seq = 1")
    assert conn.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 2
    conn.close()


def test_appended_entries_are_logged_after_commit_only(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
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

    run_with_store(tmp_path, body)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_data_dir_and_database_files_are_owner_only(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "data"

    async def body(store: SqliteStore) -> None:
        await store.create_hold(draft("h1"), record("pause"))
        assert mode(data_dir) == 0o700
        for name in ("killswitch.db", "killswitch.db-wal", "killswitch.db-shm"):
            assert mode(data_dir / name) == 0o600, name

    run_with_store(data_dir, body)


def test_loose_existing_permissions_are_tightened_with_a_warning(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    db_file = data_dir / "killswitch.db"
    db_file.touch()
    db_file.chmod(0o644)

    async def body(store: SqliteStore) -> None:
        assert (mode(data_dir), mode(db_file)) == (0o700, 0o600)

    with structlog.testing.capture_logs() as logs:
        run_with_store(data_dir, body)
    warnings = [(line["path"], line["was"]) for line in logs if line["log_level"] == "warning"]
    assert warnings == [(str(data_dir), "755"), (str(db_file), "644")]


def test_a_run_step_commits_its_hold_changes_under_one_epoch(tmp_path: Path) -> None:
    """Take-over: lift the approved hold, create the rollout hold, consume the request."""
    book = Runbook("staged", "seed", (Wave("1%", share=100), Wave("all", share=FULL_SHARE)))
    run = new_run(
        book, file_name="f.yaml", source="name: staged", started_by="ic-1", now=1.0, epoch=1
    )
    rollout = dataclasses.replace(
        draft("h-rollout"), kind=HoldKind.ROLLOUT, release=book.release_through(0)
    )

    async def body(store: SqliteStore) -> None:
        await store.create_hold(draft("h1"), record("pause"))
        request = resume_request("h1")
        started = start_wave(run, 0, now=2.0)
        change = RunChange(
            started,
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
        with pytest.raises(Conflict, match="already lifted"):
            await store.commit_run(change, [record("runbook.start")])
        assert await store.read_audit(0, 100) == before
        # Widening the release is a step of its own, with its own epoch.
        widened = await store.commit_run(
            RunChange(
                started, "control-plane", 3.0, release=("h-rollout", book.release_through(1))
            ),
            [],
        )
        assert widened.epoch == 3
        state = await store.load()
        assert state.runs == [started]
        holds = {h.id: h for h in state.holds}
        assert holds["h-rollout"].release == book.release_through(1)
        assert holds["h1"].lifted_by == "automation-1"
        (stored_request,) = state.resume_requests
        assert (stored_request.state, stored_request.lifted_epoch) == (ResumeState.EXECUTED, 2)
        assert await audit_actions(store) == ["pause", "runbook.start"]

    run_with_store(tmp_path, body)
