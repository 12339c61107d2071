"""Operator: the API behind the ``killswitch`` CLI."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from control.errors import Conflict, InvalidInput, KillswitchError, NotFound
from control.plane import ControlPlane
from control.rpc.convert import agent_to_pb, filter_from_pb, hold_to_pb, scope_from_pb, seconds

OPERATOR_METADATA_KEY = "x-killswitch-operator"

Context = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")

_STATUS_FOR_ERROR: list[tuple[type[KillswitchError], grpc.StatusCode]] = [
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (KillswitchError, grpc.StatusCode.INTERNAL),
]


def status_for(error: KillswitchError) -> grpc.StatusCode:
    return next(code for kind, code in _STATUS_FOR_ERROR if isinstance(error, kind))


def translate_errors(
    method: Callable[[OperatorService, Req, Context], Awaitable[Resp]],
) -> Callable[[OperatorService, Req, Context], Awaitable[Resp]]:
    """Turn domain errors into gRPC status codes with a one-line message."""

    async def wrapper(self: OperatorService, request: Req, context: Context, /) -> Resp:
        try:
            return await method(self, request, context)
        except KillswitchError as exc:
            await context.abort(status_for(exc), str(exc))
            raise AssertionError("unreachable: abort raises") from exc

    return wrapper


def operator_name(context: Context) -> str:
    """Who is asking. Until mTLS identities land this is the client's own claim."""
    claimed = dict(context.invocation_metadata() or ()).get(OPERATOR_METADATA_KEY, "")
    name = str(claimed).strip()[:100] or "anonymous"
    return f"unauthenticated:{name}"


class OperatorService(pb_grpc.OperatorServicer):
    def __init__(self, plane: ControlPlane) -> None:
        self._plane = plane

    @translate_errors
    async def CreateHold(  # noqa: N802
        self, request: pb.CreateHoldRequest, context: Context
    ) -> pb.CreateHoldResponse:
        hold, covered = await self._plane.create_hold(
            scope_from_pb(request.scope),
            request.reason,
            request.ticket,
            operator_name(context),
            keep_spool=request.keep_spool,
        )
        return pb.CreateHoldResponse(
            hold=hold_to_pb(hold), epoch=hold.created_epoch, covered_agents=covered
        )

    @translate_errors
    async def LiftHold(  # noqa: N802
        self, request: pb.LiftHoldRequest, context: Context
    ) -> pb.LiftHoldResponse:
        if not request.hold_id:
            raise InvalidInput("a hold id is required")
        hold = await self._plane.lift_hold(request.hold_id, operator_name(context))
        return pb.LiftHoldResponse(hold=hold_to_pb(hold), epoch=hold.lifted_epoch)

    @translate_errors
    async def ListHolds(  # noqa: N802
        self, request: pb.ListHoldsRequest, context: Context
    ) -> pb.ListHoldsResponse:
        return pb.ListHoldsResponse(
            holds=[hold_to_pb(h) for h in self._plane.active_holds()], epoch=self._plane.epoch
        )

    @translate_errors
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
        try:
            views = self._plane.views(filter_from_pb(request.filter))
        except KillswitchError as exc:
            await context.abort(status_for(exc), str(exc))
        for view in views:
            yield agent_to_pb(view)

    @translate_errors
    async def ExpectAgents(  # noqa: N802
        self, request: pb.ExpectAgentsRequest, context: Context
    ) -> pb.ExpectAgentsResponse:
        added, known = await self._plane.expect_agents(
            (a.agent_id, dict(a.labels)) for a in request.agents
        )
        return pb.ExpectAgentsResponse(added=added, already_known=known)

    @translate_errors
    async def AcknowledgeViolation(  # noqa: N802
        self, request: pb.AcknowledgeViolationRequest, context: Context
    ) -> pb.AcknowledgeViolationResponse:
        if not request.note.strip():
            raise InvalidInput("a note is required: what was found and done about it")
        evidence = await self._plane.acknowledge_violation(
            request.agent_id, operator_name(context), request.note.strip()
        )
        return pb.AcknowledgeViolationResponse(violation=evidence)


class IngestService(pb_grpc.IngestServicer):
    """Asked by the ingest service before it accepts a batch of captured events."""

    def __init__(self, plane: ControlPlane) -> None:
        self._plane = plane

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
