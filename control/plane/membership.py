"""Membership: this replica among the others sharing one database.

It beats (a durable write every probe interval) and watches its store's health and the
freshness of its view; it leases only while both hold, and hands its agents over to
another replica when it cannot. It also shows the agents other replicas serve, from
the rows they write and the beats that vouch for them, so that any replica gives the
same per-laptop answer (``adopt_agents``; ``control.replication`` reads them).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Mapping

import structlog

from control.domain import AgentStatus
from control.freshness import SharedView
from control.lifecycle import cancel_and_wait
from control.plane.cache import DesiredStateCache
from control.plane.context import PlaneContext
from control.plane.entries import AgentEntry
from control.plane.part import AgentStatePart
from control.store import AgentChanges
from control.store import StoredAgent
from control.store_health import StoreHealth

log = structlog.get_logger("killswitch.plane")

# A replica that has not beaten for this many probe intervals is gone: the agents
# its rows show connected are shown disconnected (since its last beat). A replica
# without its database for as long sheds its streams.
REPLICA_SILENT_BEATS = 5
# The database is lost to a replica once no beat has succeeded for this many probe
# intervals: one late or failed beat (a busy event loop, a dropped connection) is not.
STORE_ANSWER_WINDOW_BEATS = 2.5
# How often the store is probed with a beat (a durable write).
STORE_PROBE_SECONDS = 2.0


def new_replica_id() -> str:
    """Unique per process: a restarted replica's old rows read as another, dead, one."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Membership(AgentStatePart):
    def __init__(
        self,
        context: PlaneContext,
        cache: DesiredStateCache,
        *,
        store_probe_interval: float,
    ) -> None:
        super().__init__(context, cache)
        # How this process signs its agent rows and its beats.
        self.replica_id = context.replica_id
        self._store_probe_interval = store_probe_interval
        self.store_health = StoreHealth(STORE_ANSWER_WINDOW_BEATS * store_probe_interval)
        self.view = SharedView(context.lease_ttl, sole_writer=context.store.sole_writer)
        self._reported_stale = False
        self._streams_shed = False
        # Whether another replica was beating at the last read: somewhere to send
        # agents when this one loses its database.
        self._others_alive = False
        self._prober: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.store_health.restart()
        self._prober = asyncio.create_task(self._probe_loop(), name="store-probe")

    async def stop(self) -> None:
        await cancel_and_wait(self._prober)
        self._prober = None

    # ------------------------------------------------------------ beats and health

    async def _probe_loop(self) -> None:
        """Beat every interval (the database answering is what the probe wants to know;
        a store that hangs counts as lost), and write what has gone silent."""
        while True:
            await asyncio.sleep(self._store_probe_interval)
            self._mark_newly_silent()
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow the
                # cancellation that stop() sends, and stop() would then wait for ever.
                async with asyncio.timeout(self._store_probe_interval):
                    await self._context.store.beat(self.replica_id)
            except Exception as exc:
                self.store_health.failed(exc)
            else:
                self.store_health.beat_succeeded()
            self.store_health.check()
            self._report_view_freshness()
            self._shed_streams_if_lost()

    def _mark_newly_silent(self) -> None:
        """Other replicas take a connected row of a beating replica as a live agent,
        unless the row itself shows the stream silent: write those rows once."""
        stale = self._clock() - self._policy.silence_timeout
        for entry in self._agents.values():
            last_seen = entry.status.last_seen
            if (
                entry.subscriber is not None
                and not entry.silent_saved
                and last_seen is not None
                and last_seen < stale
            ):
                self._dirty.add(entry.agent_id)

    @property
    def store_healthy(self) -> bool:
        """Whether the store takes writes (``StoreHealth``). Not, and no lease is granted
        or renewed until it does: every agent fails closed within one lease TTL."""
        return self.store_health.healthy

    def _report_view_freshness(self) -> None:
        stale = self.view.stale
        if stale is self._reported_stale:
            return
        self._reported_stale = stale
        self._streams_shed = False
        if stale:
            log.error("view_stale", detail=self.view.describe_staleness())
        else:
            log.warning("view_current", detail="granting and renewing leases again")

    # ------------------------------------------------------------ leasing and hand-over

    @property
    def leasing(self) -> bool:
        """Whether this replica may grant leases now: its database takes writes and its
        view of the holds is recent. Readiness says the same."""
        return self.store_healthy and not self.view.stale

    def why_not_leasing(self) -> str:
        """One line for ``/readyz`` and a refused lease; empty while leasing."""
        if not self.store_healthy:
            return self.store_health.cause
        if self.view.stale:
            return self.view.describe_staleness()
        return ""

    def hands_off_agents(self) -> bool:
        """Without its database, and with another replica to go to, this replica sends
        agents away. Alone, it keeps them: their leases end either way, and they are
        back at once when the database is (a refused agent backs off for minutes)."""
        return not self.leasing and self._others_alive

    def sent_elsewhere_because(self) -> str:
        """What an agent this replica turns away is told."""
        return f"{self.why_not_leasing()}; connect to another replica"

    def _shed_streams_if_lost(self) -> None:
        """Once the other replicas take this one for dead (no beats), end its streams:
        its agents fail closed either way, but on a replica that still has the database
        they get their leases back, and their state is seen again. The agents service
        refuses new streams meanwhile, so they do not come straight back."""
        if self.leasing:
            self._streams_shed = False
        if not self.hands_off_agents() or self._streams_shed:
            return
        # A stale view with a working database sheds at once (its beats go on, so other
        # replicas take the rows it writes as they are); a lost database waits until the
        # others take it for dead.
        if (
            not self.store_healthy
            and self.store_health.silent_for() < REPLICA_SILENT_BEATS * self._store_probe_interval
        ):
            return
        self._streams_shed = True
        live = [e.subscriber for e in self._agents.values() if e.subscriber is not None]
        for subscriber in live:
            subscriber.close(self.sent_elsewhere_because())
        log.warning("streams_shed", streams=len(live), detail="agents move to other replicas")

    # ------------------------------------------------------------ agents of other replicas

    def adopt_as_served(self, stored: StoredAgent) -> AgentEntry:
        """A stored row as an agent this replica serves: not connected, to a process that
        has just started or has just been chosen by the agent."""
        status = stored.status.copied(connected=False)
        if status.first_seen is not None and (
            stored.status.connected or status.disconnected_at is None
        ):
            status.disconnected_at = status.last_seen
        self._cache.remote.discard(stored.agent_id)
        entry = self._agents[stored.agent_id] = AgentEntry(
            stored.agent_id,
            stored.labels,
            stored.desired,
            status,
            lease_bound_saved=status.lease_expires_at or 0.0,
        )
        self._writer.evidence.apply(stored.agent_id, status)
        return entry

    async def resync_agent(self, agent_id: str) -> None:
        """Before an agent new to this replica connects, read what another replica knew.

        Its history (and above all a sticky VIOLATION) must follow it when it fails over.
        """
        entry = self._agents.get(agent_id)
        if entry is not None and entry.remote is None:
            return
        if entry is None and self._context.store.sole_writer:
            # Memory holds every row there is (all read at start, all written since from
            # here): a read per first connect would only find nothing, 10,000 times over
            # when a new fleet connects.
            return
        stored = await self._context.store.load_agent(agent_id)
        entry = self._agents.get(agent_id)
        if stored is not None and (entry is None or entry.remote is not None):
            cache = self._cache
            cache.reconcile(self.adopt_as_served(stored), cache.active_holds(), self._clock())
            log.info("agent_recalled", agent_id=agent_id, violation=bool(stored.status.violation))

    def adopt_agents(self, changes: AgentChanges) -> None:
        """Show the agents other replicas serve, from the rows they wrote.

        A row replaces this replica's entry unless this replica serves the agent or
        knows a newer stream of it. Each call also brings every remote agent's liveness
        up to date with the beats: a replica that stopped beating has lost its streams,
        and one that beats vouches for the agents it wrote as live.
        """
        now = self._clock()
        cache = self._cache
        active = cache.active_holds()
        beats = changes.beat_ages
        lost_after = REPLICA_SILENT_BEATS * self._store_probe_interval
        self._others_alive = any(
            age <= lost_after for replica, age in beats.items() if replica != self.replica_id
        )
        for row in changes.rows:
            entry = self._agents.get(row.agent_id)
            if entry is not None and entry.remote is None:
                newer = (row.status.connected_at or 0.0) >= (entry.status.connected_at or 0.0)
                if entry.subscriber is not None or not newer:
                    continue
            status = row.status.copied()
            self._writer.evidence.apply(row.agent_id, status)  # a row cannot wipe evidence
            if entry is None:
                entry = self._agents[row.agent_id] = AgentEntry(
                    row.agent_id, row.labels, row.desired, status
                )
            entry.remote, entry.labels, entry.desired, entry.status = (
                row,
                row.labels,
                row.desired,
                status,
            )
            cache.remote.add(row.agent_id)
            self._dirty.discard(row.agent_id)
            cache.upload_allowance_may_change(row.agent_id)
            cache.reconcile(entry, active, now)
        # Every second for every remote agent: assignments only, no copies.
        for agent_id in cache.remote:
            entry = self._agents[agent_id]
            assert entry.remote is not None
            self._apply_liveness(entry.status, entry.remote, beats, now, lost_after)

    def _apply_liveness(
        self,
        status: AgentStatus,
        row: StoredAgent,
        beat_ages: Mapping[str, float],
        now: float,
        lost_after: float,
    ) -> None:
        status.connected, status.disconnected_at = row.status.connected, row.status.disconnected_at
        if not status.connected:
            return
        age = beat_ages.get(row.written_by)
        if age is None or age > lost_after:
            status.connected = False
            status.disconnected_at = now - age if age is not None else row.written_at
            return
        last_seen = row.status.last_seen or 0.0
        if (row.written_at or 0.0) - last_seen <= self._policy.silence_timeout:
            status.last_seen = max(last_seen, now - age)
