"""An agent's real control stream against a scripted in-process server."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import grpc
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from agent_stub import Agent, AgentConfig, Backoff, Fault, Tuning
from agent_stub.agent import open_channel
from agent_stub.identity import IDENTITY_HEADER, insecure_metadata
from tests.test_agent_faults import wait_until

LEASE_TTL = 0.6


class ScriptedControl(pb_grpc.AgentControlServicer):
    """Allows capture and grants every lease; records what each stream carried."""

    def __init__(self) -> None:
        self.streams: list[list[pb.AgentMessage]] = []
        self.callers: list[str] = []
        self.ended_at: list[float] = []

    async def Connect(  # type: ignore[override]  # noqa: N802 - gRPC method name
        self, request_iterator: Any, context: Any
    ) -> None:
        received: list[pb.AgentMessage] = []
        self.streams.append(received)
        self.callers.append(dict(context.invocation_metadata()).get(IDENTITY_HEADER, ""))
        try:
            received.append(await context.read())
            allowed = pb.Directive(
                epoch=1,
                mode=pb.MODE_ALLOWED,
                heartbeat_interval_seconds=0.1,
                lease_ttl_seconds=LEASE_TTL,
            )
            await context.write(pb.ServerMessage(directive=allowed))
            while isinstance(message := await context.read(), pb.AgentMessage):
                received.append(message)
                if message.WhichOneof("body") == "lease_request":
                    answer = pb.LeaseGrant(
                        request_id=message.lease_request.request_id,
                        granted=True,
                        ttl_seconds=LEASE_TTL,
                    )
                    await context.write(pb.ServerMessage(lease_grant=answer))
        finally:
            self.ended_at.append(time.monotonic())


def kinds(messages: list[pb.AgentMessage]) -> list[str]:
    return [str(m.WhichOneof("body")) for m in messages]


def test_offline_agent_drops_its_stream_stops_at_expiry_and_comes_back() -> None:
    async def scenario() -> None:
        control = ScriptedControl()
        server = grpc.aio.server()
        pb_grpc.add_AgentControlServicer_to_server(control, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = open_channel(f"127.0.0.1:{port}")
        tuning = Tuning(capture_tick=0.02, upload_every=3600, offline_for=1.0)
        agent = Agent(
            AgentConfig("laptop-1", fault=Fault.OFFLINE, tuning=tuning),
            channel,
            call_metadata=insecure_metadata("laptop-1"),
            backoff=Backoff(initial=0.05, maximum=0.1, rng=random.Random(1)),
            rng=random.Random(1),
        )
        runner = asyncio.create_task(agent.run())
        try:
            await wait_until(lambda: agent.engine.events_captured_total > 0)
            first = control.streams[0]
            assert kinds(first)[:3] == ["hello", "ack", "lease_request"]
            assert first[0].hello.report.events_captured_total == 0

            agent.trigger_fault()
            dropped_at = time.monotonic()
            await wait_until(lambda: control.ended_at)
            assert control.ended_at[0] - dropped_at < 0.5, "the stream is cut at once"
            await asyncio.sleep(LEASE_TTL + 0.1)
            assert not agent.engine.capturing, "the lease ran out while offline"
            captured = agent.engine.events_captured_total

            await wait_until(lambda: len(control.streams) == 2)
            assert time.monotonic() - dropped_at >= 1.0, "stayed away for offline_for"
            await wait_until(lambda: agent.engine.capturing)
            again = control.streams[1]
            assert again[0].hello.report.events_captured_total == captured
            assert kinds(again)[:2] == ["hello", "ack"]
            await wait_until(lambda: "heartbeat" in kinds(again))
            assert agent.truth.events_without_lease == 0
            assert control.callers == ["laptop-1:agent"] * 2, "every stream says who it is"
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            await channel.close(grace=None)
            await server.stop(grace=None)

    asyncio.run(scenario())
