"""Operator and SelfService: the APIs behind the ``killswitch`` CLI.

Who is calling comes from ``current_principal()`` (set by the authorisation
interceptor from the caller's certificate); no request field names the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from typing import Protocol

import grpc
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from control.domain.identity import Principal
from control.errors import InvalidInput
from control.governance import Governance
from control.ingest_checks import WATCH_TICK_SECONDS
from control.ingest_checks import Accepted
from control.ingest_checks import Check
from control.ingest_checks import UploadWatch
from control.ingest_checks import authorize_batches
from control.ingest_checks import record_accepted
from control.plane import ControlPlane
from control.readiness import Readiness
from control.rpc.authz import current_principal
from control.rpc.authz import peer_host
from control.rpc.convert import agent_to_pb
from control.rpc.convert import audit_entry_to_pb
from control.rpc.convert import certificate_to_pb
from control.rpc.convert import filter_from_pb
from control.rpc.convert import hold_to_pb
from control.rpc.convert import laptop_to_pb
from control.rpc.convert import readiness_to_pb
from control.rpc.convert import resume_request_to_pb
from control.rpc.convert import scope_from_pb
from control.rpc.convert import seconds
from control.rpc.convert import timestamp

Context = grpc.aio.ServicerContext[Any, Any]


def required(value: str, what: str) -> str:
    if not value.strip():
        raise InvalidInput(f"{what} is required")
    return value.strip()


class OperatorService(pb_grpc.OperatorServicer):
    def __init__(self, plane: ControlPlane, governance: Governance, readiness: Readiness) -> None:
        self._plane = plane
        self._governance = governance
        self._readiness = readiness

    async def CreateHold(  # noqa: N802
        self, request: pb.CreateHoldRequest, context: Context
    ) -> pb.CreateHoldResponse:
        hold, covered = await self._plane.create_hold(
            scope_from_pb(request.scope),
            request.reason,
            request.ticket,
            current_principal(),
            keep_spool=request.keep_spool,
        )
        return pb.CreateHoldResponse(
            hold=hold_to_pb(hold), epoch=hold.created_epoch, covered_agents=covered
        )

    async def ListHolds(  # noqa: N802
        self, request: pb.ListHoldsRequest, context: Context
    ) -> pb.ListHoldsResponse:
        return pb.ListHoldsResponse(
            holds=[hold_to_pb(h) for h in self._plane.active_holds()], epoch=self._plane.epoch
        )

    async def GetStatus(  # noqa: N802
        self, request: pb.GetStatusRequest, context: Context
    ) -> pb.GetStatusResponse:
        summary = self._plane.status(filter_from_pb(request.filter), request.unsettled_limit)
        return pb.GetStatusResponse(
            epoch=summary.epoch,
            holds=[hold_to_pb(h) for h in summary.holds],
            total=summary.total,
            by_state=[pb.StateCount(state=s.value, count=n) for s, n in summary.by_state.items()],
            compliant=summary.compliant,
            settled=summary.settled,
            unsettled=[agent_to_pb(v) for v in summary.unsettled],
        )

    async def ListAgents(  # noqa: N802
        self, request: pb.ListAgentsRequest, context: Context
    ) -> AsyncIterator[pb.AgentRecord]:
        for view in self._plane.views(filter_from_pb(request.filter)):
            yield agent_to_pb(view)

    async def ExpectAgents(  # noqa: N802
        self, request: pb.ExpectAgentsRequest, context: Context
    ) -> pb.ExpectAgentsResponse:
        tally = await self._plane.expect_agents(
            ((a.agent_id, dict(a.labels)) for a in request.agents), current_principal()
        )
        return pb.ExpectAgentsResponse(
            added=tally.added,
            already_known=tally.known,
            relabelled=tally.relabelled,
        )

    async def AcknowledgeViolation(  # noqa: N802
        self, request: pb.AcknowledgeViolationRequest, context: Context
    ) -> pb.AcknowledgeViolationResponse:
        note = required(request.note, "a note (what was found and done about it)")
        evidence = await self._plane.acknowledge_violation(
            request.agent_id, current_principal(), note
        )
        return pb.AcknowledgeViolationResponse(violation=evidence)

    # -------------------------------------------------------- two-person resume

    def _resume_response(self, request: Any) -> pb.ResumeRequestResponse:
        return pb.ResumeRequestResponse(request=resume_request_to_pb(request, self._now()))

    def _now(self) -> float:
        return self._plane.now()

    async def RequestResume(  # noqa: N802
        self, request: pb.RequestResumeRequest, context: Context
    ) -> pb.ResumeRequestResponse:
        opened = await self._governance.request_resume(
            current_principal(),
            required(request.hold_id, "a hold id"),
            request.reason,
            request.ticket,
            expires_in=request.expires_in_seconds,
            for_runbook=request.for_runbook,
        )
        return self._resume_response(opened)

    async def EditResumeRequest(  # noqa: N802
        self, request: pb.EditResumeRequestRequest, context: Context
    ) -> pb.ResumeRequestResponse:
        if not (request.reason.strip() or request.ticket.strip()):
            raise InvalidInput("nothing to change: give a new reason or ticket")
        edited = await self._governance.edit_request(
            current_principal(),
            required(request.request_id, "a request id"),
            request.reason,
            request.ticket,
        )
        return self._resume_response(edited)

    async def ApproveResume(  # noqa: N802
        self, request: pb.DecideResumeRequest, context: Context
    ) -> pb.DecideResumeResponse:
        approved = await self._governance.approve(
            current_principal(),
            required(request.request_id, "a request id"),
            request.revision,
            request.note,
        )
        return pb.DecideResumeResponse(
            request=resume_request_to_pb(approved, self._now()), epoch=approved.lifted_epoch
        )

    async def DenyResume(  # noqa: N802
        self, request: pb.DecideResumeRequest, context: Context
    ) -> pb.DecideResumeResponse:
        denied = await self._governance.deny(
            current_principal(),
            required(request.request_id, "a request id"),
            request.revision,
            required(request.note, "a note (why the resume is denied)"),
        )
        return pb.DecideResumeResponse(request=resume_request_to_pb(denied, self._now()))

    async def ListResumeRequests(  # noqa: N802
        self, request: pb.ListResumeRequestsRequest, context: Context
    ) -> pb.ListResumeRequestsResponse:
        found = self._governance.requests(
            request.request_id.strip(), include_closed=request.include_closed
        )
        now = self._now()
        return pb.ListResumeRequestsResponse(requests=[resume_request_to_pb(r, now) for r in found])

    # -------------------------------------------------------- audit, enrolment, certs

    async def ListAudit(  # noqa: N802
        self, request: pb.ListAuditRequest, context: Context
    ) -> pb.ListAuditResponse:
        entries, head = await self._governance.read_audit(request.after_seq, request.limit)
        return pb.ListAuditResponse(
            entries=[audit_entry_to_pb(e) for e in entries], head_seq=head.seq, head_hash=head.hash
        )

    async def CreateEnrollToken(  # noqa: N802
        self, request: pb.CreateEnrollTokenRequest, context: Context
    ) -> pb.CreateEnrollTokenResponse:
        issued = await self._governance.create_enroll_token(
            current_principal(),
            uses=request.uses or 1,
            ttl=request.ttl_seconds or 3600.0,
            labels=dict(request.labels),
        )
        return pb.CreateEnrollTokenResponse(
            token=issued.text,
            token_id=issued.token.id,
            expires_at=timestamp(issued.token.expires_at),
            uses=issued.token.uses_left,
        )

    async def RevokeCertificates(  # noqa: N802
        self, request: pb.RevokeCertificatesRequest, context: Context
    ) -> pb.RevokeCertificatesResponse:
        revoked, closed = await self._governance.revoke(
            current_principal(),
            required(request.subject_or_serial, "a certificate subject or serial"),
            request.reason.strip(),
        )
        return pb.RevokeCertificatesResponse(
            revoked=[certificate_to_pb(c) for c in revoked], streams_closed=closed
        )

    async def GetReadiness(  # noqa: N802
        self, request: pb.GetReadinessRequest, context: Context
    ) -> pb.GetReadinessResponse:
        return readiness_to_pb(await self._readiness.assess())

    async def ListCertificates(  # noqa: N802
        self, request: pb.ListCertificatesRequest, context: Context
    ) -> pb.ListCertificatesResponse:
        certs = await self._governance.certificates()
        return pb.ListCertificatesResponse(certificates=[certificate_to_pb(c) for c in certs])


class SelfService(pb_grpc.SelfServiceServicer):
    """An employee's own laptops, found by the ``owner`` label matching their certificate."""

    def __init__(self, plane: ControlPlane, governance: Governance) -> None:
        self._plane = plane
        self._governance = governance

    async def ListMyLaptops(  # noqa: N802
        self, request: pb.ListMyLaptopsRequest, context: Context
    ) -> pb.ListMyLaptopsResponse:
        holds = self._plane.active_holds()
        return pb.ListMyLaptopsResponse(
            laptops=[laptop_to_pb(v, holds) for v in self._plane.owned_by(current_principal())]
        )

    async def OptOut(  # noqa: N802
        self, request: pb.OptOutRequest, context: Context
    ) -> pb.OptOutResponse:
        hold, _ = await self._plane.opt_out(
            required(request.agent_id, "a laptop id"), current_principal(), request.reason
        )
        return pb.OptOutResponse(hold=hold_to_pb(hold), epoch=hold.created_epoch)

    async def OptIn(  # noqa: N802
        self, request: pb.OptInRequest, context: Context
    ) -> pb.OptInResponse:
        hold = await self._plane.opt_in(
            required(request.agent_id, "a laptop id"), current_principal()
        )
        return pb.OptInResponse(hold=hold_to_pb(hold), epoch=hold.lifted_epoch)


