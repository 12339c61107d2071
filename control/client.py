"""A typed client of the control server's operator services, for the CLI, benches and tests.

One channel per client, set up for mTLS (an identity directory's certificate) or, against
a ``serve --insecure`` development server, plaintext with a claimed ``NAME:ROLE``. Each
call has a deadline, and a failed call raises the project's own errors
(``control.errors``) with a one-line message, never a ``grpc.RpcError``: a caller
catches ``KillswitchError`` and shows ``str(error)``.

The methods are the RPCs by their snake_case names, taking and returning the protobuf
messages, so a caller is type-checked against ``killswitch.proto``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from typing import TypeVar

import grpc
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from control.errors import Conflict
from control.errors import InvalidInput
from control.errors import KillswitchError
from control.errors import NotFound
from control.errors import PermissionDenied
from control.errors import ServerStoreUnavailable
from control.errors import ServerTimedOut
from control.errors import ServerUnreachable
from control.pki import Identity
from control.wire import INSECURE_IDENTITY_HEADER
from control.wire import STORE_UNAVAILABLE_METADATA

RPC_TIMEOUT_SECONDS = 15.0
# A stream (agents, a report) runs longer than one answer.
STREAM_TIMEOUT_SECONDS = RPC_TIMEOUT_SECONDS * 4

Request = TypeVar("Request")
Response = TypeVar("Response")


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who the client says it is: an identity (mTLS), or else an insecure claim."""

    identity: Identity | None = None
    insecure_claim: str = ""


