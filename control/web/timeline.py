"""Per-laptop timelines for the dashboard: what the plane saw happen to each agent.

Fed by plane events (``PlaneObserver``), kept in memory only and bounded:

- at most ``MAX_EVENTS_PER_AGENT`` entries per agent, fewer when the fleet is large so
  that the total stays near ``MAX_EVENTS_TOTAL`` (never below ``MIN_EVENTS_PER_AGENT``
  per agent): 250,000 entries, about 50 MB (measured: ~195 bytes an entry), for any
  fleet up to 12,500 agents, then 20 per agent;
- consecutive heartbeats are one entry with a count and the last time, so a fleet
  heartbeating every few seconds adds nothing once each agent's newest entry is one;
- free text (nack reasons, evidence) is cut to ``MAX_TEXT`` characters;
- hold changes are kept once, fleet-wide (the newest ``HOLD_EVENTS``), and merged into
  an agent's timeline when it is read, if the hold's scope covers that agent.

It also numbers every change worth redrawing a table for (not heartbeats) so live
views can ask "which agents changed since version N?" without keeping state per viewer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from control.domain import ComplianceState
from control.domain import Hold
from control.domain import Mode
from control.events import PlaneObserver

MAX_EVENTS_PER_AGENT = 100
MIN_EVENTS_PER_AGENT = 20
MAX_EVENTS_TOTAL = 250_000
MAX_TEXT = 300
HOLD_EVENTS = 256
# Changes remembered for live viewers; one further behind simply re-reads its page.
CHANGES_KEPT = 4096
# The id recorded for a change that may touch every agent (a hold was created or lifted).
ALL_AGENTS = ""


class Kind(StrEnum):
    CONNECTED = "connected"
    RECONNECTED = "reconnected"
    DISCONNECTED = "disconnected"
    DIRECTIVE = "directive"
    ACK = "ack"
    NACK = "nack"
    HEARTBEAT = "heartbeat"
    VERIFIED = "verified"
    VIOLATION = "violation"
    UPLOAD_REFUSED = "upload_refused"
    HOLD_CREATED = "hold_created"
    HOLD_LIFTED = "hold_lifted"


# Shared strings, not one per entry.
_SENT = {
    Mode.PAUSED: ("sent PAUSED", ComplianceState.PENDING.value),
    Mode.ALLOWED: ("sent ALLOWED", ComplianceState.RESUME_PENDING.value),
}


class TimelineEvent:
    """One entry; a heartbeat entry stands for ``count`` heartbeats up to ``last_at``."""

    __slots__ = ("at", "count", "epoch", "kind", "last_at", "state", "text")

    def __init__(
        self, at: float, kind: Kind, *, epoch: int = 0, text: str = "", state: str = ""
    ) -> None:
        self.at = at
        self.kind = kind
        self.epoch = epoch
        self.text = text[:MAX_TEXT]
        # The compliance state this event put the agent in, when the event alone says so.
        self.state = state
        self.count = 1
        self.last_at = at


@dataclass(frozen=True, slots=True)
class HoldEvent:
    """A hold created or lifted, kept once for the whole fleet rather than in every
    covered agent's ring, and shown on every agent's timeline it concerns."""

    at: float
    hold: Hold
    epoch: int
    lifted: bool


@dataclass(frozen=True, slots=True)
class Changes:
    version: int
    # Agent ids changed since the version asked about (``ALL_AGENTS`` for a hold
    # change), or None when that version is too old to say.
    agent_ids: frozenset[str] | None


class Timeline(PlaneObserver):
    def __init__(self) -> None:
        self._rings: dict[str, deque[TimelineEvent]] = {}
        # Round-robin order for trimming rings when the total is over budget.
        self._trim_order: deque[str] = deque()
        self._total = 0
        self._holds: deque[HoldEvent] = deque(maxlen=HOLD_EVENTS)
        self._version = 0
        self._changes: deque[tuple[int, str]] = deque(maxlen=CHANGES_KEPT)

    # ------------------------------------------------------------ reading

    @property
    def version(self) -> int:
        return self._version

    @property
    def total_events(self) -> int:
        return self._total

    def changes_since(self, version: int) -> Changes:
        if version >= self._version:
            return Changes(self._version, frozenset())
        if not self._changes or self._changes[0][0] > version + 1:
            return Changes(self._version, None)
        changed = set()
        for seen, agent_id in reversed(self._changes):
            if seen <= version:
                break
            changed.add(agent_id)
        return Changes(self._version, frozenset(changed))

    def events(self, agent_id: str, labels: Mapping[str, str]) -> list[TimelineEvent | HoldEvent]:
        """The agent's entries and the hold changes covering it, oldest first.

        Hold changes older than the agent's oldest kept entry are left out once its
        ring is full, so the timeline has no gap that looks like quiet.
        """
        ring = self._rings.get(agent_id, deque())
        oldest = ring[0].at if ring and len(ring) >= self._cap() else float("-inf")
        holds = [h for h in self._holds if h.at >= oldest and h.hold.scope.covers(agent_id, labels)]
        merged: list[TimelineEvent | HoldEvent] = [*ring, *holds]
        merged.sort(key=lambda e: e.at)
        return merged

    # ------------------------------------------------------------ recording

    def _cap(self) -> int:
        fair = MAX_EVENTS_TOTAL // max(1, len(self._rings))
        return max(MIN_EVENTS_PER_AGENT, min(MAX_EVENTS_PER_AGENT, fair))

    def _ring(self, agent_id: str) -> deque[TimelineEvent]:
        ring = self._rings.get(agent_id)
        if ring is None:
            ring = self._rings[agent_id] = deque()
            self._trim_order.append(agent_id)
        return ring

    def _add(self, agent_id: str, event: TimelineEvent, *, change: bool = True) -> None:
        ring = self._ring(agent_id)
        ring.append(event)
        self._total += 1
        cap = self._cap()
        while len(ring) > cap:
            ring.popleft()
            self._total -= 1
        if self._total > MAX_EVENTS_TOTAL:
            self._trim(cap)
        if change:
            self._changed(agent_id)

    def _entered(
        self,
        agent_id: str,
        state: ComplianceState,
        at: float,
        kind: Kind,
        text: str,
        *,
        epoch: int = 0,
    ) -> None:
        """Record an event that alone puts the agent in ``state`` (a nack, a verified stop,
        a violation), whatever the agent was before."""
        self._add(agent_id, TimelineEvent(at, kind, epoch=epoch, text=text, state=state.value))

    def _trim(self, cap: int) -> None:
        """Shorten rings longer than the current cap (kept when the fleet was smaller)."""
        for _ in range(len(self._trim_order)):
            if self._total <= MAX_EVENTS_TOTAL:
                return
            agent_id = self._trim_order[0]
            self._trim_order.rotate(-1)
            ring = self._rings[agent_id]
            while len(ring) > cap:
                ring.popleft()
                self._total -= 1

    def _changed(self, agent_id: str) -> None:
        self._version += 1
        self._changes.append((self._version, agent_id))

    def iter_rings(self) -> Iterator[tuple[str, int]]:
        """(agent id, entries) for every ring: for tests and memory checks."""
        return ((a, len(r)) for a, r in self._rings.items())

    # ------------------------------------------------------------ PlaneObserver

    def connected(self, agent_id: str, *, reconnect: bool, at: float) -> None:
        kind = Kind.RECONNECTED if reconnect else Kind.CONNECTED
        self._add(agent_id, TimelineEvent(at, kind, text="stream opened"))

    def disconnected(self, agent_id: str, *, at: float) -> None:
        self._add(agent_id, TimelineEvent(at, Kind.DISCONNECTED, text="stream closed"))

    def directive_sent(self, agent_id: str, *, epoch: int, mode: Mode, at: float) -> None:
        text, waiting = _SENT[mode]
        self._add(
            agent_id, TimelineEvent(at, Kind.DIRECTIVE, epoch=epoch, text=text, state=waiting)
        )

    def acked(
        self, agent_id: str, *, epoch: int, mode: Mode, latency: float | None, at: float
    ) -> None:
        if latency is None:
            text, state = f"acked {mode.value} (not the current directive)", ""
        else:
            text = f"acked {mode.value} {latency:.2f}s after the change"
            stopped = ComplianceState.STOP_REPORTED if mode is Mode.PAUSED else None
            state = (stopped or ComplianceState.CAPTURING).value
        self._add(agent_id, TimelineEvent(at, Kind.ACK, epoch=epoch, text=text, state=state))

    def nacked(self, agent_id: str, *, epoch: int, reason: str, at: float) -> None:
        text = f"could not apply: {reason}"
        self._entered(agent_id, ComplianceState.FAILED, at, Kind.NACK, text, epoch=epoch)

    def heartbeat(self, agent_id: str, *, at: float) -> None:
        ring = self._rings.get(agent_id)
        if ring and ring[-1].kind is Kind.HEARTBEAT:
            last = ring[-1]
            last.count += 1
            last.last_at = at
            return
        # Liveness only: not a change a table needs redrawing for.
        self._add(agent_id, TimelineEvent(at, Kind.HEARTBEAT), change=False)

    def verified(self, agent_id: str, *, epoch: int, latency: float, at: float) -> None:
        text = f"counters and spool frozen: stop verified {latency:.2f}s after the pause"
        self._entered(
            agent_id, ComplianceState.VERIFIED_STOPPED, at, Kind.VERIFIED, text, epoch=epoch
        )

    def violation(self, agent_id: str, *, evidence: str, at: float) -> None:
        self._entered(agent_id, ComplianceState.VIOLATION, at, Kind.VIOLATION, evidence)

    def upload_refused(self, agent_id: str, *, reason: str, at: float) -> None:
        self._add(agent_id, TimelineEvent(at, Kind.UPLOAD_REFUSED, text=reason))

    def hold_changed(self, hold: Hold, *, epoch: int, at: float) -> None:
        self._holds.append(HoldEvent(at, hold, epoch, lifted=not hold.active))
        self._changed(ALL_AGENTS)
