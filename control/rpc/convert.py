"""Conversions between domain objects and ``killswitch.v1`` messages, in one place."""

from __future__ import annotations

import math
from collections.abc import Iterable

from google.protobuf.timestamp_pb2 import Timestamp
from killswitch.v1 import killswitch_pb2 as pb

from control.domain import CaptureReport
from control.domain import ComplianceState
from control.domain import Hold
from control.domain import HoldKind
from control.domain import Mode
from control.domain import Scope
from control.domain import ScopeKind
from control.domain import validate_labels
from control.domain.approvals import ResumeRequest
from control.domain.approvals import ResumeState
from control.domain.audit import AuditEntry
from control.domain.identity import CertificateRecord
from control.domain.readiness import ReadinessReport
from control.errors import InvalidInput
from control.errors import shown
from control.plane import AgentFilter
from control.plane import AgentView
from control.plane import DirectiveSpec

MODE_TO_PB = {Mode.PAUSED: pb.MODE_PAUSED, Mode.ALLOWED: pb.MODE_ALLOWED}
MODE_FROM_PB = {v: k for k, v in MODE_TO_PB.items()}
HOLD_KIND_TO_PB = {
    HoldKind.INCIDENT: pb.HOLD_KIND_INCIDENT,
    HoldKind.OPT_OUT: pb.HOLD_KIND_OPT_OUT,
    HoldKind.ROLLOUT: pb.HOLD_KIND_ROLLOUT,
}


def timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


MAX_INT64 = 2**63 - 1


def seconds(ts: Timestamp) -> float:
    try:
        return ts.ToNanoseconds() / 1e9
    except (ValueError, OverflowError):
        raise InvalidInput(
            f"timestamp out of range ({ts.seconds} s, {ts.nanos} ns): years 1-9999 only"
        ) from None


def bounded(value: int, what: str) -> int:
    """uint64 on the wire, int64 in the store: a larger value is a confused or hostile sender."""
    if value > MAX_INT64:
        raise InvalidInput(f"{what} out of range: {value}")
    return value


def since_ack_from_pb(value: float) -> float | None:
    """A heartbeat's ``seconds_since_ack``: 0 (unset) is None; what no clock could count
    (negative, NaN, infinite) is a confused or hostile sender."""
    if value == 0.0:
        return None
    if not math.isfinite(value) or value < 0:
        raise InvalidInput(f"seconds_since_ack out of range: {value}")
    return value


def mode_from_pb(value: int) -> Mode:
    try:
        return MODE_FROM_PB[value]  # type: ignore[index]
    except KeyError:
        raise InvalidInput(f"unknown mode {value}") from None


def channels_from_pb(channels: Iterable[pb.Channel]) -> dict[str, bool]:
    return {c.name: c.state == pb.CHANNEL_STATE_ACTIVE for c in channels}


def report_from_pb(report: pb.CaptureReport) -> CaptureReport:
    return CaptureReport(
        events_total=report.events_captured_total,
        last_event_at=seconds(report.last_event_at) if report.HasField("last_event_at") else None,
        spool_events=report.spool_events,
    )


def scope_to_pb(scope: Scope) -> pb.Scope:
    if scope.kind is ScopeKind.SELECTOR:
        return pb.Scope(selector=pb.Selector(match_labels=dict(scope.match_labels)))
    if scope.kind is ScopeKind.AGENTS:
        return pb.Scope(agents=pb.AgentIds(ids=sorted(scope.agent_ids)))
    return pb.Scope(all=True)


def scope_from_pb(scope: pb.Scope) -> Scope:
    target = scope.WhichOneof("target")
    if target == "all" and scope.all:
        return Scope.fleet()
    if target == "selector":
        return Scope.selector(dict(scope.selector.match_labels))
    if target == "agents":
        return Scope.agents(scope.agents.ids)
    raise InvalidInput("a scope is required: all, a selector, or agent ids")


def hold_to_pb(hold: Hold) -> pb.Hold:
    return pb.Hold(
        id=hold.id,
        kind=HOLD_KIND_TO_PB[hold.kind],
        scope=scope_to_pb(hold.scope),
        reason=hold.reason,
        ticket=hold.ticket,
        created_by=hold.created_by,
        created_at=timestamp(hold.created_at),
        created_epoch=hold.created_epoch,
        lifted_at=timestamp(hold.lifted_at),
        lifted_by=hold.lifted_by,
        lifted_epoch=hold.lifted_epoch,
        keep_spool=hold.keep_spool,
    )


def directive_to_pb(spec: DirectiveSpec) -> pb.ServerMessage:
    return pb.ServerMessage(
        directive=pb.Directive(
            epoch=spec.epoch,
            mode=MODE_TO_PB[spec.desired.mode],
            reason=spec.decision.reason or spec.desired.reason,
            hold_ids=spec.desired.hold_ids,
            heartbeat_interval_seconds=spec.heartbeat_interval,
            lease_ttl_seconds=spec.lease_ttl,
            purge_spool=spec.desired.purge_spool,
            ticket=spec.decision.ticket,
            decided_by=spec.decision.decided_by,
            opt_out=spec.decision.opt_out,
        )
    )


