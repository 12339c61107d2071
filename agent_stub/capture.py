"""The capture engine: keyboard, mouse and screen workers feeding a local spool.

Events are counted, never materialised, so 10,000 simulated agents fit in one
process. Every capture asks the lease first, at that moment, on the boottime
clock: a channel left running by mistake still captures nothing once the lease
is gone, and an expired lease stops the channels by itself (no message needed).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from agent_stub.lease import Clock
from agent_stub.lease import Lease
from agent_stub.witness import Witness

CHANNELS = ("keyboard", "mouse", "screen")
# Events each active channel produces per capture tick.
EVENTS_PER_TICK = {"keyboard": 4, "mouse": 8, "screen": 1}


@dataclass(frozen=True, slots=True)
class Batch:
    """The oldest events of the spool as offered for upload: a count and the wall-clock
    range they span. ``rest_first_at`` dates the oldest event left behind once it ships.
    """

    first_event_at: float
    last_event_at: float
    count: int
    spool_generation: int
    rest_first_at: float

    def capture_times(self) -> list[float]:
        """One time per event, evenly spaced over the batch's range (events are counted,
        not kept): never before its first event, never after its last."""
        if self.count == 1:
            return [self.last_event_at]
        step = (self.last_event_at - self.first_event_at) / (self.count - 1)
        return [min(self.first_event_at + i * step, self.last_event_at) for i in range(self.count)]


class CaptureEngine:
    """Per-channel on/off state, capture counters and the spool of unsent events.

    Starts with every channel stopped and nothing spooled: unknown means off.
    ``witness`` is told every capture. ``_may_capture`` and ``_stop`` are where the
    simulator's faulty engine (``simulator.faulty``) breaks the rules.
    """

    def __init__(self, lease: Lease, witness: Witness, *, wall_clock: Clock = time.time) -> None:
        self.lease = lease
        self._witness = witness
        self._wall_clock = wall_clock
        self.active = dict.fromkeys(CHANNELS, False)
        self.events_captured_total = 0
        self.last_event_at: float | None = None
        self.spool_events = 0
        self._spool_first_at: float | None = None
        # Bumped when the spool is emptied other than by an upload, so an upload
        # authorized just before a purge never ships what the purge took away.
        self._spool_generation = 0
        self.quarantined_events = 0
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def capturing(self) -> bool:
        return any(self.active.values())

    def start_all(self) -> None:
        for name in self.active:
            self.active[name] = True

    def stop_all(self) -> list[str]:
        """Stop every channel worker; returns the names of those that refused."""
        for name in self.active:
            self._stop(name)
        return [name for name, on in self.active.items() if on]

    def _stop(self, name: str) -> None:
        """Tell one channel's worker to stop; an honest one does."""
        self.active[name] = False

    def _may_capture(self, now: float) -> bool:
        """Only under the lease, at this moment."""
        return self.lease.holds(now)

    def tick(self) -> None:
        """One capture round: each active channel captures only if the lease holds now."""
        now = self.lease.clock()
        count = 0
        for name, on in self.active.items():
            if not on:
                continue
            if self._may_capture(now):
                count += EVENTS_PER_TICK[name]
            else:
                self._stop(name)
        if count:
            self._spool(count, now)

    def _spool(self, count: int, now: float) -> None:
        wall = self._wall_clock()
        self.events_captured_total += count
        self.last_event_at = wall
        if not self.spool_events:
            self._spool_first_at = wall
        self.spool_events += count
        self._witness.captured(now, count, wall)

    def enforce_lease(self) -> None:
        """The watchdog: without a lease, stop every channel."""
        if not self._may_capture(self.lease.clock()):
            self.stop_all()

    def watch_lease(self) -> None:
        """Arm the watchdog for the current expiry, so channels stop between ticks too.

        The timer runs on the event loop's clock, which may stop during sleep; the
        check at every capture covers that.
        """
        if self._watchdog is not None:
            self._watchdog.cancel()
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(self.lease.remaining(), self.enforce_lease)

    def discard_spool(self, *, purge: bool) -> int:
        """Take every unsent event out of the upload path: deleted, or set aside for good."""
        discarded = self.spool_events
        if not purge:
            self.quarantined_events += discarded
        self.spool_events, self._spool_first_at = 0, None
        self._spool_generation += 1
        return discarded

    def pending_batch(self, limit: int | None = None) -> Batch | None:
        """The whole spool, or its oldest ``limit`` events.

        Counted events keep no timestamps: they are taken as evenly spaced between the
        spool's first and last event, so a part of the spool ends where the next begins.
        """
        first, last, count = self._spool_first_at, self.last_event_at, self.spool_events
        if not count or first is None or last is None:
            return None
        if limit is None or count <= limit:
            return Batch(first, last, count, self._spool_generation, rest_first_at=last)
        step = (last - first) / (count - 1)
        return Batch(
            first,
            first + (limit - 1) * step,
            limit,
            self._spool_generation,
            rest_first_at=first + limit * step,
        )

    def shipped(self, batch: Batch) -> bool:
        """Remove an uploaded batch from the spool, unless the spool was discarded meanwhile."""
        if batch.spool_generation != self._spool_generation:
            return False
        self.spool_events -= batch.count
        self._spool_first_at = batch.rest_first_at if self.spool_events else None
        return True
