"""The one error boundary (control/rpc/error_boundary.py), through real gRPC servers.

Every service's servicer is served as ``killswitch serve`` and ``killswitch ingest`` serve
it (the authorisation interceptor, or the enrolment gate, in front), over state that
fails: a store error must reach the client as UNAVAILABLE with the store-unavailable
trailer, a bug as INTERNAL with one line and no traceback, whatever the RPC's kind.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from control.domain.identity import Principal
from control.errors import KillswitchError
from control.errors import StoreError
from control.ingest.gateway import IngestGatewayService
from control.ingest.gateway import add_upload_service
from control.rpc.agent_service import AgentControlService
from control.rpc.authz import GATEWAY_POLICY
from control.rpc.authz import Authenticator
from control.rpc.authz import AuthorizationInterceptor
from control.rpc.enrolment_gate import EnrolmentGate
from control.rpc.error_boundary import ErrorBoundary
from control.rpc.operator_service import DashboardService
from control.rpc.operator_service import EnrollmentService
from control.rpc.operator_service import IngestService
from control.rpc.operator_service import OperatorService
from control.rpc.operator_service import SelfService
from control.rpc.report_service import ReportService
from control.rpc.report_service import ReportSigner
from control.rpc.runbook_service import RunbookService
from control.wire import INSECURE_IDENTITY_HEADER
from control.wire import STORE_UNAVAILABLE_METADATA


class Failing:
    """Any state a servicer reads (plane, governance, runner...): every call raises."""

    def __init__(self, error: Exception) -> None:
        self._error = error

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):  # introspection (a traceback's renderer): nothing here
            raise AttributeError(name)

        def fail(*args: Any, **kwargs: Any) -> Any:
            raise self._error

        return fail


class Audit:
    """The control server's governance as the interceptor and the boundary see it."""

    def __init__(self) -> None:
        self.failures: list[tuple[str, str, str]] = []

    async def record_failure(self, by: Principal, action: str, error: KillswitchError) -> None:
        self.failures.append((by.name, action, str(error)))

    async def record_denial(self, by: Principal, action: str, why: str) -> None:
        self.failures.append((by.name, action, why))

    def count_unauthenticated(
        self, by: Principal | None, source: str, action: str, why: str
    ) -> None:
        pass


@dataclass(frozen=True)
class Rpc:
    path: str
    caller: str  # NAME:ROLE
    request: bytes = b""
    kind: str = "unary"  # unary | server_stream | bidi
    then: tuple[bytes, ...] = ()  # a bidi stream's next messages


OPERATOR = "/killswitch.v1.Operator/"
# One RPC of every service, of every kind; unary ones that change state are audited.
RPCS = {
    "Operator.ListAudit": Rpc(OPERATOR + "ListAudit", "sre-1:sre"),
    "Operator.CreateEnrollToken": Rpc(OPERATOR + "CreateEnrollToken", "ic-1:incident-commander"),
    "Operator.ListAgents": Rpc(OPERATOR + "ListAgents", "sre-1:sre", kind="server_stream"),
    "SelfService.ListMyLaptops": Rpc("/killswitch.v1.SelfService/ListMyLaptops", "ann:employee"),
    "Ingest.AuthorizeUpload": Rpc("/killswitch.v1.Ingest/AuthorizeUpload", "ingest-1:ingest"),
    "Ingest.WatchUploads": Rpc(
        "/killswitch.v1.Ingest/WatchUploads", "ingest-1:ingest", kind="server_stream"
    ),
    "Dashboard.CreateSession": Rpc("/killswitch.v1.Dashboard/CreateSession", "sre-1:sre"),
    "Runbooks.ListRunbookRuns": Rpc("/killswitch.v1.Runbooks/ListRunbookRuns", "sre-1:sre"),
    "Reports.GetReport": Rpc(
        "/killswitch.v1.Reports/GetReport",
        "sre-1:sre",
        pb.GetReportRequest(hold_id="hold-1").SerializeToString(),
        kind="server_stream",
    ),
    "AgentControl.Connect": Rpc(
        "/killswitch.v1.AgentControl/Connect",
        "laptop-1:agent",
        pb.AgentMessage(hello=pb.Hello(agent_id="laptop-1")).SerializeToString(),
        kind="bidi",
    ),
    "Enrollment.Enroll": Rpc("/killswitch.v1.Enrollment/Enroll", ""),
    "IngestGateway.UploadBatch": Rpc(
        "/killswitch.v1.IngestGateway/UploadBatch",
        "laptop-1:agent",
        pb.UploadBatchRequest(agent_id="laptop-1", sequence=1).SerializeToString(),
    ),
}


