"""Violation evidence through the plane: durable, shared by every replica, sticky.

The two-replica tests run two ``ControlPlane``s on one PostgreSQL database; what the
replication loops do (``adopt_agents`` the rows others wrote, ``adopt_violations`` from the
shared state) is called by hand, so each step of a sync is visible.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from control.domain import CaptureReport
from control.domain import ComplianceState
from control.domain import Mode
from control.domain import Scope
from control.domain.audit import AuditRecord
from control.errors import StoreError
from control.plane import ControlPlane
from control.store import Store
from control.store import ViolationEvidence
from control.store.postgres import PostgresStore
from tests.fake_clock import FakeClock
from tests.plane_support import IC
from tests.plane_support import STOPPED
from tests.plane_support import RecordingStore
from tests.plane_support import connect_agent
from tests.plane_support import two_planes

FROZEN = CaptureReport(events_total=10)
MOVED = CaptureReport(events_total=20)


def state_of(plane: ControlPlane, agent_id: str = "laptop") -> ComplianceState:
    view = plane.agent_view(agent_id)
    assert view is not None, f"{plane.replica_id} does not know {agent_id}"
    return view.compliance.state


async def violation_audits(store: Store) -> list[str]:
    entries, _ = await store.read_audit(0, 1000)
    return [e.record.target for e in entries if e.record.action == "agent.violation"]


async def resync_agents(plane: ControlPlane, store: Store) -> None:
    """One round of ``Replication.resync_agents``: every row the other replicas wrote."""
    plane.adopt_agents(await store.agents_written_since("", plane.replica_id))


async def resync(plane: ControlPlane, store: Store) -> None:
    """A resync's plane half (what a NOTIFY or the timer triggers)."""
    read_started = plane.view.read_starting()
    shared = await store.load_shared()
    await plane.adopt_holds(shared.epoch, shared.holds, read_started)
    plane.adopt_violations(shared.violation_acks, shared.violations)


@asynccontextmanager
async def two_replicas(
    dsn: str, clock: FakeClock
) -> AsyncIterator[tuple[ControlPlane, PostgresStore, ControlPlane, PostgresStore]]:
    """Replicas a and b on one clock, with their stores (to sync by hand)."""
    store_a, store_b = await PostgresStore.open(dsn), await PostgresStore.open(dsn)
    async with two_planes(store_a, store_b, clock) as (plane_a, plane_b):
        yield plane_a, store_a, plane_b, store_b


async def paused_on_a(
    plane_a: ControlPlane, store_a: Store, plane_b: ControlPlane, store_b: Store, clock: FakeClock
) -> float:
    """The laptop streams to A, acks a fleet pause there; B adopts its row. Returns
    when the stop took effect."""
    connect_agent(plane_a, "laptop")
    await plane_a.create_hold(Scope.fleet(), "leak", "", IC)
    clock.now += 1
    plane_a.ack("laptop", plane_a.epoch, Mode.PAUSED, STOPPED, FROZEN)
    await plane_a.flush()
    await store_a.beat(plane_a.replica_id)
    await resync(plane_b, store_b)
    await resync_agents(plane_b, store_b)
    assert state_of(plane_b) is ComplianceState.STOP_REPORTED
    return clock.now


