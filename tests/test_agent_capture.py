"""The capture engine: lease gating at the capture point, watchdog, spool, uploads."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

import pytest

from agent_stub import CaptureEngine
from agent_stub import Lease
from simulator.faulty import FaultyCaptureEngine
from simulator.truth import GroundTruth
from tests.agent_support import PER_TICK
from tests.fake_clock import FakeClock


class Rig:
    """An engine with its lease and an independent truth recorder, on one clock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.wall = itertools.count(1_700_000_000.0)
        self.lease = Lease(clock)
        self.truth = GroundTruth(capture_tick=1.0)
        self.engine = CaptureEngine(self.lease, self.truth, wall_clock=lambda: next(self.wall))

    def grant(self, ttl: float) -> None:
        request_id, sent_at = self.lease.request()
        self.truth.lease_requested(request_id, sent_at)
        self.lease.answer(request_id, granted=True, ttl=ttl)
        self.truth.lease_answered(request_id, granted=True, ttl=ttl)

    def faulty_engine(self) -> FaultyCaptureEngine:
        """The simulator's engine in place of the honest one: same lease, truth and clock."""
        engine = FaultyCaptureEngine(self.lease, self.truth, wall_clock=lambda: next(self.wall))
        self.engine = engine
        return engine


def test_nothing_is_captured_without_a_lease() -> None:
    rig = Rig(FakeClock())
    rig.engine.start_all()
    rig.engine.tick()
    assert rig.engine.events_captured_total == 0 and rig.engine.spool_events == 0
    assert not rig.engine.capturing, "the watchdog stopped the channels"


def test_capture_runs_under_the_lease_and_stops_by_itself_at_expiry() -> None:
    clock = FakeClock()
    rig = Rig(clock)
    rig.grant(ttl=10)
    rig.engine.start_all()
    rig.engine.tick()
    assert rig.engine.events_captured_total == PER_TICK == rig.engine.spool_events
    clock.advance(9)
    rig.engine.tick()
    assert rig.engine.events_captured_total == 2 * PER_TICK
    clock.advance(1)  # exactly at expiry: no longer held
    rig.engine.tick()
    assert rig.engine.events_captured_total == 2 * PER_TICK
    assert rig.engine.active == {"keyboard": False, "mouse": False, "screen": False}
    assert rig.truth.events_captured_total == 2 * PER_TICK
    assert rig.truth.events_without_lease == 0


def sleep_past_expiry(rig: Rig, clock: FakeClock) -> None:
    """Capture under a lease, then a laptop sleep longer than the lease, then a tick."""
    rig.grant(ttl=30)
    rig.engine.start_all()
    rig.engine.tick()
    clock.advance(35)
    rig.engine.tick()
    rig.engine.tick()


def test_truth_exposes_a_missing_lease_check_at_the_capture_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    honest_clock = FakeClock()
    honest = Rig(honest_clock)
    sleep_past_expiry(honest, honest_clock)
    assert honest.truth.events_without_lease == 0
    assert honest.engine.events_captured_total == PER_TICK

    # Someone deletes the check: the truth recorder, which keeps its own idea of the
    # lease, sees every event captured after the expiry.
    monkeypatch.setattr(CaptureEngine, "_may_capture", lambda self, now: True)
    broken_clock = FakeClock()
    broken = Rig(broken_clock)
    sleep_past_expiry(broken, broken_clock)
    assert broken.truth.events_without_lease == 2 * PER_TICK


def faulty_capturing(clock: FakeClock) -> tuple[Rig, FaultyCaptureEngine]:
    """The simulator's engine, every channel started under a 10 s lease."""
    rig = Rig(clock)
    rig.grant(ttl=10)
    engine = rig.faulty_engine()
    engine.start_all()
    return rig, engine


def test_a_stuck_channel_stays_on_but_captures_nothing_without_a_lease() -> None:
    rig, engine = faulty_capturing(FakeClock())
    engine.stuck_channels = frozenset({"screen"})
    rig.lease.revoke()
    assert engine.stop_all() == ["screen"]
    engine.tick()
    assert engine.active == {"keyboard": False, "mouse": False, "screen": True}
    assert engine.events_captured_total == 0