class LoginLinks(Protocol):
    """What the login-link call needs of the dashboard's sessions: the web side's
    ``control.web.sessions.DashboardSessions``, which the gRPC adapters do not import."""

    async def issue_login(self, principal: Principal) -> tuple[str, float]: ...


class DashboardService(pb_grpc.DashboardServicer):
    """One-time login links for the web dashboard, in the caller's own name and role."""

    def __init__(self, sessions: LoginLinks, dashboard_url: str) -> None:
        self._sessions = sessions
        self._dashboard_url = dashboard_url

    async def CreateSession(  # noqa: N802
        self, request: pb.CreateDashboardSessionRequest, context: Context
    ) -> pb.CreateDashboardSessionResponse:
        token, expires_at = await self._sessions.issue_login(current_principal())
        return pb.CreateDashboardSessionResponse(
            login_url=f"{self._dashboard_url}/login?token={token}",
            expires_at=timestamp(expires_at),
        )


class IngestService(pb_grpc.IngestServicer):
    """Asked by the ingest gateway (role ``ingest``) before a batch lands, for any agent."""

    def __init__(self, plane: ControlPlane, governance: Governance) -> None:
        self._plane = plane
        self._governance = governance

    async def AuthorizeUpload(  # noqa: N802
        self, request: pb.AuthorizeUploadRequest, context: Context
    ) -> pb.AuthorizeUploadResponse:
        decision = self._plane.authorize_upload(
            request.agent_id,
            seconds(request.first_event_at),
            seconds(request.last_event_at),
            request.event_count,
        )
        return pb.AuthorizeUploadResponse(allowed=decision.allowed, reason=decision.reason)

    async def AuthorizeBatches(  # noqa: N802
        self, request: pb.AuthorizeBatchesRequest, context: Context
    ) -> pb.AuthorizeBatchesResponse:
        checks = [
            Check(
                c.agent_id,
                c.sequence,
                seconds(c.first_event_at),
                seconds(c.last_event_at),
                c.event_count,
                c.refused_by_gateway,
            )
            for c in request.checks
        ]
        verdicts = authorize_batches(self._plane, checks)
        return pb.AuthorizeBatchesResponse(
            verdicts=[
                pb.BatchVerdict(
                    allowed=v.allowed,
                    reason=v.reason,
                    epoch=v.epoch,
                    stopped_at=timestamp(v.stopped_at),
                    lease_expires_at=timestamp(v.lease_expires_at),
                    keep_spool=v.keep_spool,
                )
                for v in verdicts
            ],
            epoch=self._plane.epoch,
        )

    async def WatchUploads(  # noqa: N802
        self, request: pb.WatchUploadsRequest, context: Context
    ) -> AsyncIterator[pb.UploadStates]:
        """The ingest gateway's standing copy, a message every ``WATCH_TICK_SECONDS``."""
        watch = UploadWatch(self._plane)
        try:
            while True:
                as_of, full, changes = watch.next_message()
                yield pb.UploadStates(
                    as_of=timestamp(as_of),
                    full=full,
                    states=[
                        pb.UploadState(agent_id=agent, lease_expires_at=timestamp(until))
                        for agent, until in changes.items()
                    ],
                )
                await asyncio.sleep(WATCH_TICK_SECONDS)
        finally:
            watch.close()

    async def RecordAccepted(  # noqa: N802
        self, request: pb.RecordAcceptedRequest, context: Context
    ) -> pb.RecordAcceptedResponse:
        record_accepted(
            self._plane,
            [
                Accepted(b.agent_id, b.sequence, b.event_count, seconds(b.last_event_at))
                for b in request.batches
            ],
        )
        return pb.RecordAcceptedResponse()


class EnrollmentService(pb_grpc.EnrollmentServicer):
    """On its own server-auth TLS port: the token, not a certificate, is the credential."""

    def __init__(self, governance: Governance) -> None:
        self._governance = governance

    async def Enroll(  # noqa: N802
        self, request: pb.EnrollRequest, context: Context
    ) -> pb.EnrollResponse:
        cert_pem, ca_pem = await self._governance.enroll(
            request.token, request.agent_id, request.csr_pem, source=peer_host(context.peer())
        )
        return pb.EnrollResponse(certificate_pem=cert_pem.decode(), ca_pem=ca_pem.decode())