def _interceptor(audit: Audit, errors: ErrorBoundary, **policy: Any) -> AuthorizationInterceptor:
    """The authorisation interceptor, which runs the boundary."""
    authenticator = Authenticator(
        insecure=True, principal_from_pem=_no_pem, is_revoked=lambda serial: False
    )
    return AuthorizationInterceptor(authenticator, audit, errors=errors, **policy)


def _authorised(audit: Audit, errors: ErrorBoundary) -> grpc.aio.Server:
    """A server behind the authorisation interceptor."""
    return grpc.aio.server(interceptors=[_interceptor(audit, errors)])


def _control_server(state: Failing, audit: Audit) -> grpc.aio.Server:
    server = _authorised(audit, ErrorBoundary(audit))  # type: ignore[arg-type]
    s: Any = state
    pb_grpc.add_AgentControlServicer_to_server(AgentControlService(s, s), server)
    pb_grpc.add_OperatorServicer_to_server(OperatorService(s, s, s), server)
    pb_grpc.add_SelfServiceServicer_to_server(SelfService(s, s), server)
    pb_grpc.add_IngestServicer_to_server(IngestService(s, s), server)
    pb_grpc.add_DashboardServicer_to_server(DashboardService(s, "https://dash"), server)
    pb_grpc.add_RunbooksServicer_to_server(RunbookService(s, s), server)
    signer = ReportSigner(b"key", b"cert", None)
    pb_grpc.add_ReportsServicer_to_server(ReportService(s, s, signer), server)
    return server


def _enrolment_server(state: Failing, audit: Audit) -> grpc.aio.Server:
    server = grpc.aio.server(interceptors=[EnrolmentGate(audit, clock=lambda: 0.0)])
    pb_grpc.add_EnrollmentServicer_to_server(EnrollmentService(state), server)  # type: ignore[arg-type]
    return server


def _gateway_server(state: Failing, audit: Audit) -> grpc.aio.Server:
    """Wired as ``serve_gateway`` wires it: the handler behind the wrapper, no interceptor."""
    server = grpc.aio.server()
    s: Any = state
    service = IngestGatewayService(s, s, s, s, clock=state.clock)
    add_upload_service(server, service, _interceptor(audit, ErrorBoundary(), policy=GATEWAY_POLICY))
    return server


def _no_pem(pem: bytes) -> Principal:
    raise AssertionError("an insecure server reads no certificate")


def _server_for(name: str) -> Callable[[Failing, Audit], grpc.aio.Server]:
    if name.startswith("Enrollment."):
        return _enrolment_server
    if name.startswith("IngestGateway."):
        return _gateway_server
    return _control_server


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    trailers: dict[str, str]
    audited: list[tuple[str, str, str]]


async def _responses(rpc: Rpc, channel: grpc.aio.Channel, received: list[bytes]) -> None:
    """Make the call, keeping what it answers in ``received``."""
    metadata = ((INSECURE_IDENTITY_HEADER, rpc.caller),) if rpc.caller else ()
    call: Any
    if rpc.kind == "unary":
        received.append(
            await channel.unary_unary(rpc.path, bytes, bytes)(
                rpc.request, metadata=metadata, timeout=10
            )
        )
        return
    if rpc.kind == "server_stream":
        call = channel.unary_stream(rpc.path, bytes, bytes)(
            rpc.request, metadata=metadata, timeout=10
        )
    else:

        async def hello() -> AsyncIterator[bytes]:
            yield rpc.request
            for message in rpc.then:
                yield message
            await asyncio.sleep(10)  # the server ends the call

        call = channel.stream_stream(rpc.path, bytes, bytes)(hello(), metadata=metadata, timeout=10)
    async for response in call:
        received.append(response)


async def _outcome(server: grpc.aio.Server, rpc: Rpc, audit: Audit) -> tuple[list[bytes], Outcome]:
    """Serve, call: what came back before the call failed, and how it failed."""
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    received: list[bytes] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                await _responses(rpc, channel, received)
            except grpc.aio.AioRpcError as failed:
                trailing: Any = failed.trailing_metadata() or ()
                trailers = {key: str(value) for key, value in trailing}
                return received, Outcome(
                    failed.code(), failed.details() or "", trailers, audit.failures
                )
        raise AssertionError(f"{rpc.path} answered {received} instead of failing")
    finally:
        await server.stop(None)


async def _serve_and_call(name: str, error: Exception) -> Outcome:
    audit = Audit()
    _, outcome = await _outcome(_server_for(name)(Failing(error), audit), RPCS[name], audit)
    return outcome


