"""ControlPlane with an in-memory store: batching, no lost observations, stale acks."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import ClassVar

import pytest

from control.domain import CaptureReport
from control.domain import ComplianceState
from control.domain import Mode
from control.domain import Scope
from control.errors import Conflict
from control.errors import NotFound
from control.errors import StoreError
from control.events import Observers
from control.events import PlaneObserver
from control.plane import AgentFilter
from control.plane import ControlPlane
from control.plane.writer import ACK_ROW_WAIT_SECONDS
from control.store import StoredAgent
from tests.fake_clock import FakeClock
from tests.plane_support import IC
from tests.plane_support import REPORT
from tests.plane_support import SRE
from tests.plane_support import STOPPED
from tests.plane_support import RecordingStore
from tests.plane_support import Session
from tests.plane_support import connect_agent
from tests.plane_support import run_plane
from tests.plane_support import started


def test_a_thousand_acks_are_written_in_one_batch(tmp_path: Path) -> None:
    async def scenario(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        for i in range(1000):
            plane.connect(f"a{i}", {"region": "eu"}, Session(plane, f"a{i}"))
        await plane.flush()
        hold, covered = await plane.create_hold(Scope.fleet(), "leak", "INC-1", IC)
        assert covered == 1000
        for i in range(1000):
            plane.ack(f"a{i}", hold.created_epoch, Mode.PAUSED, STOPPED, REPORT)
        await plane.flush()
        assert store.batches == [1000, 1000]
        assert all(a.status.acked_epoch == hold.created_epoch for a in store.agents.values())

    run_plane(tmp_path, scenario)


def test_a_failed_write_keeps_the_observations_for_the_next_flush(tmp_path: Path) -> None:
    async def scenario(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        connect_agent(plane, "a")
        store.fail_writes = True
        with pytest.raises(StoreError):
            await plane.flush()
        store.fail_writes = False
        await plane.flush()
        assert store.agents["a"].status.first_seen == 1000.0

    run_plane(tmp_path, scenario)


def test_only_affected_sessions_are_notified_and_stale_acks_do_not_count(tmp_path: Path) -> None:
    async def scenario(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        eu, us = Session(plane, "eu-1"), Session(plane, "us-1")
        plane.connect("eu-1", {"region": "eu"}, eu)
        plane.connect("us-1", {"region": "us"}, us)
        assert (eu.notified, us.notified) == (1, 1)
        first, _ = await plane.create_hold(Scope.selector({"region": "eu"}), "x", "", IC)
        assert (eu.notified, us.notified) == (2, 1)
        plane.ack("eu-1", first.created_epoch, Mode.PAUSED, STOPPED, REPORT)
        await plane.lift_hold(first.id, IC)
        await plane.create_hold(Scope.selector({"region": "eu"}), "again", "", IC)
        # The ack of the first pause is older than the second one: still pending.
        (view,) = plane.views(AgentFilter(match_labels={"region": "eu"}))
        assert view.compliance.state is ComplianceState.PENDING
        # An ack naming an epoch the server never issued is ignored.
        plane.ack("eu-1", 99, Mode.PAUSED, STOPPED, REPORT)
        (view,) = plane.views(AgentFilter(match_labels={"region": "eu"}))
        assert view.compliance.state is ComplianceState.PENDING

    run_plane(tmp_path, scenario)


def test_a_second_stream_for_the_same_agent_replaces_the_first(tmp_path: Path) -> None:
    async def scenario(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        old, new = Session(), Session()
        plane.connect("a", {}, old)
        plane.connect("a", {}, new)
        assert "replaced" in old.closed
        plane.disconnect("a", old)  # the old stream's late goodbye changes nothing
        (view,) = plane.views()
        assert view.status.connected

    run_plane(tmp_path, scenario)


def test_heartbeats_write_channel_changes_at_once_and_liveness_only_now_and_then(
    tmp_path: Path,
) -> None:
    async def scenario(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        connect_agent(plane, "a")
        plane.ack("a", 0, Mode.ALLOWED, STOPPED, REPORT)
        await plane.flush()
        assert store.batches == [1]
        clock.now += 10
        plane.heartbeat("a", STOPPED, REPORT)
        await plane.flush()
        assert store.batches == [1], "an unchanged heartbeat within a minute writes nothing"
        plane.heartbeat("a", {**STOPPED, "screen": True}, REPORT)
        await plane.flush()
        assert store.batches == [1, 1] and store.agents["a"].status.channels["screen"] is True
        clock.now += 61
        plane.heartbeat("a", {**STOPPED, "screen": True}, REPORT)
        await plane.flush()
        assert store.batches == [1, 1, 1] and store.agents["a"].status.last_seen == clock.now
        (view,) = plane.views()
        assert view.status.last_seen == clock.now

    run_plane(tmp_path, scenario, last_seen_save_interval=60)


class BrokenMethods(PlaneObserver):
    """An observer with a bug in every event it hears."""

    def _broken(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in the observer")

    connected = disconnected = directive_sent = acked = nacked = heartbeat = _broken
    verified = violation = upload_refused = hold_changed = _broken


class Heard(PlaneObserver):
    def __init__(self) -> None:
        self.acks: list[int] = []

    def acked(
        self, agent_id: str, *, epoch: int, mode: Mode, latency: float | None, at: float
    ) -> None:
        self.acks.append(epoch)

    def heartbeat(self, agent_id: str, *, at: float) -> None:
        raise ZeroDivisionError("a bug in one event only")


def test_an_observer_that_raises_breaks_no_ack_and_no_heartbeat(tmp_path: Path) -> None:
    """Each observer is called through the plane's guard: a bug is logged and counted, and
    the ack, the heartbeat and the other observers go on as if nothing happened."""

    heard = Heard()

    async def scenario(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        connect_agent(plane, "a")
        hold, _ = await plane.create_hold(Scope.fleet(), "leak", "INC-1", IC)
        plane.ack("a", hold.created_epoch, Mode.PAUSED, STOPPED, REPORT)
        plane.heartbeat("a", STOPPED, REPORT)
        assert heard.acks == [hold.created_epoch]
        view = plane.agent_view("a")
        assert view is not None and view.status.acked_epoch == hold.created_epoch
        failures = plane.observer_failures.counts
        assert failures["Heard"] == 1
        assert failures["BrokenMethods"] >= 4  # connected, directive_sent, hold_changed, acked...

    run_plane(tmp_path, scenario, observer=Observers([BrokenMethods(), heard]))


def test_a_lone_observer_is_guarded_too(tmp_path: Path) -> None:
    async def scenario(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        connect_agent(plane, "a")
        plane.heartbeat("a", STOPPED, REPORT)
        assert plane.observer_failures.counts["BrokenMethods"] >= 2

    run_plane(tmp_path, scenario, observer=BrokenMethods())


def test_the_fanout_hook_runs_before_every_hold_change(tmp_path: Path) -> None:
    async def scenario() -> None:
        calls: list[int] = []
        plane = ControlPlane(
            await RecordingStore.open(tmp_path),
            clock=lambda: 1000.0,
            flush_interval=3600,
            before_fanout=lambda: calls.append(plane.epoch),
        )
        await plane.start()
        hold, _ = await plane.create_hold(Scope.fleet(), "x", "", IC)
        await plane.lift_hold(hold.id, IC)
        assert calls == [1, 2]
        await plane.stop()

    asyncio.run(scenario())


def test_leases_only_while_allowed_and_violations_need_an_operator(tmp_path: Path) -> None:
    async def scenario(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        connect_agent(plane, "a")
        decision = plane.grant_lease("a")
        assert decision.granted and decision.ttl == 30
        assert plane.authorize_upload("a", 990.0, 999.0, 5).allowed
        hold, _ = await plane.create_hold(Scope.fleet(), "leak", "", IC)
        denied = plane.grant_lease("a")
        assert not denied.granted and "leak" in denied.reason
        plane.ack("a", hold.created_epoch, Mode.PAUSED, STOPPED, REPORT)
        clock.now += 5
        plane.heartbeat("a", STOPPED, CaptureReport(events_total=11))
        (view,) = plane.views()
        assert view.compliance.state is ComplianceState.VIOLATION
        with pytest.raises(NotFound):
            await plane.acknowledge_violation("nobody", SRE, "checked")
        evidence = await plane.acknowledge_violation("a", SRE, "reimaged the laptop")
        assert "events_captured_total rose from 10 to 11" in evidence
        with pytest.raises(Conflict):
            await plane.acknowledge_violation("a", SRE, "again")
        assert plane.authorize_upload("ghost", 1.0, 2.0, 1).reason == "unknown agent 'ghost'"

    run_plane(tmp_path, scenario, lease_ttl=30)


def test_lease_renewals_are_written_a_ttl_ahead_and_rarely(tmp_path: Path) -> None:
    async def scenario(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        connect_agent(plane, "a")
        plane.heartbeat("a", STOPPED, REPORT)
        await plane.flush()
        writes = len(store.batches)
        for _ in range(6):  # a renewal every third of the TTL, for one minute
            plane.heartbeat("a", STOPPED, REPORT)
            assert plane.grant_lease("a").granted
            await plane.flush()
            stored = store.agents["a"].status.lease_expires_at
            real = plane.views()[0].status.lease_expires_at
            assert stored is not None and real is not None and stored >= real
            clock.now += 10
        assert len(store.batches) - writes == 2, "one write per TTL, not per renewal"
        # While allowed, moving counters alone wait for the periodic save.
        plane.heartbeat("a", STOPPED, CaptureReport(events_total=99))
        await plane.flush()
        assert len(store.batches) - writes == 2

    run_plane(tmp_path, scenario, lease_ttl=30, last_seen_save_interval=3600)


def test_a_first_connect_reads_the_store_only_where_another_replica_may_have_written(
    tmp_path: Path,
) -> None:
    """A sole writer's memory is its whole store: a new agent's connect needs no read
    (10,000 of them when a new fleet connects). With replicas, the row may be another's."""

    class CountingReads(RecordingStore):
        reads: ClassVar[list[str]] = []

        async def load_agent(self, agent_id: str) -> StoredAgent | None:
            self.reads.append(agent_id)
            return await super().load_agent(agent_id)

    async def main() -> None:
        store = await CountingReads.open(tmp_path)
        plane = await started(store)
        try:
            await plane.resync_agent("laptop-new")
            assert store.reads == [], "sole writer: nothing stored that memory does not hold"
            store.sole_writer = False  # as on PostgreSQL, with replicas
            await plane.resync_agent("laptop-other")
            assert store.reads == ["laptop-other"]
        finally:
            await plane.stop()

    asyncio.run(main())


