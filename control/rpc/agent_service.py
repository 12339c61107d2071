"""AgentControl: one long-lived bidirectional stream per capture agent."""

from __future__ import annotations

import asyncio
from datetime import UTC
from typing import Any
from typing import ClassVar

import grpc
import structlog
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from control.domain.readiness import HelloFacts
from control.errors import InvalidInput
from control.errors import StoreError
from control.errors import one_line
from control.governance import Governance
from control.plane import ControlPlane
from control.plane import EpochUnknown
from control.rpc.authz import current_principal
from control.rpc.convert import bounded
from control.rpc.convert import channels_from_pb
from control.rpc.convert import directive_to_pb
from control.rpc.convert import mode_from_pb
from control.rpc.convert import report_from_pb
from control.rpc.convert import since_ack_from_pb
from control.rpc.error_boundary import abort_for

log = structlog.get_logger("killswitch.rpc.agent")

AgentContext = grpc.aio.ServicerContext[pb.AgentMessage, pb.ServerMessage]
MALFORMED = "malformed message: it does not parse as an AgentMessage"
END_OF_STREAM: object = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs


class AgentSession:
    """The one writer of a stream: lease answers, then the current directive.

    At most one write is in flight per stream; notifications that arrive during a
    write collapse into one more write of whatever is current then, so a burst of
    hold changes never queues stale directives. Lease requests are decided when
    their answer is written, so a grant never overtakes the pause that revokes it.
    """

    # Strong references, so in-flight writes are not garbage-collected mid-send.
    _pending_writes: ClassVar[set[asyncio.Task[None]]] = set()

    def __init__(self, agent_id: str, context: AgentContext, plane: ControlPlane) -> None:
        self.agent_id = agent_id
        self._context = context
        self._plane = plane
        self._handler = asyncio.current_task()
        self._writing = False
        self._changed = False
        self._closed = False
        # Why the server ended the stream (``close``); None while it is open.
        self.closed_because: str | None = None
        self._last_sent: tuple[object, ...] | None = None
        # Only the newest request matters: the agent ignores answers to older ones.
        self._lease_request: int | None = None

    def request_lease(self, request_id: int) -> None:
        self._lease_request = request_id
        self.notify()

    def notify(self) -> None:
        if self._closed:
            return
        if self._writing:
            self._changed = True
            return
        self._writing = True
        task = asyncio.get_running_loop().create_task(self._write_current())
        self._pending_writes.add(task)
        task.add_done_callback(self._pending_writes.discard)

    async def _write_current(self) -> None:
        try:
            while not self._closed:
                self._changed = False
                if self._lease_request is not None:
                    request_id, self._lease_request = self._lease_request, None
                    await self._context.write(self._lease_answer(request_id))
                spec = self._plane.directive_for(self.agent_id)
                key = (spec.desired.epoch, spec.desired.mode, spec.desired.hold_ids)
                if key != self._last_sent:
                    # Recorded before the write: a fast agent's ack can arrive before
                    # the write returns, and must never appear to precede its directive.
                    self._plane.directive_sent(self.agent_id, spec.epoch)
                    await self._context.write(directive_to_pb(spec))
                    self._last_sent = key
                if not self._changed:
                    return
        except Exception as exc:  # the stream died under us; the reader sees it too
            log.debug("directive_write_failed", agent_id=self.agent_id, error=repr(exc))
        finally:
            self._writing = False

    def _lease_answer(self, request_id: int) -> pb.ServerMessage:
        decision = self._plane.grant_lease(self.agent_id)
        return pb.ServerMessage(
            lease_grant=pb.LeaseGrant(
                request_id=request_id,
                granted=decision.granted,
                ttl_seconds=decision.ttl,
                reason=decision.reason,
            )
        )

    def close(self, reason: str) -> None:
        """End the stream from another task: the handler, cancelled, ends the call with
        a status (a cancelled handler alone leaves the agent waiting on a dead call)."""
        self._closed = True
        self.closed_because = reason
        log.info("agent_stream_closed", agent_id=self.agent_id, reason=reason)
        if self._handler is not None:
            self._handler.cancel()


def hello_facts(hello: pb.Hello, now: float) -> HelloFacts:
    """What the agent said of itself, clipped; its skew measured on arrival (latency aside)."""
    sent_at = None
    if hello.HasField("sent_at"):
        sent_at = hello.sent_at.ToDatetime(tzinfo=UTC).timestamp()
    return HelloFacts(
        agent_version=hello.agent_version[:100],
        lease_clock=hello.lease_clock[:100],
        clock_skew=None if sent_at is None else sent_at - now,
    )