def agent_to_pb(view: AgentView) -> pb.AgentRecord:
    status = view.status
    return pb.AgentRecord(
        agent_id=view.agent_id,
        labels=dict(view.labels),
        mode=MODE_TO_PB[view.desired.mode],
        state=view.compliance.state.value,
        reason=view.compliance.reason,
        since=timestamp(view.compliance.since),
        connected=status.connected,
        last_seen=timestamp(status.last_seen),
        applied_epoch=status.acked_epoch,
        desired_epoch=view.desired.epoch,
        hold_ids=view.desired.hold_ids,
        directive_sent_at=timestamp(status.directive_sent_at),
        acked_at=timestamp(status.acked_at),
        lease_expires_at=timestamp(status.lease_expires_at),
        events_captured_total=status.report.events_total,
        spool_events=status.report.spool_events,
        verified_at=timestamp(status.verified_at),
        uploads_refused=status.uploads_refused,
        reported_labels=status.reported_labels or {},
        events_accepted_after_pause=status.events_accepted_after_pause,
        last_accepted_event_at=timestamp(status.last_accepted_event_at),
    )


def filter_from_pb(message: pb.AgentFilter) -> AgentFilter:
    state = None
    if message.state:
        try:
            state = ComplianceState(message.state.upper())
        except ValueError:
            known = ", ".join(s.value for s in ComplianceState)
            raise InvalidInput(f"unknown state {shown(message.state)}; one of: {known}") from None
    return AgentFilter(
        state=state,
        match_labels=validate_labels(dict(message.match_labels)),
        hold_id=message.hold_id,
    )


RESUME_STATE_TO_PB = {
    ResumeState.PENDING: pb.RESUME_STATE_PENDING,
    ResumeState.APPROVED: pb.RESUME_STATE_APPROVED,
    ResumeState.DENIED: pb.RESUME_STATE_DENIED,
    ResumeState.EXPIRED: pb.RESUME_STATE_EXPIRED,
    ResumeState.EXECUTED: pb.RESUME_STATE_EXECUTED,
}


def resume_request_to_pb(request: ResumeRequest, now: float) -> pb.ResumeRequest:
    return pb.ResumeRequest(
        id=request.id,
        hold_id=request.hold_id,
        requested_by=request.requested_by,
        reason=request.reason,
        ticket=request.ticket,
        created_at=timestamp(request.created_at),
        expires_at=timestamp(request.expires_at),
        state=RESUME_STATE_TO_PB[request.current_state(now)],
        revision=request.revision,
        approvals=[
            pb.Approval(approver=a.approver, at=timestamp(a.at), revision=a.revision, note=a.note)
            for a in request.approvals
        ],
        for_runbook=request.for_runbook,
        decided_by=request.decided_by,
        decided_at=timestamp(request.decided_at),
        decision_note=request.decision_note,
        lifted_epoch=request.lifted_epoch,
        drill_runbook=request.drill_runbook,
        drill_sha256=request.drill_sha256,
    )


def audit_entry_to_pb(entry: AuditEntry) -> pb.AuditEntry:
    r = entry.record
    return pb.AuditEntry(
        seq=entry.seq,
        at=timestamp(r.at),
        actor=r.actor,
        role=r.role,
        action=r.action,
        target=r.target,
        reason=r.reason,
        ticket=r.ticket,
        result=r.result,
        detail=r.detail,
        prev_hash=entry.prev_hash,
        hash=entry.hash,
    )


def certificate_to_pb(cert: CertificateRecord) -> pb.Certificate:
    return pb.Certificate(
        serial=cert.serial,
        subject=cert.subject,
        role=cert.role.value,
        not_after=timestamp(cert.not_after),
        issued_at=timestamp(cert.issued_at),
        revoked_at=timestamp(cert.revoked_at),
    )


def laptop_to_pb(view: AgentView, holds: Iterable[Hold]) -> pb.Laptop:
    """The employee's view: states and hold reasons, never who paused it or other laptops."""
    covering = [h for h in holds if h.id in view.desired.hold_ids]
    return pb.Laptop(
        agent_id=view.agent_id,
        mode=MODE_TO_PB[view.desired.mode],
        state=view.compliance.state.value,
        connected=view.status.connected,
        last_seen=timestamp(view.status.last_seen),
        holds=[pb.HoldReason(kind=HOLD_KIND_TO_PB[h.kind], reason=h.reason) for h in covering],
        opted_out=any(h.kind is HoldKind.OPT_OUT for h in covering),
    )


def readiness_to_pb(report: ReadinessReport) -> pb.GetReadinessResponse:
    return pb.GetReadinessResponse(
        agents=report.agents,
        ready=report.ready,
        classes=[
            pb.ReadinessClassCount(name=cls.value, agents=n, cannot_honour=cls.cannot_honour)
            for cls, n in report.counts().items()
        ],
        findings=[
            pb.ReadinessFinding(
                agent_id=f.agent_id,
                classes=[c.value for c in f.classes],
                details=list(f.details),
                cannot_honour=f.cannot_honour,
            )
            for f in report.findings
        ],
        policy=report.policy.describe(),
    )
