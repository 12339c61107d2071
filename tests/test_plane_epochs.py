"""Epochs never go backwards on a replica, and leases follow how current its view is.

Two planes on one PostgreSQL database stand for two replicas: A commits, B has not
heard yet (no resync runs in these tests), exactly the window of issue 13's breaks 1,
2 and 7.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from collections.abc import Callable

import pytest

from control.domain import ComplianceState
from control.domain import Mode
from control.domain import Scope
from control.errors import StoreError
from control.freshness import MAX_VIEW_AGE_SHARE
from control.freshness import SharedView
from control.freshness import resync_seconds
from control.plane import ControlPlane
from control.plane import EpochUnknown
from control.store.postgres import PostgresStore
from tests.fake_clock import FakeClock
from tests.plane_support import IC
from tests.plane_support import REPORT
from tests.plane_support import STOPPED
from tests.plane_support import Session
from tests.plane_support import connect_agent
from tests.plane_support import two_planes

TTL = 60.0


# ---------------------------------------------------------------- the view's age


def test_a_lease_ends_one_ttl_after_the_view_it_was_granted_on() -> None:
    tick = FakeClock()
    view = SharedView(TTL, sole_writer=False, monotonic=tick)
    assert view.stale, "never read: no lease"
    view.adopted(view.read_starting())
    assert view.lease_seconds() == TTL and not view.stale
    tick.now += 10
    assert view.lease_seconds() == TTL - 10
    tick.now += TTL * MAX_VIEW_AGE_SHARE - 10 + 0.1
    assert view.stale and "no leases" in view.describe_staleness()
    view.adopted(view.read_starting())
    assert not view.stale


def test_an_older_read_never_makes_the_view_look_newer() -> None:
    tick = FakeClock()
    view = SharedView(TTL, sole_writer=False, monotonic=tick)
    early = view.read_starting()
    tick.now += 5
    view.adopted(view.read_starting())
    view.adopted(early)  # a slow read that finished last
    assert view.age() == 0.0


def test_a_sole_writer_is_always_current_and_resyncs_scale_with_the_ttl() -> None:
    assert SharedView(TTL, sole_writer=True, monotonic=FakeClock()).lease_seconds() == TTL
    assert resync_seconds(60.0) == 5.0
    assert resync_seconds(6.0) == 0.5, "a short TTL re-reads often enough to keep leasing"


# ---------------------------------------------------------------- two replicas


def two_replicas(
    pg_dsn: str, body: Callable[[ControlPlane, ControlPlane], Awaitable[None]]
) -> None:
    async def main() -> None:
        store_a, store_b = await PostgresStore.open(pg_dsn), await PostgresStore.open(pg_dsn)
        async with two_planes(store_a, store_b, lease_ttl=TTL) as (plane_a, plane_b):
            await body(plane_a, plane_b)

    asyncio.run(main())


def test_a_lagging_replica_catches_up_before_serving_an_agent_that_saw_a_pause(
    pg_dsn: str,
) -> None:
    """Break 1: the laptop acked a pause on A; B, which has not read it, must not tell
    it ALLOWED at an older epoch."""

    async def body(plane_a: ControlPlane, plane_b: ControlPlane) -> None:
        connect_agent(plane_a, "laptop")
        hold, _ = await plane_a.create_hold(Scope.fleet(), "leak", "INC-1", IC)
        plane_a.ack("laptop", hold.created_epoch, Mode.PAUSED, STOPPED, REPORT)
        await plane_a.flush()
        assert plane_b.epoch == 0, "B has heard nothing yet"

        await plane_b.resync_agent("laptop")
        await plane_b.catch_up_to("laptop", hold.created_epoch)
        assert plane_b.epoch == hold.created_epoch
        session = Session(plane_b, "laptop")
        plane_b.connect("laptop", {}, session)
        directive = plane_b.directive_for("laptop")
        assert (directive.epoch, directive.desired.mode) == (hold.created_epoch, Mode.PAUSED)
        assert not plane_b.grant_lease("laptop").granted

    two_replicas(pg_dsn, body)


def test_the_stored_row_alone_makes_a_replica_catch_up(pg_dsn: str) -> None:
    """A restarted agent reports epoch 0; the row its old replica wrote still knows."""

    async def body(plane_a: ControlPlane, plane_b: ControlPlane) -> None:
        connect_agent(plane_a, "laptop")
        hold, _ = await plane_a.create_hold(Scope.fleet(), "leak", "", IC)
        await plane_a.flush()
        await plane_b.resync_agent("laptop")
        await plane_b.catch_up_to("laptop", 0)
        assert plane_b.epoch == hold.created_epoch

    two_replicas(pg_dsn, body)


def test_a_replica_that_cannot_catch_up_refuses_the_agent(pg_dsn: str) -> None:
    async def body(plane_a: ControlPlane, plane_b: ControlPlane) -> None:
        with pytest.raises(EpochUnknown, match="agent has seen epoch 7"):
            await plane_b.catch_up_to("laptop", 7)  # no epoch 7 anywhere: a liar or a restore
        connect_agent(plane_a, "laptop")
        hold, _ = await plane_a.create_hold(Scope.fleet(), "leak", "", IC)

        async def unreachable() -> None:
            raise StoreError("connection lost")

        plane_b._store.load_shared = unreachable  # type: ignore[method-assign,assignment]
        with pytest.raises(StoreError):
            await plane_b.catch_up_to("laptop", hold.created_epoch)
        assert plane_b.epoch == 0

    two_replicas(pg_dsn, body)


def test_after_a_failover_an_honest_agent_acking_here_is_not_overdue(pg_dsn: str) -> None:
    """Break 2: the row says epoch N from A; the ack on B's stream counts against what B
    sent, and an ack for an epoch B never sent on this stream counts for nothing."""

    async def body(plane_a: ControlPlane, plane_b: ControlPlane) -> None:
        connect_agent(plane_a, "laptop")
        hold, _ = await plane_a.create_hold(Scope.fleet(), "leak", "", IC)
        plane_a.ack("laptop", hold.created_epoch, Mode.PAUSED, STOPPED, REPORT)
        await plane_a.flush()

        await plane_b.resync_agent("laptop")
        await plane_b.catch_up_to("laptop", hold.created_epoch)
        session = Session()  # connected, no directive sent yet on this stream
        plane_b.connect("laptop", {}, session)
        plane_b.ack("laptop", hold.created_epoch, Mode.PAUSED, STOPPED, REPORT)
        view = plane_b.agent_view("laptop")
        assert view is not None and view.compliance.state is ComplianceState.PENDING
        plane_b.directive_sent("laptop", plane_b.directive_for("laptop").epoch)
        plane_b.ack("laptop", hold.created_epoch, Mode.PAUSED, STOPPED, REPORT)
        view = plane_b.agent_view("laptop")
        assert view is not None and view.compliance.state is ComplianceState.STOP_REPORTED

    two_replicas(pg_dsn, body)


def test_a_replica_never_recomputes_an_agent_from_holds_older_than_its_row(
    pg_dsn: str,
) -> None:
    async def body(plane_a: ControlPlane, plane_b: ControlPlane) -> None:
        connect_agent(plane_a, "laptop")
        hold, _ = await plane_a.create_hold(Scope.fleet(), "leak", "", IC)
        await plane_a.flush()
        await plane_b.resync_agent("laptop")  # the row, without the holds behind it
        view = plane_b.agent_view("laptop")
        assert view is not None
        assert (view.desired.mode, view.desired.epoch) == (Mode.PAUSED, hold.created_epoch)

    two_replicas(pg_dsn, body)


def test_a_stale_view_grants_no_lease_and_sends_agents_elsewhere(pg_dsn: str) -> None:
    """Break 7: resyncs that keep failing while beats succeed stop the leases."""

    async def body(plane_a: ControlPlane, plane_b: ControlPlane) -> None:
        tick = FakeClock()
        plane_b.membership.view = SharedView(TTL, sole_writer=False, monotonic=tick)
        plane_b.view.adopted(plane_b.view.read_starting())
        connect_agent(plane_b, "laptop")
        tick.now += 10
        lease = plane_b.grant_lease("laptop")
        assert lease.granted and lease.ttl == TTL - 10
        tick.now += TTL * MAX_VIEW_AGE_SHARE
        lease = plane_b.grant_lease("laptop")
        assert not lease.granted and "view of the holds" in lease.reason
        assert not plane_b.leasing and "no leases" in plane_b.why_not_leasing()
        assert plane_b.sent_elsewhere_because().endswith("connect to another replica")

    two_replicas(pg_dsn, body)