@pytest.mark.parametrize("name", sorted(RPCS))
def test_a_store_error_is_unavailable_with_the_trailer(name: str) -> None:
    outcome = asyncio.run(_serve_and_call(name, StoreError("database is down")))
    assert outcome.code is grpc.StatusCode.UNAVAILABLE, (name, outcome)
    assert outcome.details == "database is down"
    assert outcome.trailers.get(STORE_UNAVAILABLE_METADATA) == "1", outcome.trailers


def test_a_refused_change_is_audited_and_a_read_is_not() -> None:
    changed = asyncio.run(_serve_and_call("Operator.CreateEnrollToken", StoreError("down")))
    assert changed.audited == [("ic-1", "Operator.CreateEnrollToken", "down")]
    read = asyncio.run(_serve_and_call("Operator.ListAudit", StoreError("down")))
    assert read.audited == []


@pytest.mark.parametrize("name", sorted(RPCS))
def test_a_bug_is_internal_in_one_line_without_its_traceback(name: str) -> None:
    outcome = asyncio.run(_serve_and_call(name, RuntimeError("secret detail\nline two")))
    assert outcome.code is grpc.StatusCode.INTERNAL, (name, outcome)
    assert outcome.details == f"internal error in {name}: see the server log"
    assert STORE_UNAVAILABLE_METADATA not in outcome.trailers
    assert outcome.audited == [], "a bug is not a refusal"


# ---------------------------------------------------------------- mid-stream


async def _stream_failing_after(sent: int, error: Exception) -> tuple[list[bytes], Outcome]:
    """``Operator.ListAgents`` served by a stand-in that fails after ``sent`` records."""

    async def list_agents(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for index in range(sent):
            yield b"agent-%d" % index
        raise error

    audit = Audit()
    server = _authorised(audit, ErrorBoundary(audit))  # type: ignore[arg-type]
    handler = grpc.unary_stream_rpc_method_handler(list_agents)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("killswitch.v1.Operator", {"ListAgents": handler}),)
    )
    return await _outcome(server, RPCS["Operator.ListAgents"], audit)


def test_an_error_mid_stream_ends_it_with_the_mapped_status() -> None:
    received, outcome = asyncio.run(_stream_failing_after(3, StoreError("lost the database")))
    assert received == [b"agent-0", b"agent-1", b"agent-2"]
    assert outcome.code is grpc.StatusCode.UNAVAILABLE
    assert outcome.trailers.get(STORE_UNAVAILABLE_METADATA) == "1"

    received, outcome = asyncio.run(_stream_failing_after(2, KeyError("bug")))
    assert len(received) == 2
    assert (outcome.code, outcome.details) == (
        grpc.StatusCode.INTERNAL,
        "internal error in Operator.ListAgents: see the server log",
    )


class PlaneFailingAcks:
    """Takes the agent's Hello, then fails at its first ack."""

    def __init__(self, error: Exception) -> None:
        self._error = error

    def hands_off_agents(self) -> bool:
        return False

    async def resync_agent(self, agent_id: str) -> None:
        pass

    async def catch_up_to(self, agent_id: str, epoch: int) -> None:
        pass

    def now(self) -> float:
        return 0.0

    def connect(self, *args: Any) -> None:
        pass

    def disconnect(self, *args: Any) -> None:
        pass

    def ack(self, *args: Any, **kwargs: Any) -> None:
        raise self._error


async def _connect_then_ack(error: Exception) -> Outcome:
    audit = Audit()
    server = _authorised(audit, ErrorBoundary(audit))  # type: ignore[arg-type]
    plane: Any = PlaneFailingAcks(error)
    pb_grpc.add_AgentControlServicer_to_server(AgentControlService(plane, audit), server)  # type: ignore[arg-type]
    hello = pb.AgentMessage(hello=pb.Hello(agent_id="laptop-1")).SerializeToString()
    ack = pb.AgentMessage(ack=pb.Ack(epoch=1, mode=pb.MODE_PAUSED)).SerializeToString()
    rpc = Rpc("/killswitch.v1.AgentControl/Connect", "laptop-1:agent", hello, "bidi", (ack,))
    _, outcome = await _outcome(server, rpc, audit)
    return outcome


def test_a_store_error_mid_stream_on_an_agent_s_connect_is_unavailable() -> None:
    """The agent stream's own catch is for malformed messages only (INVALID_ARGUMENT)."""
    outcome = asyncio.run(_connect_then_ack(StoreError("database is down")))
    assert (outcome.code, outcome.details) == (grpc.StatusCode.UNAVAILABLE, "database is down")
    assert outcome.trailers.get(STORE_UNAVAILABLE_METADATA) == "1"
    outcome = asyncio.run(_connect_then_ack(RuntimeError("bug")))
    assert outcome.code is grpc.StatusCode.INTERNAL