def test_a_directive_sent_is_written_with_its_ack_or_alone_a_little_later(
    tmp_path: Path,
) -> None:
    """A fleet-wide pause writes one row per agent for the new desired state, its
    directive and the ack, not one more for the change; an agent that does not ack still
    gets its row, for the replicas timing its deadline."""

    async def scenario(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        for agent_id in ("quick", "silent"):
            plane.connect(agent_id, {}, Session(plane, agent_id))
        await plane.flush()
        hold, _ = await plane.create_hold(Scope.fleet(), "leak", "INC-1", IC)
        await plane.flush()
        assert store.batches == [2], "the change and the sends wait for the acks"
        clock.advance(0.5)
        plane.ack("quick", hold.created_epoch, Mode.PAUSED, STOPPED, REPORT)
        await plane.flush()
        assert store.batches == [2, 1]
        quick = store.agents["quick"].status
        assert (quick.directive_sent_epoch, quick.acked_epoch) == (hold.created_epoch,) * 2
        clock.advance(ACK_ROW_WAIT_SECONDS)
        await plane.flush()
        assert store.batches == [2, 1, 1], "the silent one's send, written alone"
        silent = store.agents["silent"]
        assert silent.desired.epoch == hold.created_epoch
        assert (silent.status.directive_sent_epoch, silent.status.acked_epoch) == (
            hold.created_epoch,
            0,
        )
        await plane.flush()
        assert store.batches == [2, 1, 1], "and only once"

    run_plane(tmp_path, scenario)


def test_a_stopping_replica_writes_the_sends_still_waiting(tmp_path: Path) -> None:
    async def main() -> None:
        store = await RecordingStore.open(tmp_path)
        plane = await started(store)
        plane.connect("a", {}, Session(plane, "a"))
        await plane.flush()
        hold, _ = await plane.create_hold(Scope.fleet(), "leak", "INC-1", IC)
        await plane.stop()
        assert store.agents["a"].status.directive_sent_epoch == hold.created_epoch

    asyncio.run(main())


def test_a_clock_stepped_back_does_not_hold_up_the_rows_waiting_for_acks(
    tmp_path: Path,
) -> None:
    async def scenario(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        plane.connect("silent", {}, Session(plane, "silent"))
        await plane.flush()
        hold, _ = await plane.create_hold(Scope.fleet(), "leak", "INC-1", IC)
        clock.advance(-600)  # NTP steps the server's clock back ten minutes
        await plane.flush()
        assert store.batches == [1, 1], "written at once, not ten minutes on"
        assert store.agents["silent"].status.directive_sent_epoch == hold.created_epoch

    run_plane(tmp_path, scenario)
