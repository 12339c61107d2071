"""Ground truth for the fleet drills: what one simulated agent really captured.

The recorder is told only facts (a lease request sent at t, the answer, a pause
obeyed, n events produced at t) and keeps its own idea of when the lease
expires, without asking the ``Lease`` the capture code consults. So a broken or
bypassed check at the capture point shows up as ``events_without_lease > 0``.

It also counts what the agent sent to the ingest gateway and what the gateway
accepted, with the latest capture time accepted: where data landed, from the
agent's side, to hold against the gateway's sink.

It is deliberately lenient where the agent is strict (it keeps the latest expiry
any grant implies and ignores refusals), so an honest agent never scores a false
positive; a pause it obeyed ends the lease for it at once.
"""

from __future__ import annotations

from typing import Any

from agent_stub.witness import Witness

# Kept per agent for the fault checkers; older spans and applications merge into one
# (a longer span only widens what a checker sees, so a merge never hides a late event).
MAX_SPANS = 256
MAX_APPLIED = 256


class GroundTruth(Witness):
    """The agent's ``Witness`` in the simulator: the facts, counted as above."""

    __slots__ = (
        "_expires_at",
        "_fresh_for",
        "_last_capture_at",
        "_sent",
        "applied",
        "batches_accepted",
        "batches_refused",
        "batches_sent",
        "events_accepted",
        "events_captured_total",
        "events_sent",
        "events_without_lease",
        "last_accepted_event_at",
        "last_event_at",
        "spans",
    )

    def __init__(self, *, capture_tick: float) -> None:
        # Capturing "now" means events produced at the latest tick.
        self._fresh_for = 1.5 * capture_tick
        self._sent: dict[int, float] = {}
        self._expires_at = float("-inf")
        self._last_capture_at = float("-inf")
        self.events_captured_total = 0
        self.events_without_lease = 0
        self.last_event_at: float | None = None
        # Wall-clock [first, last] of each run of consecutive capture ticks: when, not
        # just how much, so a checker can tell capture after a pause from before it.
        self.spans: list[list[float]] = []
        # [wall clock, epoch, mode] of each directive the agent acted on, in order.
        self.applied: list[list[Any]] = []
        # UploadBatch calls made (answered or not), and what the gateway answered.
        self.batches_sent = 0
        self.events_sent = 0
        self.batches_accepted = 0
        self.events_accepted = 0
        self.batches_refused = 0
        self.last_accepted_event_at: float | None = None

    def lease_requested(self, request_id: int, at: float) -> None:
        self._sent[request_id] = at

    def lease_answered(self, request_id: int, granted: bool, ttl: float) -> None:
        sent_at = self._sent.pop(request_id, None)
        if granted and sent_at is not None:
            self._expires_at = max(self._expires_at, sent_at + ttl)

    def lease_revoked(self, at: float) -> None:
        """A pause was obeyed at ``at``: no lease from then, whatever was in flight."""
        self._sent.clear()
        self._expires_at = min(self._expires_at, at)

    def captured(self, at: float, count: int, wall: float) -> None:
        """``count`` events produced at boottime ``at`` (wall-clock ``wall``)."""
        self.events_captured_total += count
        if self.spans and at - self._last_capture_at < self._fresh_for:
            self.spans[-1][1] = wall
        else:
            self.spans.append([wall, wall])
            if len(self.spans) > MAX_SPANS:
                self.spans[:2] = [[self.spans[0][0], self.spans[1][1]]]
        self.last_event_at = wall
        self._last_capture_at = at
        if at > self._expires_at:
            self.events_without_lease += count

    def directive_applied(self, wall: float, epoch: int, mode: str) -> None:
        """The agent acted on (acked) the directive at ``epoch`` in ``mode``."""
        self.applied.append([wall, epoch, mode])
        if len(self.applied) > MAX_APPLIED:
            del self.applied[0]

    def batch_sent(self, count: int) -> None:
        self.batches_sent += 1
        self.events_sent += count

    def batch_accepted(self, count: int, last_event_at: float) -> None:
        """The gateway accepted ``count`` events, the latest captured at ``last_event_at``."""
        self.batches_accepted += 1
        self.events_accepted += count
        if self.last_accepted_event_at is None or last_event_at > self.last_accepted_event_at:
            self.last_accepted_event_at = last_event_at

    def batch_refused(self) -> None:
        self.batches_refused += 1

    def capturing(self, now: float) -> bool:
        return now - self._last_capture_at < self._fresh_for

    def row(self, agent_id: str, fault: str, now: float) -> dict[str, Any]:
        """This agent's entry in the ``--truth`` file."""
        return {
            "agent_id": agent_id,
            "fault": fault,
            "events_captured_total": self.events_captured_total,
            "last_event_at": self.last_event_at,
            "events_without_lease": self.events_without_lease,
            "capturing": self.capturing(now),
            "spans": self.spans,
            "applied": self.applied,
            "batches_sent": self.batches_sent,
            "events_sent": self.events_sent,
            "batches_accepted": self.batches_accepted,
            "events_accepted": self.events_accepted,
            "batches_refused": self.batches_refused,
            "last_accepted_event_at": self.last_accepted_event_at,
        }