def test_an_upload_check_on_a_replica_not_serving_the_agent_flags_it_everywhere(
    pg_dsn: str,
) -> None:
    clock = FakeClock()

    async def main() -> None:
        async with two_replicas(pg_dsn, clock) as (plane_a, store_a, plane_b, store_b):
            stopped = await paused_on_a(plane_a, store_a, plane_b, store_b, clock)
            clock.now += 20
            # The lying laptop's ingest asks B about a batch captured after its stop.
            decision = plane_b.authorize_upload("laptop", stopped + 1, stopped + 15, 7)
            assert not decision.allowed
            assert state_of(plane_b) is ComplianceState.VIOLATION
            await plane_b.flush()
            # A writes its row (a heartbeat) before it has re-read: B adopts a row
            # without the violation, which must not wipe what B saw.
            clock.now += 11
            plane_a.heartbeat("laptop", STOPPED, FROZEN)
            await plane_a.flush()
            await resync_agents(plane_b, store_b)
            assert state_of(plane_b) is ComplianceState.VIOLATION
            # A's next sync shows it, and A's row carries it from then on.
            await resync(plane_a, store_a)
            assert state_of(plane_a) is ComplianceState.VIOLATION
            view = plane_a.agent_view("laptop")
            assert view is not None and "upload of 7 events" in view.status.violation
            assert await violation_audits(store_a) == ["laptop"], "one entry, by B"

        # Both restart: the evidence is in the database, not only in their memory.
        async with two_replicas(pg_dsn, clock) as (plane_a, _, plane_b, _):
            assert state_of(plane_a) is ComplianceState.VIOLATION
            assert state_of(plane_b) is ComplianceState.VIOLATION

    asyncio.run(main())


class FailingWrites(RecordingStore):
    """The real SQLite store whose writes fail while ``fail_writes`` is set."""

    evidence_writes = 0

    async def record_violations(
        self, found: Sequence[tuple[ViolationEvidence, AuditRecord]]
    ) -> None:
        if self.fail_writes:
            raise StoreError("disk full")
        self.evidence_writes += 1
        await super().record_violations(found)


def run_sqlite(
    tmp_path: Path, body: Callable[[ControlPlane, FailingWrites, FakeClock], Awaitable[None]]
) -> None:
    async def main() -> None:
        store = await FailingWrites.open(tmp_path)
        clock = FakeClock()
        plane = ControlPlane(store, clock=clock, flush_interval=3600, replica_id="me")
        await plane.start()
        try:
            await body(plane, store, clock)
        finally:
            store.fail_writes = False
            await plane.stop()
            await store.close()

    asyncio.run(main())


async def restarted(tmp_path: Path, clock: FakeClock) -> ComplianceState:
    store = await RecordingStore.open(tmp_path)
    plane = ControlPlane(store, clock=clock, flush_interval=3600, replica_id="again")
    await plane.start()
    try:
        return state_of(plane)
    finally:
        await plane.stop()
        await store.close()


def test_a_violation_flagged_while_writes_fail_is_written_once_they_work(tmp_path: Path) -> None:
    async def body(plane: ControlPlane, store: FailingWrites, clock: FakeClock) -> None:
        connect_agent(plane, "laptop")
        await plane.create_hold(Scope.fleet(), "leak", "", IC)
        plane.ack("laptop", plane.epoch, Mode.PAUSED, STOPPED, FROZEN)
        await plane.flush()
        store.fail_writes = True
        clock.now += 11
        plane.heartbeat("laptop", STOPPED, MOVED)
        assert state_of(plane) is ComplianceState.VIOLATION
        for _ in range(3):
            with pytest.raises(StoreError, match="disk full"):
                await plane.flush()
        assert (await store.load_shared()).violations == []
        store.fail_writes = False
        await plane.flush()
        await plane.flush()
        (stored,) = (await store.load_shared()).violations
        assert (stored.agent_id, stored.detected_by) == ("laptop", "me")
        assert "rose from 10 to 20" in stored.evidence
        assert await violation_audits(store) == ["laptop"]
        assert store.evidence_writes == 1, "written once, then nothing left to write"
        assert await restarted(tmp_path, clock) is ComplianceState.VIOLATION

    run_sqlite(tmp_path, body)


