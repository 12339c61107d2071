"""The control plane's side of the ingest gateway: batched verdicts and accepted reports.

The gateway (``killswitch ingest``, role ``ingest``) asks about many batches in one call.
Each is decided by the same rule as ever (``AgentReports.authorize_upload``, that is
``AgentStatus.decide_upload``), which also counts refusals and flags uploads dated after
a stop or checked too long after its ack; nothing here decides a second way. What only
the gateway can see (events after the stop beyond the agent's measured skew) arrives as
``refused_by_gateway`` and becomes violation evidence through the plane, durably, like
any other.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from control.domain import AgentStatus
from control.domain import Mode
from control.errors import InvalidInput
from control.plane import ControlPlane

log = structlog.get_logger("killswitch.ingest")

# One call carries at most this many checks: the gateway batches a few milliseconds'
# worth (hundreds at 10k agents), and a request stays under the server's message cap.
MAX_CHECKS_PER_CALL = 500
# How often a gateway's standing copy hears from the plane (changes, or that nothing
# changed). Its freshness bound (control/ingest/watch.py) is a few of these.
WATCH_TICK_SECONDS = 0.25
# How often a watch compares the whole fleet with what it sent (see UploadWatch).
RESYNC_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Check:
    """One batch the gateway asks about, told by what the verdict depends on (whose, when
    its events were captured, how many): the events themselves never reach this plane."""

    agent_id: str
    sequence: int
    first_event_at: float
    last_event_at: float
    event_count: int
    refused_by_gateway: str = ""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer for one batch, with what the gateway applies itself: the stop time its
    own after-the-stop check measures events against, and whether refused data is kept."""

    allowed: bool
    reason: str
    epoch: int
    # Set only while the agent is paused and has acked it.
    stopped_at: float | None
    lease_expires_at: float | None
    # Paused by holds that keep the spool: refused data is quarantined, not dropped.
    keep_spool: bool = False


@dataclass(frozen=True, slots=True)
class Accepted:
    """One batch that landed in the gateway's sink: the agent's upload figures count
    what arrived, not only what was allowed."""

    agent_id: str
    sequence: int
    event_count: int
    last_event_at: float


def _bounded(count: int, what: str) -> None:
    if count > MAX_CHECKS_PER_CALL:
        raise InvalidInput(f"{count} {what} in one call: at most {MAX_CHECKS_PER_CALL}")


def authorize_batches(plane: ControlPlane, checks: Sequence[Check]) -> list[Verdict]:
    _bounded(len(checks), "checks")
    return [_decide(plane, check) for check in checks]


def _decide(plane: ControlPlane, check: Check) -> Verdict:
    if check.refused_by_gateway:
        reason = check.refused_by_gateway[:300]
        plane.observe_upload(
            check.agent_id, functools.partial(_refused, check, reason, plane.now())
        )
        return Verdict(False, f"refused by the gateway: {reason}", plane.epoch, None, None)
    decision = plane.authorize_upload(
        check.agent_id, check.first_event_at, check.last_event_at, check.event_count
    )
    known = plane.desired_and_status(check.agent_id)
    if known is None:
        return Verdict(decision.allowed, decision.reason, plane.epoch, None, None)
    desired, status = known
    paused = desired.mode is Mode.PAUSED
    return Verdict(
        decision.allowed,
        decision.reason,
        plane.epoch,
        status.stopped_at if paused else None,
        status.lease_expires_at,
        keep_spool=paused and not desired.purge_spool,
    )


class UploadWatch:
    """One gateway's standing copy, kept in step: what to send it next.

    The first message holds every allowed agent; each later one only the agents whose
    allowance changed (a new lease end, or allowed no more), or nothing at all, which
    still tells the gateway its copy is current as of now.

    Edge-triggered, with a level-triggered resync (as Kubernetes informers do): each
    tick looks only at the agents the plane says may have changed
    (``DesiredStateCache.watch_upload_allowances``); a scan of every agent, four times a
    second, was a third of the server's time at 19,000 agents. Every
    ``RESYNC_SECONDS`` the whole fleet is compared with what was sent, and a
    difference the edges missed is sent and logged (``upload_watch_missed_change``:
    a bug to fix, never expected). When the replica starts or stops leasing, the next
    message is a full one.
    """

    def __init__(self, plane: ControlPlane) -> None:
        self._plane = plane
        self._sent: dict[str, float] = {}
        self._changed = plane.watch_upload_allowances()
        self._leasing: bool | None = None  # as of the last full message; None: none sent
        self._resync_at = -math.inf

    def close(self) -> None:
        self._plane.unwatch_upload_allowances(self._changed)

    def next_message(self) -> tuple[float, bool, dict[str, float | None]]:
        """``(as_of, full, changes)``: ``None`` for an agent no longer allowed."""
        as_of, leasing = self._plane.now(), self._plane.leasing
        if leasing != self._leasing:
            self._changed.clear()
            self._sent, self._leasing = self._plane.upload_allowances(), leasing
            self._resync_at = as_of + RESYNC_SECONDS
            return as_of, True, dict(self._sent)
        changed = list(self._changed)
        self._changed.clear()
        changes = self._differences(self._plane.upload_allowances_of(changed))
        if as_of >= self._resync_at:
            self._resync_at = as_of + RESYNC_SECONDS
            changes.update(self._missed(as_of))
        return as_of, False, changes

    def _differences(self, current: Mapping[str, float | None]) -> dict[str, float | None]:
        """What differs from the copy sent, which is brought up to date."""
        changes: dict[str, float | None] = {}
        for agent, until in current.items():
            if self._sent.get(agent) == until:
                continue
            changes[agent] = until
            if until is None:
                del self._sent[agent]
            else:
                self._sent[agent] = until
        return changes

    def _missed(self, now: float) -> dict[str, float | None]:
        """The whole fleet against the copy. A lease that simply ran out is no miss: the
        copy holds its end, and the gateway stops letting the agent in on it then."""
        current: dict[str, float | None] = dict(self._plane.upload_allowances())
        # Sent as allowed, allowed no more, and not because the lease ran out.
        current.update(
            (a, None) for a, until in self._sent.items() if a not in current and until > now
        )
        missed = self._differences(current)
        if missed:
            log.warning("upload_watch_missed_change", agents=len(missed), some=sorted(missed)[:5])
        for agent in [a for a, until in self._sent.items() if until <= now]:
            del self._sent[agent]  # ran out: forgotten here, as on the gateway
        return missed


def record_accepted(plane: ControlPlane, batches: Sequence[Accepted]) -> None:
    """What landed in the gateway's sink, for the per-laptop figures (and as evidence)."""
    _bounded(len(batches), "accepted batches")
    for batch in batches:
        plane.observe_upload(
            batch.agent_id,
            functools.partial(_landed, batch=batch, at=plane.now()),
        )


def _landed(status: AgentStatus, *, batch: Accepted, at: float) -> bool:
    return status.record_accepted(batch.sequence, batch.event_count, batch.last_event_at, at)


def _refused(check: Check, reason: str, at: float, status: AgentStatus) -> bool:
    """Evidence: the violation it flags is written at once (and the refusal is urgent
    even when the agent is in VIOLATION already: its latest evidence)."""
    status.record_gateway_refusal(
        check.sequence,
        check.event_count,
        captured=(check.first_event_at, check.last_event_at),
        reason=reason,
        at=at,
    )
    return True
