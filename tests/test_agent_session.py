"""An agent's real control stream against a scripted in-process server."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc
from structlog.testing import capture_logs

from agent_stub import Agent
from agent_stub import AgentConfig
from agent_stub import Backoff
from agent_stub import Tuning
from agent_stub.identity import insecure_metadata
from agent_stub.stream import ControlStream
from simulator.faults import Fault
from simulator.faults import FaultTuning
from simulator.faults import SimulatedConfig
from simulator.faulty import SimulatedAgent
from simulator.fleet import Fleet
from simulator.fleet import fleet_configs
from tests.agent_support import LEASE_TTL
from tests.agent_support import ScriptedCall
from tests.agent_support import kinds
from tests.agent_support import running
from tests.agent_support import scripted_control
from tests.agent_support import settle
from tests.agent_support import wait_until


def test_a_fleet_that_connects_together_spreads_its_lease_renewals() -> None:
    """Renewals timed from the connect would keep a fleet that (re)connected at once
    renewing in lockstep forever; each agent's first renewal falls at a random point of
    the interval instead, never later than the interval."""
    interval = 1.0  # a third of the lease TTL

    async def scenario() -> dict[str, list[float]]:
        async with scripted_control(lease_ttl=3 * interval) as (control, channel):
            agents = [
                Agent(
                    AgentConfig(f"laptop-{i}", tuning=Tuning(capture_tick=0.5, upload_every=3600)),
                    channel,
                    call_metadata=insecure_metadata(f"laptop-{i}"),
                    rng=random.Random(i),
                )
                for i in range(20)
            ]
            runners = [asyncio.create_task(agent.run()) for agent in agents]
            try:
                await wait_until(
                    lambda: (
                        len(control.lease_requested_at) == 20
                        and all(len(times) >= 2 for times in control.lease_requested_at.values())
                    )
                )
                return control.lease_requested_at
            finally:
                for runner in runners:
                    runner.cancel()
                await asyncio.gather(*runners, return_exceptions=True)

    requested = asyncio.run(scenario())
    first_renewal = [times[1] - times[0] for times in requested.values()]
    assert max(first_renewal) <= interval + 0.3, "a renewal came later than its interval"
    assert max(first_renewal) - min(first_renewal) > 0.4 * interval, (
        f"first renewals within {max(first_renewal) - min(first_renewal):.3f}s of each"
        " other: the fleet renews in lockstep"
    )


def test_offline_agent_drops_its_stream_stops_at_expiry_and_comes_back() -> None:
    async def scenario() -> None:
        async with scripted_control() as (control, channel):
            agent = SimulatedAgent(
                SimulatedConfig(
                    "laptop-1",
                    fault=Fault.OFFLINE,
                    tuning=Tuning(capture_tick=0.02, upload_every=3600),
                    fault_tuning=FaultTuning(offline_for=1.0),
                ),
                channel,
                call_metadata=insecure_metadata("laptop-1"),
                backoff=Backoff(initial=0.05, maximum=0.1, rng=random.Random(1)),
                rng=random.Random(1),
            )
            async with running(agent.run()):
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

    asyncio.run(scenario())


def test_a_sender_cancelled_mid_write_leaves_the_stream_alive() -> None:
    """grpc aio cancels the whole call when a write is cancelled halfway: a lease renewal
    that a pause ends must not cut the stream the ack is about to go out on."""

    async def scenario() -> None:
        async with scripted_control() as (control, channel):
            stream = ControlStream(pb_grpc.AgentControlStub(channel).Connect())  # type: ignore[call-arg]
            try:
                stream.send(pb.AgentMessage(hello=pb.Hello(agent_id="laptop-1")))
                assert await stream.read() is not None, "the server's directive"

                async def renew_then_wait() -> None:  # as the renewals a pause cancels
                    stream.send(pb.AgentMessage(lease_request=pb.LeaseRequest(request_id=1)))
                    await asyncio.Event().wait()

                sender = asyncio.create_task(renew_then_wait())
                await asyncio.sleep(0)  # the renewal is queued, its write under way
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
                stream.send(pb.AgentMessage(ack=pb.Ack(epoch=1, mode=pb.MODE_PAUSED)))
                answer = await stream.read()
                assert answer is not None and answer.WhichOneof("body") == "lease_grant"
                await wait_until(lambda: "ack" in kinds(control.streams[0]))
                assert kinds(control.streams[0]) == ["hello", "lease_request", "ack"]
            finally:
                await stream.close()

    asyncio.run(scenario())


class ScriptedChannel:
    """Hands out the scripted calls in turn, as ``AgentControlStub`` asks a channel."""

    def __init__(self, calls: list[ScriptedCall]) -> None:
        self.calls = calls
        self.connects = 0

    def stream_stream(self, method: str, **_: Any) -> Any:
        def connect(metadata: Any = ()) -> ScriptedCall:
            self.connects += 1
            return self.calls[self.connects - 1]

        return connect


def test_a_stream_cancelled_under_the_agent_is_reconnected_and_only_a_real_cancel_stops_it() -> (
    None
):
    async def scenario() -> None:
        channel = ScriptedChannel(
            [
                ScriptedCall("read"),
                ScriptedCall("write"),
                ScriptedCall("write-error"),
                ScriptedCall(),
            ]
        )
        agent = Agent(
            AgentConfig("laptop-1", tuning=Tuning(capture_tick=3600, upload_every=3600)),
            channel,  # type: ignore[arg-type]
            backoff=Backoff(initial=0.01, maximum=0.02, rng=random.Random(1)),
            rng=random.Random(1),
        )
        with capture_logs() as logs:
            runner = asyncio.create_task(agent.run())
            await wait_until(lambda: channel.connects == 4)
            assert not runner.done(), "a stream's end is no reason to stop"
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        assert runner.cancelled(), "a real cancel stops the agent"
        assert [kinds(call.written) for call in channel.calls] == [["hello"], [], [], ["hello"]]
        assert [e["reason"] for e in logs if e["event"] == "agent_reconnecting"] == [
            "the stream was cancelled on the agent's side",
            "the stream had already ended (CANCELLED) at a write",
            # Its writer gone, the stream is ended, never read on with nothing going out.
            "a write failed: RuntimeError('unforeseen')",
        ]
        assert not [e for e in logs if e["log_level"] in ("warning", "error")]

    asyncio.run(scenario())


def test_an_agent_that_ends_is_logged_and_the_rest_of_the_fleet_runs_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    running: set[str] = set()

    async def run(agent: Agent) -> None:
        if agent.agent_id == "laptop-00000":
            raise asyncio.CancelledError()  # from inside, as grpc aio raises it
        running.add(agent.agent_id)
        try:
            await asyncio.Event().wait()
        finally:
            running.discard(agent.agent_id)

    monkeypatch.setattr(Agent, "run", run)

    async def scenario() -> None:
        fleet = Fleet("127.0.0.1:1", fleet_configs(3, seed=1), connections=1, fault_after=3600)
        with capture_logs() as logs:
            runner = asyncio.create_task(fleet.run())
            await wait_until(lambda: logs)
            await settle()
            assert not runner.done() and running == {"laptop-00001", "laptop-00002"}
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        assert runner.cancelled()
        assert logs == [
            {
                "event": "simulated_agent_ended",
                "agent_id": "laptop-00000",
                "error": "CancelledError from inside",
                "log_level": "error",
            }
        ]

    asyncio.run(scenario())
