"""A bare grpc.aio push server: the floor the product is measured against.

It speaks the product's wire protocol (``AgentControl.Connect`` with the
killswitch.v1 messages, and the Operator calls the benchmark drives), so one
harness measures both and serialisation costs the same. Everything else is
stripped: no store, no domain rules, no logging, no authentication (it ignores
the ``x-killswitch-as`` claim the harness sends), just a dict of streams, an
epoch and an ack counter. Like the product, it pushes the current directive on
connect and on every change, with one write task per stream. A resume is
RequestResume then ApproveResume, as in the product, but nobody is checked:
the approval lifts the pause at once.

With ``--tls DIR`` it serves TLS and requires a client certificate signed by the CA of
``DIR`` (``bench.bare_tls``), as the product over mTLS does; it reads no name from it.

Run: ``python -m bench.bare_server --port P [--epoch E --paused] [--gc-freeze] [--tls DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from killswitch.v1 import killswitch_pb2 as pb

from control.domain.timings import DEFAULT_LEASE_TTL_SECONDS

StreamContext = grpc.aio.ServicerContext[pb.AgentMessage, pb.ServerMessage]
UnaryContext = grpc.aio.ServicerContext[Any, Any]


@dataclass(slots=True)
class Stream:
    agent_id: str
    context: StreamContext
    acked_epoch: int = -1
    # The newest write: a lease grant and a directive must not overlap on one stream.
    last_write: asyncio.Task[None] | None = None


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


async def _write_after(
    previous: asyncio.Task[None], context: StreamContext, message: pb.ServerMessage
) -> None:
    with contextlib.suppress(Exception):  # a failed write is its own task's to report
        await asyncio.shield(previous)
    await context.write(message)


class BareFleet:
    """The only state a push needs; ``settled`` is kept incrementally so polls are O(1)."""

    def __init__(self, epoch: int, paused: bool, gc_freeze: bool) -> None:
        self.epoch = epoch
        self.paused = paused
        self._gc_freeze = gc_freeze
        self.streams: dict[str, Stream] = {}
        self.acked_at: dict[str, float] = {}
        self.settled = 0
        self._writes: set[asyncio.Task[None]] = set()

    def _directive(self) -> pb.ServerMessage:
        mode = pb.MODE_PAUSED if self.paused else pb.MODE_ALLOWED
        return pb.ServerMessage(directive=pb.Directive(epoch=self.epoch, mode=mode))

    def _send(self, stream: Stream, message: pb.ServerMessage) -> None:
        previous = stream.last_write
        if previous is None or previous.done():  # a push: one write per stream, as ever
            write = stream.context.write(message)
        else:
            write = _write_after(previous, stream.context, message)
        task = asyncio.get_running_loop().create_task(write)
        stream.last_write = task
        self._writes.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        if not task.cancelled():
            task.exception()  # a dead stream; its reader notices and detaches it

    def attach(self, stream: Stream) -> None:
        old = self.streams.get(stream.agent_id)
        if old is not None:
            self.detach(old)
        self.streams[stream.agent_id] = stream
        self._send(stream, self._directive())

    def detach(self, stream: Stream) -> None:
        if self.streams.get(stream.agent_id) is not stream:
            return
        del self.streams[stream.agent_id]
        if stream.acked_epoch == self.epoch:
            self.settled -= 1

    def ack(self, stream: Stream, epoch: int) -> None:
        if epoch == self.epoch and stream.acked_epoch != epoch:
            self.settled += 1
        stream.acked_epoch = max(stream.acked_epoch, epoch)
        self.acked_at[stream.agent_id] = time.time()

    def grant(self, stream: Stream, request_id: int) -> None:
        """Every lease request granted: what the product answers an allowed agent."""
        grant = pb.LeaseGrant(
            request_id=request_id, granted=True, ttl_seconds=DEFAULT_LEASE_TTL_SECONDS
        )
        self._send(stream, pb.ServerMessage(lease_grant=grant))

    def push(self, paused: bool) -> int:
        """Move to a new epoch and write it to every stream; returns the epoch."""
        self.epoch += 1
        self.paused = paused
        self.settled = 0
        if self._gc_freeze:
            gc.freeze()  # the fleet is connected: stop scanning its long-lived objects
        message = self._directive()
        for stream in self.streams.values():
            self._send(stream, message)
        return self.epoch


class BareService:
    def __init__(self, fleet: BareFleet) -> None:
        self._fleet = fleet
        self._requests = 0

    async def connect(self, request_iterator: Any, context: StreamContext) -> None:
        await context.send_initial_metadata(())
        first = await context.read()
        if not isinstance(first, pb.AgentMessage):
            return
        stream = Stream(first.hello.agent_id, context)
        self._fleet.attach(stream)
        try:
            while True:
                message = await context.read()
                if not isinstance(message, pb.AgentMessage):
                    return
                body = message.WhichOneof("body")
                if body == "ack":
                    self._fleet.ack(stream, message.ack.epoch)
                elif body == "lease_request":
                    self._fleet.grant(stream, message.lease_request.request_id)
        finally:
            self._fleet.detach(stream)

    async def create_hold(
        self, request: pb.CreateHoldRequest, context: UnaryContext
    ) -> pb.CreateHoldResponse:
        epoch = self._fleet.push(paused=True)
        hold = pb.Hold(id=f"bare-{epoch}", created_epoch=epoch)
        return pb.CreateHoldResponse(
            hold=hold, epoch=epoch, covered_agents=len(self._fleet.streams)
        )

    async def request_resume(
        self, request: pb.RequestResumeRequest, context: UnaryContext
    ) -> pb.ResumeRequestResponse:
        """Only hands out a request id: the bare server has no approvals to keep."""
        self._requests += 1
        resume = pb.ResumeRequest(
            id=f"bare-resume-{self._requests}",
            hold_id=request.hold_id,
            state=pb.RESUME_STATE_PENDING,
            revision=1,
        )
        return pb.ResumeRequestResponse(request=resume)

    async def approve_resume(
        self, request: pb.DecideResumeRequest, context: UnaryContext
    ) -> pb.DecideResumeResponse:
        """Lifts at once, as the product does when a direct resume is approved."""
        epoch = self._fleet.push(paused=False)
        resume = pb.ResumeRequest(
            id=request.request_id, state=pb.RESUME_STATE_EXECUTED, lifted_epoch=epoch
        )
        return pb.DecideResumeResponse(request=resume, epoch=epoch)

    async def get_status(
        self, request: pb.GetStatusRequest, context: UnaryContext
    ) -> pb.GetStatusResponse:
        fleet = self._fleet
        total = len(fleet.streams)
        done, waiting = ("STOP_REPORTED", "PENDING") if fleet.paused else ("CAPTURING", "RESUME")
        counts = {done: fleet.settled, waiting: total - fleet.settled}
        return pb.GetStatusResponse(
            epoch=fleet.epoch,
            holds=[pb.Hold(id=f"bare-{fleet.epoch}")] if fleet.paused else [],
            total=total,
            settled=fleet.settled,
            by_state=[pb.StateCount(state=s, count=n) for s, n in counts.items() if n],
        )

    async def list_agents(
        self, request: pb.ListAgentsRequest, context: UnaryContext
    ) -> AsyncIterator[pb.AgentRecord]:
        fleet = self._fleet
        for agent_id, stream in list(fleet.streams.items()):
            acked_at = fleet.acked_at.get(agent_id)
            yield pb.AgentRecord(
                agent_id=agent_id,
                connected=True,
                applied_epoch=max(stream.acked_epoch, 0),
                acked_at=_timestamp(acked_at) if acked_at is not None else None,
            )


def _unary(
    behaviour: Callable[..., Any], request: type[Message], response: type[Message]
) -> grpc.RpcMethodHandler[Any, Any]:
    """A unary call (de)serialized as the product's generated stubs do it."""
    return grpc.unary_unary_rpc_method_handler(
        behaviour,
        request_deserializer=request.FromString,
        response_serializer=response.SerializeToString,
    )