class OperatorClient:
    """The Operator, SelfService, Dashboard, Runbooks and Reports services on one channel."""

    def __init__(
        self,
        address: str,
        credentials: Credentials,
        *,
        timeout: float = RPC_TIMEOUT_SECONDS,
        stream_timeout: float = STREAM_TIMEOUT_SECONDS,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """``options``: gRPC channel arguments (a bench shortens the reconnect backoff)."""
        self.address = address
        self._timeout = timeout
        self._stream_timeout = stream_timeout
        self._metadata: tuple[tuple[str, str], ...] = ()
        identity = credentials.identity
        if identity is None:
            self._channel = grpc.insecure_channel(address, options=options)
            self._metadata = ((INSECURE_IDENTITY_HEADER, credentials.insecure_claim),)
        else:
            tls = grpc.ssl_channel_credentials(
                root_certificates=identity.ca_pem,
                private_key=identity.key_pem,
                certificate_chain=identity.cert_pem,
            )
            self._channel = grpc.secure_channel(address, tls, options=options)
        self._operator = pb_grpc.OperatorStub(self._channel)
        self._self_service = pb_grpc.SelfServiceStub(self._channel)
        self._dashboard = pb_grpc.DashboardStub(self._channel)
        self._runbooks = pb_grpc.RunbooksStub(self._channel)
        self._reports = pb_grpc.ReportsStub(self._channel)

    def with_timeout(self, seconds: float) -> OperatorClient:
        """The same channel, with another deadline for each call (a quick probe, say);
        closing either closes both."""
        other = copy.copy(self)
        other._timeout = seconds
        return other

    def close(self) -> None:
        self._channel.close()

    # ------------------------------------------------------------ Operator: holds

    def create_hold(self, request: pb.CreateHoldRequest) -> pb.CreateHoldResponse:
        return self._unary(self._operator.CreateHold, request)

    def list_holds(self, request: pb.ListHoldsRequest) -> pb.ListHoldsResponse:
        return self._unary(self._operator.ListHolds, request)

    def get_status(self, request: pb.GetStatusRequest) -> pb.GetStatusResponse:
        return self._unary(self._operator.GetStatus, request)

    def request_resume(self, request: pb.RequestResumeRequest) -> pb.ResumeRequestResponse:
        return self._unary(self._operator.RequestResume, request)

    def edit_resume_request(self, request: pb.EditResumeRequestRequest) -> pb.ResumeRequestResponse:
        return self._unary(self._operator.EditResumeRequest, request)

    def approve_resume(self, request: pb.DecideResumeRequest) -> pb.DecideResumeResponse:
        return self._unary(self._operator.ApproveResume, request)

    def deny_resume(self, request: pb.DecideResumeRequest) -> pb.DecideResumeResponse:
        return self._unary(self._operator.DenyResume, request)

    def list_resume_requests(
        self, request: pb.ListResumeRequestsRequest
    ) -> pb.ListResumeRequestsResponse:
        return self._unary(self._operator.ListResumeRequests, request)

    # ------------------------------------------------------------ Operator: the fleet

    def list_agents(self, request: pb.ListAgentsRequest) -> Iterator[pb.AgentRecord]:
        return self._stream(self._operator.ListAgents, request)

    def expect_agents(self, request: pb.ExpectAgentsRequest) -> pb.ExpectAgentsResponse:
        return self._unary(self._operator.ExpectAgents, request)

    def acknowledge_violation(
        self, request: pb.AcknowledgeViolationRequest
    ) -> pb.AcknowledgeViolationResponse:
        return self._unary(self._operator.AcknowledgeViolation, request)

    def get_readiness(self, request: pb.GetReadinessRequest) -> pb.GetReadinessResponse:
        return self._unary(self._operator.GetReadiness, request)

    def list_audit(self, request: pb.ListAuditRequest) -> pb.ListAuditResponse:
        return self._unary(self._operator.ListAudit, request)

    def create_enroll_token(
        self, request: pb.CreateEnrollTokenRequest
    ) -> pb.CreateEnrollTokenResponse:
        return self._unary(self._operator.CreateEnrollToken, request)

    def list_certificates(self, request: pb.ListCertificatesRequest) -> pb.ListCertificatesResponse:
        return self._unary(self._operator.ListCertificates, request)

    def revoke_certificates(
        self, request: pb.RevokeCertificatesRequest
    ) -> pb.RevokeCertificatesResponse:
        return self._unary(self._operator.RevokeCertificates, request)

    # ------------------------------------------------------------ SelfService, Dashboard

    def list_my_laptops(self, request: pb.ListMyLaptopsRequest) -> pb.ListMyLaptopsResponse:
        return self._unary(self._self_service.ListMyLaptops, request)

    def opt_out(self, request: pb.OptOutRequest) -> pb.OptOutResponse:
        return self._unary(self._self_service.OptOut, request)

    def opt_in(self, request: pb.OptInRequest) -> pb.OptInResponse:
        return self._unary(self._self_service.OptIn, request)

    def create_dashboard_session(
        self, request: pb.CreateDashboardSessionRequest
    ) -> pb.CreateDashboardSessionResponse:
        return self._unary(self._dashboard.CreateSession, request)

    # ------------------------------------------------------------ Runbooks, Reports

    def plan_runbook(self, request: pb.PlanRunbookRequest) -> pb.PlanRunbookResponse:
        return self._unary(self._runbooks.PlanRunbook, request)

    def request_drill(self, request: pb.RequestDrillRequest) -> pb.ResumeRequestResponse:
        return self._unary(self._runbooks.RequestDrill, request)

    def start_runbook(self, request: pb.StartRunbookRequest) -> pb.RunbookRunResponse:
        return self._unary(self._runbooks.StartRunbook, request)

    def get_runbook_run(self, request: pb.GetRunbookRunRequest) -> pb.RunbookRunResponse:
        return self._unary(self._runbooks.GetRunbookRun, request)

    def list_runbook_runs(self, request: pb.ListRunbookRunsRequest) -> pb.ListRunbookRunsResponse:
        return self._unary(self._runbooks.ListRunbookRuns, request)

    def advance_runbook(self, request: pb.AdvanceRunbookRequest) -> pb.RunbookRunResponse:
        return self._unary(self._runbooks.AdvanceRunbook, request)

    def abort_runbook(self, request: pb.AbortRunbookRequest) -> pb.RunbookRunResponse:
        return self._unary(self._runbooks.AbortRunbook, request)

    def get_report(self, request: pb.GetReportRequest) -> Iterator[pb.ReportChunk]:
        return self._stream(self._reports.GetReport, request)

    # ------------------------------------------------------------ the one way to call

    def _unary(
        self, method: grpc.UnaryUnaryMultiCallable[Request, Response], request: Request
    ) -> Response:
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.address) from None

    def _stream(
        self, method: grpc.UnaryStreamMultiCallable[Request, Response], request: Request
    ) -> Iterator[Response]:
        try:
            yield from method(request, timeout=self._stream_timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.address) from None


def error_from_rpc(exc: grpc.RpcError, address: str) -> KillswitchError:
    """The project's error for a failed call: the inverse of the server's status mapping
    (``control.rpc.operator_service``), plus what only a client sees (no server, no time)."""
    code: grpc.StatusCode = exc.code()
    details: str = exc.details() or code.name.lower()
    if code is grpc.StatusCode.UNAVAILABLE and _from_store(exc):
        return ServerStoreUnavailable(
            f"the control server at {address} cannot do this now: {details}"
        )
    if code is grpc.StatusCode.UNAVAILABLE:
        tls = "handshake" in details.lower() or "ssl" in details.lower()
        hint = (
            " (TLS handshake failed: is the identity from this server's CA, unexpired and"
            " not revoked?)"
            if tls
            else ""
        )
        return ServerUnreachable(
            f"cannot reach the control server at {address} ({details.splitlines()[0]}){hint}"
        )
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return ServerTimedOut(f"the control server at {address} did not answer in time")
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(details)
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return PermissionDenied(f"permission denied: {details}")
    if code is grpc.StatusCode.NOT_FOUND:
        return NotFound(details)
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return Conflict(details)
    return KillswitchError(details)


def _from_store(exc: grpc.RpcError) -> bool:
    """Whether the server itself refused because of its store (not a transport failure)."""
    trailing = getattr(exc, "trailing_metadata", lambda: None)() or ()
    return any(key == STORE_UNAVAILABLE_METADATA for key, _ in trailing)