def test_ignoring_the_lease_keeps_capturing() -> None:
    clock = FakeClock()
    rig, engine = faulty_capturing(clock)
    engine.ignore_lease = True
    clock.advance(20)
    engine.enforce_lease()
    engine.tick()
    assert engine.events_captured_total == PER_TICK
    assert rig.truth.events_without_lease == PER_TICK


def test_watchdog_timer_stops_the_channels_between_ticks() -> None:
    async def scenario() -> None:
        rig = Rig(time.monotonic)  # a real clock: the watchdog runs on real time
        rig.grant(ttl=0.05)
        rig.engine.start_all()
        rig.engine.watch_lease()
        await asyncio.sleep(0.02)
        assert rig.engine.capturing
        await asyncio.sleep(0.1)
        assert not rig.engine.capturing, "stopped at expiry with no tick and no message"

    asyncio.run(scenario())


def test_purge_deletes_and_quarantine_sets_aside_the_unsent_spool() -> None:
    rig = Rig(FakeClock())
    rig.grant(ttl=60)
    rig.engine.start_all()
    rig.engine.tick()
    assert rig.engine.discard_spool(purge=True) == PER_TICK
    assert rig.engine.spool_events == 0 and rig.engine.quarantined_events == 0
    rig.engine.tick()
    rig.engine.tick()
    assert rig.engine.discard_spool(purge=False) == 2 * PER_TICK
    assert rig.engine.spool_events == 0 and rig.engine.quarantined_events == 2 * PER_TICK
    assert rig.engine.pending_batch() is None, "set aside, never uploaded"
    assert rig.engine.events_captured_total == 3 * PER_TICK, "the counter never goes down"


def test_batches_are_dated_and_a_discard_voids_an_upload_in_flight() -> None:
    rig = Rig(FakeClock())
    rig.grant(ttl=60)
    rig.engine.start_all()
    rig.engine.tick()
    rig.engine.tick()
    batch = rig.engine.pending_batch()
    assert batch is not None
    assert (batch.first_event_at, batch.last_event_at, batch.count) == (
        1_700_000_000.0,
        1_700_000_001.0,
        2 * PER_TICK,
    )
    rig.engine.tick()  # captured while the upload was being authorized
    assert rig.engine.shipped(batch)
    assert rig.engine.spool_events == PER_TICK
    later = rig.engine.pending_batch()
    assert later is not None and later.count == PER_TICK
    rig.engine.discard_spool(purge=True)  # a pause lands while it is in flight
    assert not rig.engine.shipped(later)
    assert rig.engine.spool_events == 0


def test_a_capped_batch_takes_the_oldest_events_and_the_rest_starts_where_it_ends() -> None:
    rig = Rig(FakeClock())
    rig.grant(ttl=60)
    rig.engine.start_all()
    for _ in range(3):  # 39 events over 1_700_000_000.0 .. 1_700_000_002.0
        rig.engine.tick()
    first = rig.engine.pending_batch(limit=20)
    assert first is not None and first.count == 20
    step = 2.0 / (3 * PER_TICK - 1)
    assert first.first_event_at == 1_700_000_000.0
    assert first.last_event_at == pytest.approx(1_700_000_000.0 + 19 * step)
    times = first.capture_times()
    assert len(times) == 20 and times == sorted(times)
    assert times[0] == first.first_event_at and times[-1] <= first.last_event_at
    assert rig.engine.shipped(first)
    rest = rig.engine.pending_batch(limit=20)
    assert rest is not None and rest.count == 3 * PER_TICK - 20
    assert rest.first_event_at == pytest.approx(1_700_000_000.0 + 20 * step)
    assert rest.last_event_at == 1_700_000_002.0, "the newest event keeps its real time"
    assert rest.capture_times()[-1] == 1_700_000_002.0
