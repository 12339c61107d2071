"""Ground truth for the fleet drills: what one simulated agent really captured.

The recorder is told only facts (a lease request sent at t, the answer, a pause
obeyed, n events produced at t) and keeps its own idea of when the lease
expires, without asking the ``Lease`` the capture code consults. So a broken or
bypassed check at the capture point shows up as ``events_without_lease > 0``.

It is deliberately lenient where the agent is strict (it keeps the latest expiry
any grant implies and ignores refusals), so an honest agent never scores a false
positive; a pause it obeyed ends the lease for it at once.
"""

from __future__ import annotations

from typing import Any


class GroundTruth:
    __slots__ = (
        "_expires_at",
        "_fresh_for",
        "_last_capture_at",
        "_sent",
        "events_captured_total",
        "events_without_lease",
        "last_event_at",
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
        self.last_event_at = wall
        self._last_capture_at = at
        if at > self._expires_at:
            self.events_without_lease += count

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
        }
