"""Read views of the fleet: one agent, filtered lists most urgent first, the status an
operator polls, the census a Prometheus scrape reads, and the upload allowances the
ingest gateway copies.

Everything here reads memory only and evaluates compliance as of now; at 10,000 agents
these run on every scrape and dashboard refresh, so each is one pass over the agents.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field

from control.domain import AgentStatus
from control.domain import Compliance
from control.domain import ComplianceState
from control.domain import Desired
from control.domain import Hold
from control.domain import Mode
from control.domain import evaluate
from control.domain import fleet_compliant
from control.domain import is_settled
from control.domain.identity import Principal
from control.domain.labels import label_mismatch
from control.plane.cache import DesiredStateCache
from control.plane.context import PlaneContext
from control.plane.entries import AgentEntry
from control.plane.membership import Membership
from control.plane.part import CachePart
from control.plane.tally import VerdictTally

# Most urgent first: what an SRE must look at during an incident.
SEVERITY = [
    ComplianceState.VIOLATION,
    ComplianceState.FAILED,
    ComplianceState.OVERDUE,
    ComplianceState.OFFLINE_AT_RISK,
    ComplianceState.NEVER_SEEN,
    ComplianceState.PENDING,
    ComplianceState.RESUME_PENDING,
    ComplianceState.STOP_REPORTED,
    ComplianceState.VERIFIED_STOPPED,
    ComplianceState.OFFLINE_LEASE_EXPIRED,
    ComplianceState.OFFLINE,
    ComplianceState.CAPTURING,
]
assert set(SEVERITY) == set(ComplianceState), "every state needs a place in the order"
_SEVERITY_RANK = {state: rank for rank, state in enumerate(SEVERITY)}


@dataclass(frozen=True, slots=True)
class AgentView:
    """One agent as a reader sees it: its compliance judged as of the read, carried with
    the desired state and status it was judged from so the two never disagree."""

    agent_id: str
    labels: Mapping[str, str]
    desired: Desired
    status: AgentStatus
    compliance: Compliance


@dataclass(frozen=True, slots=True)
class AgentFilter:
    state: ComplianceState | None = None
    match_labels: Mapping[str, str] = field(default_factory=dict)
    hold_id: str = ""


@dataclass(frozen=True, slots=True)
class StatusSummary:
    epoch: int
    holds: list[Hold]
    total: int
    by_state: dict[ComplianceState, int]
    compliant: bool
    settled: int
    unsettled: list[AgentView]


@dataclass(frozen=True, slots=True)
class Census:
    epoch: int
    by_state: dict[ComplianceState, int]
    by_mode: dict[Mode, int]
    connected_streams: int
    active_holds: int
    # Agents whose own report contradicts the labels the server decides for them.
    label_mismatches: int = 0
    # Events the ingest gateway accepted dated after their agent's stop (0 expected).
    events_accepted_after_pause: int = 0


def _urgency(match: tuple[AgentEntry, Compliance]) -> tuple[int, str]:
    return _SEVERITY_RANK[match[1].state], match[0].agent_id


class FleetViews(CachePart):
    def __init__(
        self, context: PlaneContext, cache: DesiredStateCache, membership: Membership
    ) -> None:
        super().__init__(context, cache)
        self._membership = membership
        self._tally = VerdictTally(cache.agents, context.policy)

    def _matching(self, agent_filter: AgentFilter) -> Iterator[tuple[AgentEntry, Compliance]]:
        now = self._clock()
        scope = self._cache.hold(agent_filter.hold_id).scope if agent_filter.hold_id else None
        wanted = agent_filter.match_labels
        policy = self._policy
        for entry in self._agents.values():
            if scope is not None and not scope.covers(entry.agent_id, entry.labels):
                continue
            if wanted and any(entry.labels.get(k) != v for k, v in wanted.items()):
                continue
            verdict = evaluate(entry.desired, entry.status, now=now, policy=policy)
            if agent_filter.state is None or verdict.state is agent_filter.state:
                yield entry, verdict

    def agent_view(self, agent_id: str) -> AgentView | None:
        """One agent as of now, or ``None`` if the plane has never heard of it."""
        entry = self._agents.get(agent_id)
        if entry is None:
            return None
        verdict = evaluate(entry.desired, entry.status, now=self._clock(), policy=self._policy)
        return AgentView(entry.agent_id, entry.labels, entry.desired, entry.status, verdict)

    def owned_by(self, owner: Principal) -> list[AgentView]:
        """Laptops labelled ``owner=<name>``: all an employee may ever see."""
        return [v for v in self.views() if v.labels.get("owner") == owner.name]

    def views(self, agent_filter: AgentFilter = AgentFilter()) -> list[AgentView]:
        """Agents matching the filter, most urgent first, then by id."""
        matches = sorted(self._matching(agent_filter), key=_urgency)
        return [AgentView(e.agent_id, e.labels, e.desired, e.status, c) for e, c in matches]

    def snapshot(
        self, agent_filter: AgentFilter = AgentFilter()
    ) -> list[tuple[str, Mapping[str, str], Desired, AgentStatus, Compliance]]:
        """``(agent_id, labels, desired, status, compliance)`` of every matching agent, in no
        particular order: an ``AgentView``'s fields without building one (a third of the
        cost at 10,000 agents), for callers that filter, sort and page by their own key."""
        return [
            (e.agent_id, e.labels, e.desired, e.status, c) for e, c in self._matching(agent_filter)
        ]

    def agent_records(self) -> list[tuple[str, Mapping[str, str], AgentStatus]]:
        """``(agent_id, labels, status)`` of every agent, no verdict evaluated: for readers
        of raw facts (readiness), a fraction of ``snapshot``'s cost."""
        return [(e.agent_id, e.labels, e.status) for e in self._agents.values()]

    def desired_and_status(self, agent_id: str) -> tuple[Desired, AgentStatus] | None:
        """What an upload verdict needs, without evaluating compliance (a verdict per batch)."""
        entry = self._agents.get(agent_id)
        return None if entry is None else (entry.desired, entry.status)

    def census(self) -> Census:
        """Fleet-wide counts in one pass: what a Prometheus scrape reads."""
        self._tally.refresh(self._clock())
        by_state = dict(self._tally.by_state)
        by_mode: dict[Mode, int] = dict.fromkeys(Mode, 0)
        connected = mismatched = after_pause = 0
        for entry in self._agents.values():
            after_pause += entry.status.events_accepted_after_pause
            by_mode[entry.desired.mode] += 1
            connected += entry.subscriber is not None
            mismatched += bool(label_mismatch(entry.labels, entry.status.reported_labels))
        cache = self._cache
        holds = len(cache.active_holds())
        return Census(cache.epoch, by_state, by_mode, connected, holds, mismatched, after_pause)

    def status(
        self, agent_filter: AgentFilter = AgentFilter(), unsettled_limit: int = 0
    ) -> StatusSummary:
        """Counts for every matching agent; full rows only for the most urgent unsettled ones.

        Operators poll this during an incident, so it must stay cheap at fleet scale: the
        fleet-wide read (no filter), the one dashboards and the CLI poll, comes from the
        tally, which evaluates only the agents whose verdict may have changed since.
        """
        unsettled: Collection[tuple[AgentEntry, Compliance]]
        if agent_filter == AgentFilter():
            now = self._clock()
            self._tally.refresh(now)
            total = len(self._agents)
            by_state = {state: n for state, n in self._tally.by_state.items() if n}
            # Read in place, not copied: during a fleet-wide pause every agent is unsettled.
            unsettled = self._tally.unsettled.values()
            # Rows as of now: a counted verdict's state holds, its wording may have aged.
            shown = [
                (e, evaluate(e.desired, e.status, now=now, policy=self._policy))
                for e, _ in heapq.nsmallest(unsettled_limit, unsettled, key=_urgency)
            ]
        else:
            by_state, matching, total = {}, [], 0
            for entry, verdict in self._matching(agent_filter):
                total += 1
                by_state[verdict.state] = by_state.get(verdict.state, 0) + 1
                if not is_settled(entry.desired.mode, verdict.state):
                    matching.append((entry, verdict))
            unsettled = matching
            shown = heapq.nsmallest(unsettled_limit, unsettled, key=_urgency)
        return StatusSummary(
            epoch=self._cache.epoch,
            holds=self._cache.active_holds(),
            total=total,
            by_state=by_state,
            # Settled agents are compliant by definition: only the rest can spoil it.
            compliant=fleet_compliant((e.desired.mode, c.state) for e, c in unsettled),
            settled=total - len(unsettled),
            unsettled=[AgentView(e.agent_id, e.labels, e.desired, e.status, c) for e, c in shown],
        )

    def upload_allowances_of(self, agent_ids: Iterable[str]) -> dict[str, float | None]:
        """``upload_allowances`` for these agents only; None for any not allowed now."""
        now, leasing = self._clock(), self._membership.leasing
        allowed: dict[str, float | None] = {}
        for agent_id in agent_ids:
            entry = self._agents.get(agent_id)
            allowed[agent_id] = (
                entry.status.upload_allowed_until(entry.desired, now)
                if leasing and entry is not None
                else None
            )
        return allowed

    def upload_allowances(self) -> dict[str, float]:
        """Every agent whose batches may land now, with its lease's end (see
        ``AgentStatus.upload_allowed_until``): what the ingest gateway's copy holds. None
        from a replica that cannot lease: its view may be too old to allow anything."""
        every = self.upload_allowances_of(self._agents)
        return {agent_id: until for agent_id, until in every.items() if until is not None}
