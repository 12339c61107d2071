"""The desired-state cache: the epoch, the holds, every agent's desired state, and who
is told when it moves.

Transports plug in through ``Subscriber``: a stream session is told *that* its
agent's desired state moved and pulls the current directive itself, so bursts of
changes coalesce and a slow stream never delays the others (the go-control-plane
split of cache and session). The ingest gateway's copy of the upload allowances
subscribes too (``watch_upload_allowances``).

The labels operators decide (the inventory, a join token's) are inputs of the desired
state, so importing and adopting them lives here as well.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from control.decisions import NO_DECISION
from control.decisions import Decision
from control.decisions import decision_for
from control.domain import AgentStatus
from control.domain import Desired
from control.domain import Hold
from control.domain import reconcile_desired
from control.domain import validate_agent_id
from control.domain import validate_labels
from control.domain.identity import Principal
from control.domain.readiness import UNSAID
from control.domain.readiness import HelloFacts
from control.known_holds import KnownHolds
from control.labelling import LabelImport
from control.labelling import adopt_decided
from control.labelling import note_report
from control.labelling import relabel_records
from control.plane.context import PlaneContext
from control.plane.context import PlanePart
from control.plane.entries import AgentEntry
from control.plane.entries import Subscriber
from control.plane.writer import AgentWriter
from control.store import DecidedLabels

log = structlog.get_logger("killswitch.plane")


@dataclass(frozen=True, slots=True)
class DirectiveSpec:
    """What one agent's directive says, read from the cache in one step so the epoch,
    the mode and the decision behind it all come from the same moment."""

    epoch: int
    desired: Desired
    heartbeat_interval: float
    lease_ttl: float
    decision: Decision = NO_DECISION


class DesiredStateCache(PlanePart):
    def __init__(
        self,
        context: PlaneContext,
        agents: dict[str, AgentEntry],
        writer: AgentWriter,
        *,
        before_fanout: Callable[[], None],
    ) -> None:
        super().__init__(context)
        self.agents = agents
        self.epoch = 0
        self.holds = KnownHolds()
        # Agents another replica serves (their entries have ``remote`` set).
        self.remote: set[str] = set()
        # Where changed entries are written: the parts that change agents' entries write
        # through this same writer (``AgentStatePart``), so the dirty set is one.
        self.writer = writer
        self._dirty = writer.dirty
        # Runs before a change is pushed to the whole fleet (the server tunes the GC).
        self._before_fanout = before_fanout
        # One set per ingest gateway's watch: see ``watch_upload_allowances``.
        self._upload_watchers: list[set[str]] = []

    def active_holds(self) -> list[Hold]:
        return self.holds.active()

    def hold(self, hold_id: str) -> Hold:
        return self.holds.get(hold_id)

    # ------------------------------------------------------------ reconciling

    def apply_epoch(self, epoch: int) -> None:
        self.epoch = max(self.epoch, epoch)
        self._before_fanout()
        self.reconcile_all(self._clock())

    def reconcile_all(self, now: float) -> None:
        active = self.active_holds()
        for entry in self.agents.values():
            self.reconcile(entry, active, now)

    def reconcile(self, entry: AgentEntry, active: Sequence[Hold], now: float) -> None:
        if entry.desired.epoch > self.epoch:
            # Its state was decided at an epoch this replica has not read yet: recomputing
            # it from older holds would roll it back. It waits for the catch-up.
            return
        desired = reconcile_desired(
            entry.desired, entry.agent_id, entry.labels, active, epoch=self.epoch, now=now
        )
        if desired is not entry.desired:
            entry.desired = desired
            self.upload_allowance_may_change(entry.agent_id)
            if entry.remote is None:
                self.writer.awaits_ack(entry.agent_id, now)
            if entry.subscriber is not None:
                entry.subscriber.notify()

    def new_entry(self, agent_id: str, labels: dict[str, str], now: float) -> AgentEntry:
        desired = reconcile_desired(
            None, agent_id, labels, self.active_holds(), epoch=self.epoch, now=now
        )
        return AgentEntry(agent_id, labels, desired, AgentStatus())

    # ------------------------------------------------------------ upload allowance watchers

    def watch_upload_allowances(self) -> set[str]:
        """A set the plane adds every agent to whose upload allowance may have changed:
        a lease granted, its desired state decided anew, its row adopted from another
        replica. The watcher empties it as it reads; ``unwatch_upload_allowances`` ends
        it. (Lease ends need no word: the copy holds each lease's end.)"""
        changed: set[str] = set()
        self._upload_watchers.append(changed)
        return changed

    def unwatch_upload_allowances(self, changed: set[str]) -> None:
        self._upload_watchers = [w for w in self._upload_watchers if w is not changed]

    def upload_allowance_may_change(self, agent_id: str) -> None:
        for watcher in self._upload_watchers:
            watcher.add(agent_id)

    # ------------------------------------------------------------ agent streams

    def connect(
        self,
        agent_id: str,
        labels: Mapping[str, str],
        subscriber: Subscriber,
        hello: HelloFacts = UNSAID,
    ) -> None:
        now = self._clock()
        checked = validate_labels(labels)
        entry = self.agents.get(agent_id)
        if entry is None:  # in no inventory, pinned by no token: trust on first use
            entry = self.agents[agent_id] = self.new_entry(agent_id, checked, now)
            reconnect = False
        else:
            reconnect = entry.status.first_seen is not None
            if entry.remote is not None:  # the resync found no row: it serves it alone now
                entry.remote = None
                self.remote.discard(agent_id)
            if entry.subscriber is not None:
                entry.subscriber.close("replaced by a newer stream from the same agent")
            self.reconcile(entry, self.active_holds(), now)
        self.writer.pending_audit += note_report(agent_id, entry.labels, entry.status, checked, now)
        # A stream newer than any stored one even if this replica's clock is behind the
        # last replica's: the store refuses rows of an older stream.
        entry.status.record_connect(max(now, (entry.status.connected_at or 0.0) + 0.001))
        entry.status.hello = hello
        entry.subscriber = subscriber
        self._dirty.add(agent_id)
        log.debug("agent_connected", agent_id=agent_id, reconnect=reconnect)
        self.observer.connected(agent_id, reconnect=reconnect, at=now)
        subscriber.notify()

    def disconnect(self, agent_id: str, subscriber: Subscriber) -> None:
        entry = self.agents.get(agent_id)
        if entry is None or entry.subscriber is not subscriber:
            return  # an older stream, already replaced
        entry.subscriber = None
        now = self._clock()
        entry.status.record_disconnect(now)
        self._dirty.add(agent_id)
        log.debug("agent_disconnected", agent_id=agent_id)
        self.observer.disconnected(agent_id, at=now)

    def close_stream(self, agent_id: str, reason: str) -> bool:
        """End the agent's live stream, if it has one (its certificate was revoked)."""
        entry = self.agents.get(agent_id)
        if entry is None or entry.subscriber is None:
            return False
        entry.subscriber.close(reason)
        return True

    def directive_for(self, agent_id: str) -> DirectiveSpec:
        entry = self.agents[agent_id]
        return DirectiveSpec(
            self.epoch,
            entry.desired,
            self._policy.heartbeat_interval,
            self._context.lease_ttl,
            decision_for(entry.desired, agent_id, entry.labels, self.holds),
        )

    def directive_sent(self, agent_id: str, epoch: int) -> None:
        entry = self.agents[agent_id]
        now = self._clock()
        entry.status.directive_sent_at, entry.status.directive_sent_epoch = now, epoch
        self.writer.awaits_ack(agent_id, now)
        self.observer.directive_sent(agent_id, epoch=epoch, mode=entry.desired.mode, at=now)

    # ------------------------------------------------------------ decided labels

    async def expect_agents(
        self,
        agents: Iterable[tuple[str, Mapping[str, str]]],
        by: Principal,
        action: str = "inventory.import",
    ) -> LabelImport:
        """Operators' labels (the inventory, a join token's) are the server's: they make
        laptops that never connect visible, and relabel known ones wherever they are
        served: every replica adopts them (``control.labelling``)."""
        checked = [(validate_agent_id(a), validate_labels(labels)) for a, labels in agents]
        tally, now = LabelImport(), self._clock()
        writer = self.writer
        for agent_id, labels in checked:
            writer.pending_labels.append(DecidedLabels(agent_id, labels, by.name, now))
            entry = self.agents.get(agent_id)
            if entry is None:
                self.agents[agent_id] = entry = self.new_entry(agent_id, labels, now)
                entry.status.expected_since = now
                self._dirty.add(agent_id)
                tally.added += 1
            elif entry.labels == labels:
                tally.unchanged += 1
            else:
                record = functools.partial(self._context.audit.record, by)
                old, entry.labels = entry.labels, labels
                writer.pending_audit += relabel_records(record, agent_id, old, labels, entry.status)
                self.reconcile(entry, self.active_holds(), now)
                tally.relabelled += 1
        writer.pending_audit.append(self._context.audit.record(by, action, detail=tally.describe()))
        await writer.flush()
        log.info("agents_expected", operator=by.name, result=tally.describe())
        return tally

    def adopt_labels(self, decided: Iterable[DecidedLabels]) -> None:
        """Labels an operator decided on any replica: the agents they move into or out
        of a hold are told at once (``control.labelling.adopt_decided``)."""
        now, active = self._clock(), self.active_holds()
        for entry in adopt_decided(self.agents, decided):
            self.reconcile(entry, active, now)