def test_evidence_seen_by_a_replica_whose_writes_fail_outlives_its_syncs(pg_dsn: str) -> None:
    clock = FakeClock()

    class Flaky(PostgresStore):
        fail = False

        async def record_violations(
            self, found: Sequence[tuple[ViolationEvidence, AuditRecord]]
        ) -> None:
            if self.fail:
                raise StoreError("connection refused")
            await super().record_violations(found)

    async def main() -> None:
        store_a, store_b = await PostgresStore.open(pg_dsn), await Flaky.open(pg_dsn)
        async with two_planes(store_a, store_b, clock) as (plane_a, plane_b):
            stopped = await paused_on_a(plane_a, store_a, plane_b, store_b, clock)
            store_b.fail = True
            clock.now += 20
            plane_b.authorize_upload("laptop", stopped + 1, stopped + 15, 7)
            with pytest.raises(StoreError):
                await plane_b.flush()
            clock.now += 11
            plane_a.heartbeat("laptop", STOPPED, FROZEN)
            await plane_a.flush()
            await resync_agents(plane_b, store_b)
            await resync(plane_b, store_b)
            assert state_of(plane_b) is ComplianceState.VIOLATION, "pending, not wiped"
            store_b.fail = False
            await plane_b.flush()
            await resync(plane_a, store_a)
            assert state_of(plane_a) is ComplianceState.VIOLATION

    asyncio.run(main())


def test_a_second_covering_holds_ack_is_compared_with_the_first_stop(tmp_path: Path) -> None:
    async def body(plane: ControlPlane, store: FailingWrites, clock: FakeClock) -> None:
        connect_agent(plane, "laptop")
        await plane.create_hold(Scope.fleet(), "leak", "", IC)
        plane.ack("laptop", plane.epoch, Mode.PAUSED, STOPPED, FROZEN)
        clock.now += 11
        plane.heartbeat("laptop", STOPPED, FROZEN)
        assert state_of(plane) is ComplianceState.VERIFIED_STOPPED
        await plane.flush()
        # The server restarts (or the laptop fails over): the first stop is stored.
        await plane.stop()
        plane = ControlPlane(store, clock=clock, flush_interval=3600, replica_id="next")
        await plane.start()
        try:
            connect_agent(plane, "laptop")
            clock.now += 5
            await plane.create_hold(Scope.selector({"org": "finance"}), "wider", "", IC)
            await plane.create_hold(Scope.agents(["laptop"]), "second", "", IC)
            plane.ack("laptop", plane.epoch, Mode.PAUSED, STOPPED, MOVED)
            assert state_of(plane) is ComplianceState.VIOLATION
            view = plane.agent_view("laptop")
            assert view is not None and "rose from 10 to 20" in view.status.violation
        finally:
            await plane.stop()

    run_sqlite(tmp_path, body)


def test_only_an_acknowledgement_clears_it_and_later_evidence_flags_again(pg_dsn: str) -> None:
    clock = FakeClock()

    async def main() -> None:
        async with two_replicas(pg_dsn, clock) as (plane_a, store_a, plane_b, store_b):
            stopped = await paused_on_a(plane_a, store_a, plane_b, store_b, clock)
            clock.now += 20
            plane_b.authorize_upload("laptop", stopped + 1, stopped + 15, 7)
            await plane_b.flush()
            await resync(plane_a, store_a)
            # Rows, heartbeats, syncs and restarts of the serving replica never clear it.
            for _ in range(2):
                clock.now += 11
                plane_a.heartbeat("laptop", STOPPED, FROZEN)
                await plane_a.flush()
                await resync_agents(plane_b, store_b)
                await resync(plane_a, store_a)
                await resync(plane_b, store_b)
                assert state_of(plane_a) is state_of(plane_b) is ComplianceState.VIOLATION
            # The operator acknowledges it on A; B clears it at its next sync.
            await plane_a.acknowledge_violation("laptop", IC, "checked the laptop")
            assert state_of(plane_a) is not ComplianceState.VIOLATION
            await resync(plane_b, store_b)
            assert state_of(plane_b) is not ComplianceState.VIOLATION
            await plane_a.flush()
            await resync_agents(plane_b, store_b)
            assert state_of(plane_b) is not ComplianceState.VIOLATION
            # The laptop lies again: new evidence, a new violation, on both.
            clock.now += 5
            plane_b.authorize_upload("laptop", stopped + 1, clock.now - 1, 3)
            await plane_b.flush()
            await resync(plane_a, store_a)
            assert state_of(plane_a) is state_of(plane_b) is ComplianceState.VIOLATION
            view = plane_a.agent_view("laptop")
            assert view is not None and "upload of 3 events" in view.status.violation

    asyncio.run(main())