class AgentControlService(pb_grpc.AgentControlServicer):
    def __init__(self, plane: ControlPlane, governance: Governance) -> None:
        self._plane = plane
        self._governance = governance

    # The handler writes through ``context`` (so sessions can push from other tasks)
    # instead of returning an iterator, which the generated signature assumes.
    async def Connect(  # type: ignore[override]  # noqa: N802 - gRPC method name
        self, request_iterator: Any, context: AgentContext
    ) -> None:
        # Sending headers now keeps them out of the first (time-critical) directive.
        await context.send_initial_metadata(())
        first = await context.read()
        if first is END_OF_STREAM:  # gone before Hello
            return
        if not isinstance(first, pb.AgentMessage):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED)
        if first.WhichOneof("body") != "hello":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "first message must be Hello")
        hello = first.hello
        caller = current_principal()
        if hello.agent_id != caller.name:
            # A certificate speaks for one agent only; claiming another is worth an audit entry.
            why = f"agent {caller.name} claimed to be {hello.agent_id[:100]!r}"
            log.warning(
                "agent_identity_mismatch", agent_id=caller.name, claimed=hello.agent_id[:100]
            )
            await self._governance.record_denial(caller, "AgentControl.Connect", why)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        if self._plane.hands_off_agents():
            # Not here, where it could get no lease: to a replica that can grant one.
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._plane.sent_elsewhere_because())
        try:
            seen_epoch = bounded(hello.last_applied_epoch, "last_applied_epoch")
        except InvalidInput as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, one_line(exc))
        try:
            # Serving it without its stored history could later overwrite a VIOLATION,
            # and serving it from a view older than what it has seen would roll it back.
            await self._plane.resync_agent(hello.agent_id)
            await self._plane.catch_up_to(hello.agent_id, seen_epoch)
        except StoreError as exc:  # answered here: an agent's retry is not worth an audit entry
            await abort_for(context, exc)
        except EpochUnknown as exc:
            log.warning("agent_epoch_unknown", agent_id=hello.agent_id, error=one_line(exc))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, one_line(exc))
        session = AgentSession(hello.agent_id, context, self._plane)
        try:
            self._plane.connect(
                hello.agent_id, dict(hello.labels), session, hello_facts(hello, self._plane.now())
            )
        except InvalidInput as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, one_line(exc))
        try:
            await self._read_loop(session, context)
        except asyncio.CancelledError:
            if session.closed_because is None:
                raise  # the agent went away, or the server is stopping
            await context.abort(grpc.StatusCode.UNAVAILABLE, session.closed_because)
        finally:
            self._plane.disconnect(hello.agent_id, session)

    async def _read_loop(self, session: AgentSession, context: AgentContext) -> None:
        plane, agent_id = self._plane, session.agent_id
        while True:
            message = await context.read()
            if message is END_OF_STREAM:  # the agent closed
                return
            if not isinstance(message, pb.AgentMessage):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED)
            body = message.WhichOneof("body")
            try:
                if body == "ack":
                    ack = message.ack
                    plane.ack(
                        agent_id,
                        ack.epoch,
                        mode_from_pb(ack.mode),
                        channels_from_pb(ack.channels),
                        report_from_pb(ack.report),
                        purged=bounded(ack.purged_events, "purged_events"),
                        quarantined=bounded(ack.quarantined_events, "quarantined_events"),
                    )
                elif body == "heartbeat":
                    beat = message.heartbeat
                    plane.heartbeat(
                        agent_id,
                        channels_from_pb(beat.channels),
                        report_from_pb(beat.report),
                        since_ack=since_ack_from_pb(beat.seconds_since_ack),
                    )
                elif body == "lease_request":
                    session.request_lease(message.lease_request.request_id)
                elif body == "nack":
                    plane.nack(
                        agent_id,
                        bounded(message.nack.epoch, "epoch"),
                        message.nack.reason[:500] or "no reason given",
                    )
                else:
                    raise InvalidInput(f"unexpected {body or 'empty'} message after Hello")
            # The agent's message was wrong; what the plane raises is the boundary's.
            except InvalidInput as exc:
                log.warning("agent_protocol_error", agent_id=agent_id, error=one_line(exc))
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, one_line(exc))
