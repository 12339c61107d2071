"""ControlPlane showing agents another replica serves, from the rows it writes.

The rows and beats come in as ``AgentChanges`` (what the PostgreSQL store reads back);
the plane under test runs on a real SQLite store, which records what it writes.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable
from collections.abc import Callable
from pathlib import Path

from control.domain import AgentStatus
from control.domain import ComplianceState
from control.domain import Desired
from control.domain import Mode
from control.domain import Scope
from control.domain.approvals import ResumeState
from control.domain.identity import Principal
from control.domain.identity import Role
from control.errors import StoreError
from control.governance import Governance
from control.plane import REPLICA_SILENT_BEATS
from control.plane import ControlPlane
from control.store import AgentChanges
from control.store import StoredAgent
from control.store.postgres import PostgresStore
from tests.agent_support import wait_until
from tests.fake_clock import FakeClock
from tests.plane_support import IC
from tests.plane_support import REPORT
from tests.plane_support import STOPPED
from tests.plane_support import RecordingStore
from tests.plane_support import Session
from tests.plane_support import connect_agent
from tests.plane_support import run_plane
from tests.plane_support import two_planes

APPROVER = Principal("approver-1", Role.APPROVER, serial="02")

PROBE = 2.0
SILENCE = 31.0  # CompliancePolicy's default: 3 heartbeats of 10 s, plus 1 s


def remote_row(
    agent_id: str,
    by: str,
    at: float,
    *,
    connected: bool = True,
    last_seen: float | None = None,
    violation: str = "",
    mode: Mode = Mode.ALLOWED,
) -> StoredAgent:
    """A row as the serving replica writes it at ``at``: streaming, capturing."""
    status = AgentStatus(
        first_seen=at - 100,
        last_seen=at if last_seen is None else last_seen,
        connected=connected,
        connected_at=at - 100,
        disconnected_at=None if connected else at,
        acked_epoch=0,
        acked_mode=mode,
        acked_at=at - 99,
        acked_since_connect=True,
        channels={"screen": mode is Mode.ALLOWED},
        # Rows carry the lease one TTL ahead of its real expiry (``lease_bound_saved``).
        lease_expires_at=at + 120,
        violation=violation,
        violation_at=at - 1 if violation else None,
    )
    return StoredAgent(
        agent_id, {"owner": "erin"}, Desired(Mode.ALLOWED, (), "", 0, at - 100), status, by, at
    )


def run(
    tmp_path: Path, body: Callable[[ControlPlane, RecordingStore, FakeClock], Awaitable[None]]
) -> None:
    run_plane(tmp_path, body, store_probe_interval=PROBE, replica_id="me")


def state_of(plane: ControlPlane, agent_id: str) -> ComplianceState:
    view = plane.agent_view(agent_id)
    assert view is not None
    return view.compliance.state


def test_an_agent_served_elsewhere_is_live_while_its_replica_beats(tmp_path: Path) -> None:
    async def body(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        plane.adopt_agents(AgentChanges([remote_row("a", "r2", clock.now)], {"r2": 0.5}, "1"))
        assert state_of(plane, "a") is ComplianceState.CAPTURING
        # A minute on, its row unchanged (liveness is written rarely): r2's beat vouches.
        clock.now += 60
        plane.adopt_agents(AgentChanges([], {"r2": 1.0}, "2"))
        assert state_of(plane, "a") is ComplianceState.CAPTURING
        view = plane.agent_view("a")
        assert view is not None and view.status.last_seen == clock.now - 1.0
        # r2 stops beating: its streams are gone, as of its last beat.
        clock.now += 20
        plane.adopt_agents(AgentChanges([], {"r2": 21.0}, "3"))
        view = plane.agent_view("a")
        assert view is not None and view.compliance.state is ComplianceState.OFFLINE
        assert view.status.disconnected_at == clock.now - 21.0
        assert REPLICA_SILENT_BEATS * PROBE < 21.0
        assert store.batches == [], "nothing of another replica's agent is written here"

    run(tmp_path, body)


def test_a_row_that_shows_a_silent_stream_stays_silent(tmp_path: Path) -> None:
    async def body(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        row = remote_row("a", "r2", clock.now, last_seen=clock.now - SILENCE - 5)
        plane.adopt_agents(AgentChanges([row], {"r2": 0.5}, "1"))
        view = plane.agent_view("a")
        assert view is not None and view.compliance.state is ComplianceState.OFFLINE
        assert "silent" in view.compliance.reason

    run(tmp_path, body)


def test_a_pause_is_reconciled_for_remote_agents_but_written_by_their_replica(
    tmp_path: Path,
) -> None:
    async def body(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        connect_agent(plane, "local")
        plane.adopt_agents(AgentChanges([remote_row("a", "r2", clock.now)], {"r2": 0.5}, "1"))
        await plane.create_hold(Scope.fleet(), "leak", "", IC)
        await plane.flush()
        assert set(store.agents) == {"local"}
        assert state_of(plane, "a") is ComplianceState.PENDING, "told to pause, not acked yet"
        # r2 writes the ack and the verified stop; this replica shows them.
        hold_epoch = plane.epoch
        acked = remote_row("a", "r2", clock.now + 1, mode=Mode.PAUSED)
        status = dataclasses.replace(
            acked.status, acked_epoch=hold_epoch, verified_at=clock.now + 1, channels={}
        )
        desired = dataclasses.replace(acked.desired, mode=Mode.PAUSED, epoch=hold_epoch)
        row = dataclasses.replace(acked, status=status, desired=desired)
        clock.now += 1
        plane.adopt_agents(AgentChanges([row], {"r2": 0.2}, "2"))
        assert state_of(plane, "a") is ComplianceState.VERIFIED_STOPPED

    run(tmp_path, body)


def test_rows_never_override_a_stream_served_here_or_a_newer_one(tmp_path: Path) -> None:
    async def body(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        session = Session()
        plane.connect("a", {}, session)
        plane.adopt_agents(AgentChanges([remote_row("a", "r2", clock.now + 5)], {"r2": 0.5}, "1"))
        view = plane.agent_view("a")
        assert view is not None and view.status.connected_at == clock.now, "served here"
        # Once the stream here has ended, a newer stream elsewhere is the truth...
        plane.disconnect("a", session)
        clock.now += 200
        plane.adopt_agents(AgentChanges([remote_row("a", "r2", clock.now)], {"r2": 0.5}, "2"))
        assert state_of(plane, "a") is ComplianceState.CAPTURING
        # ...and an older row of a stream that has since moved here again is not.
        connect_agent(plane, "a")
        stale = remote_row("a", "r3", clock.now - 50)
        plane.adopt_agents(AgentChanges([stale], {"r2": 0.5, "r3": 0.5}, "3"))
        view = plane.agent_view("a")
        assert view is not None and view.status.connected_at == clock.now

    run(tmp_path, body)


def test_an_agent_failing_over_here_brings_its_stored_history(tmp_path: Path) -> None:
    async def body(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        row = remote_row("a", "r2", clock.now, violation="screen active after pause")
        await store.save_agents([row])
        plane.adopt_agents(AgentChanges([row], {"r2": 0.5}, "1"))
        await plane.resync_agent("a")
        connect_agent(plane, "a")
        view = plane.agent_view("a")
        assert view is not None and view.compliance.state is ComplianceState.VIOLATION
        assert view.status.connected_at == clock.now
        await plane.flush()
        assert store.agents["a"].written_by == "me"

    run(tmp_path, body)


def test_acknowledging_a_remote_violation_clears_it_everywhere(tmp_path: Path) -> None:
    async def body(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        row = remote_row("a", "r2", clock.now, violation="screen active after pause")
        plane.adopt_agents(AgentChanges([row], {"r2": 0.5}, "1"))
        assert state_of(plane, "a") is ComplianceState.VIOLATION
        await plane.acknowledge_violation("a", IC, "false alarm, checked the laptop")
        assert state_of(plane, "a") is ComplianceState.CAPTURING
        # r2 has not re-read yet: its row still has the evidence, which stays cleared here.
        plane.adopt_agents(AgentChanges([row], {"r2": 0.5}, "2"))
        assert state_of(plane, "a") is ComplianceState.CAPTURING
        assert (await store.load_shared()).violation_acks == {"a": row.status.violation_at}
        # Evidence flagged after the acknowledgment is a new violation.
        newer = remote_row("a", "r2", clock.now + 10, violation="spool grew")
        plane.adopt_agents(AgentChanges([newer], {"r2": 0.5}, "3"))
        assert state_of(plane, "a") is ComplianceState.VIOLATION

    run(tmp_path, body)


def test_the_serving_replica_clears_a_violation_acknowledged_elsewhere(tmp_path: Path) -> None:
    async def body(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        connect_agent(plane, "a")
        plane.ack("a", 0, Mode.ALLOWED, STOPPED, REPORT)
        await plane.create_hold(Scope.fleet(), "leak", "", IC)
        plane.ack("a", plane.epoch, Mode.PAUSED, {"screen": True}, REPORT)
        view = plane.agent_view("a")
        assert view is not None and view.compliance.state is ComplianceState.VIOLATION
        flagged_at = view.status.violation_at
        assert flagged_at is not None
        plane.adopt_violations({"a": flagged_at}, [])
        assert state_of(plane, "a") is not ComplianceState.VIOLATION
        await plane.flush()
        assert store.agents["a"].status.violation == ""

    run(tmp_path, body)


def test_a_stream_that_goes_silent_is_written_once_and_its_next_word_at_once(
    tmp_path: Path,
) -> None:
    async def body(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        connect_agent(plane, "a")
        await plane.flush()
        clock.now += SILENCE + 1
        await asyncio.sleep(0.1)  # a few probe rounds
        await plane.flush()
        assert store.batches == [1, 1], "the silence is written, once"
        row = store.agents["a"]
        assert row.written_at is not None and row.status.last_seen is not None
        assert row.written_at - row.status.last_seen > SILENCE
        clock.now += 1
        plane.heartbeat("a", STOPPED, REPORT)
        await plane.flush()
        assert store.batches == [1, 1, 1] and store.agents["a"].status.last_seen == clock.now

    run_plane(tmp_path, body, store_probe_interval=0.02, replica_id="me")


def test_a_replica_never_tells_an_epoch_without_the_holds_before_it(pg_dsn: str) -> None:
    """The race behind a false VIOLATION: B lifts an old hold at epoch 3 while A's new
    pause (epoch 2) has not reached B yet. B must not announce epoch 3 as ALLOWED."""

    async def main() -> None:
        store_a, store_b = await PostgresStore.open(pg_dsn), await PostgresStore.open(pg_dsn)
        async with two_planes(store_a, store_b) as (plane_a, plane_b):
            session = Session()
            plane_b.connect("laptop", {}, session)
            old, _ = await plane_b.create_hold(Scope.fleet(), "old", "", IC)
            read_started = plane_a.view.read_starting()
            shared = await store_a.load_shared()
            await plane_a.adopt_holds(shared.epoch, shared.holds, read_started)
            newer, _ = await plane_a.create_hold(Scope.fleet(), "newer", "", IC)
            lifted = await plane_b.lift_hold(old.id, IC)  # B has not heard of `newer`
            assert (old.created_epoch, newer.created_epoch, lifted.lifted_epoch) == (1, 2, 3)
            assert plane_b.epoch == 3
            directive = plane_b.directive_for("laptop")
            assert (directive.epoch, directive.desired.mode) == (3, Mode.PAUSED)
            assert directive.desired.hold_ids == (newer.id,)
            assert [h.id for h in plane_b.active_holds()] == [newer.id]

    asyncio.run(main())


def test_a_snapshot_read_before_a_commit_here_is_not_adopted_after_it(pg_dsn: str) -> None:
    """A resync that read the holds just before this replica lifted one, and took the
    lock just after, must not bring the lifted hold back."""

    async def main() -> None:
        store = await PostgresStore.open(pg_dsn)
        plane = ControlPlane(store, clock=FakeClock(), flush_interval=3600, replica_id="a")
        try:
            await plane.start()
            hold, _ = await plane.create_hold(Scope.fleet(), "leak", "", IC)
            read_started = plane.view.read_starting()
            stale = await store.load_shared()
            await plane.lift_hold(hold.id, IC)
            assert await plane.adopt_holds(stale.epoch, stale.holds, read_started) == []
            assert plane.active_holds() == [] and plane.epoch == 2
        finally:
            await plane.stop()
            await store.close()

    asyncio.run(main())


def test_a_revocation_made_on_another_replica_closes_the_stream_here(tmp_path: Path) -> None:
    async def body(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        governance = Governance(plane, store, clock=clock, authority=None)
        await governance.start(await store.load())
        laptop, bystander = Session(), Session()
        plane.connect("laptop-1", {}, laptop)
        plane.connect("laptop-2", {}, bystander)
        governance.adopt([], {"0a": "laptop-1"})
        assert laptop.closed == "certificate revoked" and not bystander.closed
        assert governance.is_revoked("0a") and not governance.is_revoked("0b")
        laptop.closed = ""
        governance.adopt([], {"0a": "laptop-1"})  # level-triggered: read again, no effect
        assert laptop.closed == ""

    run(tmp_path, body)


def test_a_shared_read_taken_before_an_approval_here_does_not_undo_it(tmp_path: Path) -> None:
    """The race behind a runbook told "pending" right after its request was approved: a
    re-read of the shared state began before the approval and was adopted after it."""

    async def body(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        governance = Governance(plane, store, clock=clock, authority=None)
        await governance.start(await store.load())
        hold, _ = await plane.create_hold(Scope.fleet(), "leak", "INC-1", IC)
        request = await governance.request_resume(IC, hold.id, "fixed", "INC-1", for_runbook=True)
        stale = await store.load()  # the re-read starts: the request is pending in it
        await governance.approve(APPROVER, request.id, request.revision, "ok")
        governance.adopt(stale.shared.resume_requests, stale.shared.revoked)
        approved = governance.runbook_approval(request.id, hold_id=hold.id)
        assert approved.state is ResumeState.APPROVED
        fresh = await store.load()
        governance.adopt(fresh.shared.resume_requests, fresh.shared.revoked)
        assert governance.requests(request.id)[0].state is ResumeState.APPROVED

    run(tmp_path, body)


class FlakyBeats(RecordingStore):
    """Beats fail while ``down``; ``failed`` counts the failed ones."""

    down = False
    failed = 0

    async def beat(self, replica_id: str) -> None:
        if self.down:
            self.failed += 1
            raise StoreError("connection refused")
        await super().beat(replica_id)


def test_a_lost_database_is_beats_failing_for_a_while_and_sheds_streams_only_with_somewhere_to_go(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        store = await FlakyBeats.open(tmp_path)
        probe = 0.1
        plane = ControlPlane(
            store,
            clock=FakeClock(),
            flush_interval=3600,
            store_probe_interval=probe,
            replica_id="me",
        )
        await plane.start()
        alone, elsewhere = Session(), Session()
        plane.connect("alone", {}, alone)
        try:
            store.down = True
            await wait_until(lambda: store.failed == 1)
            assert plane.store_healthy, "one failed beat is not a lost database"
            await wait_until(lambda: not plane.store_healthy)
            assert not plane.grant_lease("alone").granted
            await wait_until(lambda: store.failed >= REPLICA_SILENT_BEATS + 2)
            assert alone.closed == "" and not plane.hands_off_agents(), "nowhere to go"

            store.down = False
            await wait_until(lambda: plane.store_healthy)
            plane.adopt_agents(AgentChanges([], {"other": 0.01}, "1"))  # another replica beats
            plane.connect("elsewhere", {}, elsewhere)
            store.down = True
            await wait_until(lambda: not plane.store_healthy)
            assert plane.hands_off_agents() and elsewhere.closed == ""
            await wait_until(lambda: elsewhere.closed != "")  # once the others take it for dead
            assert elsewhere.closed.endswith("; connect to another replica"), elsewhere.closed
        finally:
            store.down = False
            await plane.stop()

    asyncio.run(main())


def test_a_stream_here_is_newer_than_the_stored_one_even_with_a_slow_clock(
    tmp_path: Path,
) -> None:
    async def body(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        # The agent's last stream, on a replica whose clock runs 5 s ahead of this one.
        ahead = remote_row("a", "r2", clock.now + 105)
        await store.save_agents([ahead])
        store.sole_writer = False  # another replica's row: a shared database, as PostgreSQL
        await plane.resync_agent("a")
        connect_agent(plane, "a")
        view = plane.agent_view("a")
        assert ahead.status.connected_at is not None and view is not None
        assert view.status.connected_at is not None
        assert view.status.connected_at > ahead.status.connected_at

    run(tmp_path, body)
