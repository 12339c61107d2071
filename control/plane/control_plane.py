"""``ControlPlane``: the plane's parts composed, and the calls most callers make.

Each call is bound straight to the part that answers it (``self.ack =
reports.ack``), so a call through the façade costs exactly what a call to the part
does: the hot paths (ack, heartbeat, lease, upload checks, census) pay no extra layer.
Callers that need one part only may take it (``plane.reports``, ``plane.fleet``, ...).
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from control.domain import CompliancePolicy
from control.domain.timings import DEFAULT_LEASE_TTL_SECONDS
from control.events import ObserverFailures
from control.events import Observers
from control.events import PlaneObserver
from control.freshness import SharedView
from control.plane.audit import AuditRecorder
from control.plane.cache import DesiredStateCache
from control.plane.context import PlaneContext
from control.plane.entries import AgentEntry
from control.plane.holds import HoldCommits
from control.plane.membership import STORE_PROBE_SECONDS
from control.plane.membership import Membership
from control.plane.membership import new_replica_id
from control.plane.reports import AgentReports
from control.plane.views import FleetViews
from control.plane.writer import AgentWriter
from control.store import LoadedState
from control.store import Store
from control.store_health import StoreHealth

log = structlog.get_logger("killswitch.plane")


class ControlPlane:
    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float],
        policy: CompliancePolicy | None = None,
        lease_ttl: float = DEFAULT_LEASE_TTL_SECONDS,
        flush_interval: float = 0.25,
        last_seen_save_interval: float = 60.0,
        before_fanout: Callable[[], None] = lambda: None,
        observer: PlaneObserver | None = None,
        store_probe_interval: float = STORE_PROBE_SECONDS,
        replica_id: str = "",
    ) -> None:
        self._store = store
        self._clock = clock
        self.lease_ttl = lease_ttl
        self.last_seen_save_interval = last_seen_save_interval
        # Who hears of acks, proofs of stop, hold changes: every part that reports events
        # tells the same one, given here once (the server passes its metrics, timeline, ...),
        # always through the guard (``Observers``), so no observer can break an ack.
        self.observer = guarded = (
            observer
            if isinstance(observer, Observers)
            else Observers([observer or PlaneObserver()])
        )
        self.audit = audit = AuditRecorder(store, clock)
        context = PlaneContext(
            store=store,
            clock=clock,
            audit=audit,
            policy=policy or CompliancePolicy(),
            observer=guarded,
            lease_ttl=lease_ttl,
            replica_id=replica_id or new_replica_id(),
        )
        self.policy, self.replica_id = context.policy, context.replica_id
        agents: dict[str, AgentEntry] = {}
        self.writer = writer = AgentWriter(context, agents, flush_interval=flush_interval)
        self.cache = cache = DesiredStateCache(context, agents, writer, before_fanout=before_fanout)
        self.membership = membership = Membership(
            context, cache, store_probe_interval=store_probe_interval
        )
        self.reports = reports = AgentReports(
            context,
            cache,
            membership,
            last_seen_save_interval=last_seen_save_interval,
        )
        self.holds = holds = HoldCommits(context, cache, membership)
        self.fleet = fleet = FleetViews(context, cache, membership)

        self.flush = writer.flush
        # The desired-state cache and its subscribers.
        self.active_holds, self.hold = cache.active_holds, cache.hold
        self.connect, self.disconnect = cache.connect, cache.disconnect
        self.close_stream = cache.close_stream
        self.directive_for, self.directive_sent = cache.directive_for, cache.directive_sent
        self.watch_upload_allowances = cache.watch_upload_allowances
        self.unwatch_upload_allowances = cache.unwatch_upload_allowances
        self.expect_agents, self.adopt_labels = cache.expect_agents, cache.adopt_labels
        # What agents report.
        self.ack, self.nack, self.heartbeat = reports.ack, reports.nack, reports.heartbeat
        self.grant_lease = reports.grant_lease
        self.authorize_upload = reports.authorize_upload
        self.observe_upload = reports.observe_upload
        self.acknowledge_violation = reports.acknowledge_violation
        self.adopt_violations = reports.adopt_violations
        # This replica among the others.
        self.why_not_leasing = membership.why_not_leasing
        self.hands_off_agents = membership.hands_off_agents
        self.sent_elsewhere_because = membership.sent_elsewhere_because
        self.adopt_agents, self.resync_agent = membership.adopt_agents, membership.resync_agent
        # Holds.
        self.create_hold, self.lift_hold = holds.create_hold, holds.lift_hold
        self.commit_lift, self.commit_run = holds.commit_lift, holds.commit_run
        self.adopt_holds, self.resync_holds = holds.adopt_holds, holds.resync_holds
        self.catch_up_to = holds.catch_up_to
        self.opt_out, self.opt_in = holds.opt_out, holds.opt_in
        # Read views.
        self.agent_view, self.views, self.status = fleet.agent_view, fleet.views, fleet.status
        self.snapshot, self.census = fleet.snapshot, fleet.census
        self.agent_records, self.owned_by = fleet.agent_records, fleet.owned_by
        self.desired_and_status = fleet.desired_and_status
        self.upload_allowances = fleet.upload_allowances
        self.upload_allowances_of = fleet.upload_allowances_of

    def now(self) -> float:
        return self._clock()

    @property
    def observer_failures(self) -> ObserverFailures:
        """What the observers raised (and the guard swallowed), by observer."""
        return self.observer.failures

    @property
    def epoch(self) -> int:
        return self.cache.epoch

    @property
    def view(self) -> SharedView:
        return self.membership.view

    @property
    def store_health(self) -> StoreHealth:
        return self.membership.store_health

    @property
    def store_healthy(self) -> bool:
        return self.membership.store_healthy

    @property
    def leasing(self) -> bool:
        return self.membership.leasing

    async def start(self) -> LoadedState:
        """Rebuild memory from the store, then run the flush and probe loops; the rest of
        the state is for the other services."""
        self._store.report_failures_to(self.store_health.failed)
        view = self.membership.view
        read_started = view.read_starting()
        state = await self._store.load()
        view.adopted(read_started)
        cache = self.cache
        cache.epoch = state.shared.epoch
        cache.holds.merge(state.shared.holds)
        for stored in state.agents:
            self.membership.adopt_as_served(stored)
        self.reports.adopt_violations(state.shared.violation_acks, state.shared.violations)
        cache.reconcile_all(self._clock())
        self.writer.start()
        self.membership.start()
        log.info(
            "plane_started",
            epoch=cache.epoch,
            agents=len(cache.agents),
            active_holds=len(cache.active_holds()),
        )
        return state

    async def stop(self) -> None:
        """Stop beating, then write what is left (``AgentWriter.stop``)."""
        await self.membership.stop()
        await self.writer.stop()