def handlers(service: BareService) -> list[grpc.GenericRpcHandler[Any, Any]]:
    """Generic handlers on the product's method names, so the product's stubs work."""
    agent = grpc.method_handlers_generic_handler(
        "killswitch.v1.AgentControl",
        {
            "Connect": grpc.stream_stream_rpc_method_handler(
                service.connect,
                request_deserializer=pb.AgentMessage.FromString,
                response_serializer=pb.ServerMessage.SerializeToString,
            )
        },
    )
    operator = grpc.method_handlers_generic_handler(
        "killswitch.v1.Operator",
        {
            "CreateHold": _unary(service.create_hold, pb.CreateHoldRequest, pb.CreateHoldResponse),
            "RequestResume": _unary(
                service.request_resume, pb.RequestResumeRequest, pb.ResumeRequestResponse
            ),
            "ApproveResume": _unary(
                service.approve_resume, pb.DecideResumeRequest, pb.DecideResumeResponse
            ),
            "GetStatus": _unary(service.get_status, pb.GetStatusRequest, pb.GetStatusResponse),
            "ListAgents": grpc.unary_stream_rpc_method_handler(
                service.list_agents,
                request_deserializer=pb.ListAgentsRequest.FromString,
                response_serializer=pb.AgentRecord.SerializeToString,
            ),
        },
    )
    return [agent, operator]


async def serve(port: int, fleet: BareFleet, tls_dir: Path | None) -> None:
    """Plaintext, or TLS with client certificates from ``tls_dir``."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(handlers(BareService(fleet)))
    address = f"127.0.0.1:{port}"
    if tls_dir is None:
        bound = server.add_insecure_port(address)
    else:
        # Imported here: the plaintext baseline starts as fast and as small as it did,
        # without the ~19 MiB of the PKI code (cryptography), which the product loads too.
        from bench.bare_tls import server_credentials

        bound = server.add_secure_port(address, server_credentials(tls_dir))
    if bound == 0:
        raise SystemExit(f"bare_server: cannot listen on 127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_server", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--epoch", type=int, default=0, help="start at this epoch (a restart)")
    parser.add_argument("--paused", action="store_true", help="start paused (a restart)")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() before each push")
    parser.add_argument(
        "--tls", type=Path, metavar="DIR", help="TLS, client certificates required (bench.bare_tls)"
    )
    args = parser.parse_args()
    asyncio.run(serve(args.port, BareFleet(args.epoch, args.paused, args.gc_freeze), args.tls))


if __name__ == "__main__":
    main()
