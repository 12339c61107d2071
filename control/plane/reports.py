"""What each agent reports, taken in: acks, nacks, heartbeats, lease requests, upload
checks, and the violations any of them may reveal.

These run once per agent message (10,000 agents, every few seconds), so each is a
dictionary lookup, a domain call on the agent's status and a set insertion for the
batched writer; nothing here waits for the store.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import structlog

from control.domain import AgentStatus
from control.domain import CaptureReport
from control.domain import Mode
from control.domain import UploadDecision
from control.domain import validate_agent_id
from control.domain.identity import Principal
from control.errors import Conflict
from control.errors import NotFound
from control.errors import shown
from control.plane.cache import DesiredStateCache
from control.plane.context import PlaneContext
from control.plane.entries import AgentEntry
from control.plane.membership import Membership
from control.plane.part import AgentStatePart
from control.store import ViolationEvidence

log = structlog.get_logger("killswitch.plane")


@dataclass(frozen=True, slots=True)
class LeaseDecision:
    """The answer to one lease request: a refusal is an answer with its reason, not an
    error, because the agent simply keeps capture off until a later request is granted."""

    granted: bool
    ttl: float
    reason: str


class AgentReports(AgentStatePart):
    def __init__(
        self,
        context: PlaneContext,
        cache: DesiredStateCache,
        membership: Membership,
        *,
        last_seen_save_interval: float,
    ) -> None:
        super().__init__(context, cache)
        self._figures_unsaved = cache.writer.figures_unsaved
        self._evidence = cache.writer.evidence
        self._membership = membership
        # 10,000 agents heartbeating every 10 s would otherwise rewrite 1,000 rows a second
        # only to move last_seen; memory stays exact, the stored copy may lag this much.
        self._last_seen_save_interval = last_seen_save_interval

    def ack(
        self,
        agent_id: str,
        epoch: int,
        mode: Mode,
        channels: Mapping[str, bool],
        report: CaptureReport,
        *,
        purged: int = 0,
        quarantined: int = 0,
    ) -> None:
        entry = self._agents[agent_id]
        if epoch > entry.status.directive_sent_epoch:
            self._ignore_unsent(entry, epoch, "unsent_epoch_ack_ignored")
            return
        status = entry.status
        now = self._clock()
        with self._watching_for_violation(entry):
            recorded = status.record_ack(
                epoch,
                mode,
                channels,
                report,
                now,
                desired=entry.desired,
                purged=purged,
                quarantined=quarantined,
            )
        if not recorded:
            log.info(
                "stale_ack_ignored", agent_id=agent_id, epoch=epoch, acked_epoch=status.acked_epoch
            )
        else:
            # For history checks (tests run with --log-level debug): what was acked, when.
            log.debug("agent_acked", agent_id=agent_id, epoch=epoch, mode=mode.value)
            current = epoch >= entry.desired.epoch and mode is entry.desired.mode
            latency = now - entry.desired.since if current else None
            self.observer.acked(agent_id, epoch=epoch, mode=mode, latency=latency, at=now)
        self._dirty.add(agent_id)

    def nack(self, agent_id: str, epoch: int, reason: str) -> None:
        entry = self._agents[agent_id]
        if epoch > entry.status.directive_sent_epoch:
            self._ignore_unsent(entry, epoch, "unsent_epoch_nack_ignored")
            return
        now = self._clock()
        if entry.status.record_nack(epoch, reason, now):
            log.warning("agent_nacked", agent_id=agent_id, epoch=epoch, reason=reason)
            self.observer.nacked(agent_id, epoch=epoch, reason=reason, at=now)
        self._dirty.add(agent_id)

    @staticmethod
    def _ignore_unsent(entry: AgentEntry, epoch: int, event: str) -> None:
        """An ack or nack counts against the directive sent on this stream: an epoch this
        stream never carried is a confused or lying agent (dropping the stream would
        only start a reconnect loop), so it is logged and ignored."""
        sent_epoch = entry.status.directive_sent_epoch
        log.warning(event, agent_id=entry.agent_id, epoch=epoch, sent_epoch=sent_epoch)

    def heartbeat(
        self,
        agent_id: str,
        channels: Mapping[str, bool],
        report: CaptureReport,
        since_ack: float | None = None,
    ) -> None:
        """Changes are written at the next flush; bare liveness only now and then.
        ``since_ack``: the agent's own count of seconds since its ack (proof reports)."""
        entry = self._agents[agent_id]
        now = self._clock()
        was_verified = entry.status.verified_at is not None
        with self._watching_for_violation(entry):
            changed = entry.status.record_heartbeat(
                channels,
                report,
                now,
                desired=entry.desired,
                verify_after=self._policy.verify_after,
                since_ack=since_ack,
            )
        if (
            changed
            or entry.silent_saved
            or now - entry.last_seen_saved >= self._last_seen_save_interval
        ):
            self._dirty.add(agent_id)
        self.observer.heartbeat(agent_id, at=now)
        if not was_verified and entry.status.verified_at is not None:
            self.observer.verified(
                agent_id,
                epoch=entry.desired.epoch,
                latency=entry.status.verified_at - entry.desired.since,
                at=now,
            )

    def grant_lease(self, agent_id: str) -> LeaseDecision:
        """Leases go only to agents whose effective state is ALLOWED (asked on their stream)."""
        entry = self._agents[agent_id]
        if entry.desired.mode is not Mode.ALLOWED:
            return LeaseDecision(False, 0.0, f"paused: {entry.desired.reason}")
        # ``Membership.why_not_leasing``'s two checks, inline: this runs for every agent
        # every few seconds.
        membership = self._membership
        if not membership.store_healthy:
            # A lease nobody can write down would outlive what a restart or another
            # replica knows: refuse, and let capture stop when the current one ends.
            return LeaseDecision(False, 0.0, membership.store_health.cause)
        view = membership.view
        if view.stale:
            return LeaseDecision(False, 0.0, view.describe_staleness())
        # Ends one TTL after the view's time, not the grant's: see control.freshness.
        ttl = view.lease_seconds()
        expires_at = self._clock() + ttl
        if entry.status.record_lease(expires_at):
            self._dirty.add(agent_id)  # its stop ended: a later pause takes a new baseline
        self._cache.upload_allowance_may_change(agent_id)
        if expires_at > entry.lease_bound_saved:
            entry.lease_bound_saved = expires_at + self._context.lease_ttl
            self._dirty.add(agent_id)
        log.debug("lease_granted", agent_id=agent_id, epoch=self._cache.epoch, ttl=ttl)
        return LeaseDecision(True, ttl, "ok")

    def authorize_upload(
        self, agent_id: str, first_event_at: float, last_event_at: float, count: int
    ) -> UploadDecision:
        entry = self._agents.get(agent_id)
        if entry is None:
            return UploadDecision(False, f"unknown agent {shown(agent_id)}")
        with self._watching_for_violation(entry):
            decision = entry.status.decide_upload(
                first_event_at, last_event_at, count, self._clock(), desired=entry.desired
            )
        if not decision.allowed:  # the refusal count changed; an allowed batch changes nothing
            self._dirty.add(agent_id)
            log.info("upload_refused", agent_id=agent_id, events=count, reason=decision.reason)
            self.observer.upload_refused(agent_id, reason=decision.reason, at=self._clock())
        return decision

    def observe_upload(self, agent_id: str, observe: Callable[[AgentStatus], bool]) -> bool:
        """Apply what the ingest gateway saw (control/ingest_checks.py decides what); False
        for an agent the plane does not know.

        Any violation it finds becomes durable evidence at the next flush, and so does
        whatever ``observe`` says must be written now (True); figures alone (the last
        accepted capture time of an agent landing a batch every 30 s) are written at the
        liveness cadence, not a row per batch."""
        entry = self._agents.get(agent_id)
        if entry is None:
            return False
        with self._watching_for_violation(entry):
            urgent = observe(entry.status)
        if urgent or self._clock() - entry.row_saved_at >= self._last_seen_save_interval:
            self._dirty.add(agent_id)
        else:
            self._figures_unsaved.add(agent_id)
        return True

    # ------------------------------------------------------------ violations

    @contextmanager
    def _watching_for_violation(self, entry: AgentEntry) -> Iterator[None]:
        """Evidence may arrive with any report, on any replica: log it, and append it
        for every replica at the next flush."""
        had_violation = bool(entry.status.violation)
        yield
        status = entry.status
        if status.violation and status.violation_at is not None and not had_violation:
            self._dirty.add(entry.agent_id)
            self._evidence.record(
                entry.agent_id, status.violation, status.violation_at, epoch=entry.desired.epoch
            )
            log.error(
                "violation_detected",
                agent_id=entry.agent_id,
                evidence=entry.status.violation,
                epoch=entry.desired.epoch,
            )
            self.observer.violation(
                entry.agent_id, evidence=entry.status.violation, at=self._clock()
            )

    async def acknowledge_violation(self, agent_id: str, by: Principal, note: str) -> str:
        entry = self._agents.get(validate_agent_id(agent_id))
        if entry is None:
            raise NotFound(f"unknown agent {shown(agent_id)}")
        evidence, flagged_at = entry.status.violation, entry.status.violation_at
        if not evidence or flagged_at is None:
            raise Conflict(f"agent {agent_id!r} has no violation to acknowledge")
        # Stored for every replica: the one serving the agent clears it there too.
        await self._context.store.acknowledge_violation(
            agent_id,
            flagged_at,
            self._context.audit.record(
                by, "agent.acknowledge_violation", target=agent_id, reason=note, detail=evidence
            ),
        )
        self.adopt_violations({agent_id: flagged_at}, [])
        log.warning(
            "violation_acknowledged",
            agent_id=agent_id,
            operator=by.name,
            note=note,
            evidence=evidence,
        )
        return evidence

    def adopt_violations(
        self, acks: Mapping[str, float], evidence: Sequence[ViolationEvidence]
    ) -> None:
        """Take acknowledgements and evidence from any replica: each agent's violation is
        its earliest evidence no acknowledgement covers (a later one is a new violation)."""
        for agent_id in self._evidence.adopt(acks, evidence):
            entry = self._agents.get(agent_id)
            if entry is not None and self._evidence.apply(agent_id, entry.status):
                self._dirty.add(agent_id)
                log.info("violation_adopted", agent_id=agent_id, evidence=entry.status.violation)
