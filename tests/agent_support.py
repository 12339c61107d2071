"""What the agent tests drive an agent with: the messages a server sends, an outbox that
stands in for the stream, polling from outside, a simulated agent on a channel to
nowhere, a scripted control server for a real stream, and the agent's command line."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from agent_stub import Agent
from agent_stub import Tuning
from agent_stub.capture import EVENTS_PER_TICK
from agent_stub.channels import open_channel
from agent_stub.periodic import Scheduled
from agent_stub.wire_rules import INSECURE_IDENTITY_HEADER
from simulator.faults import Fault
from simulator.faults import FaultTuning
from simulator.faults import SimulatedConfig
from simulator.faulty import SimulatedAgent
from tests.conftest import BIN
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.fake_clock import FakeClock

PER_TICK = sum(EVENTS_PER_TICK.values())
STOPPED = {"keyboard": False, "mouse": False, "screen": False}
LEASE_TTL = 0.6


class Outbox:
    """Records what the agent sends instead of writing to a stream."""

    def __init__(self) -> None:
        self.sent: list[pb.AgentMessage] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.scheduled: list[Scheduled] = []

    def send(self, message: pb.AgentMessage) -> None:
        self.sent.append(message)

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        return task

    def schedule(self, scheduled: Scheduled) -> Scheduled:
        self.scheduled.append(scheduled)
        return scheduled

    def bodies(self, kind: str) -> list[Any]:
        return [getattr(m, kind) for m in self.sent if m.WhichOneof("body") == kind]

    def lease_requests(self) -> list[int]:
        return [r.request_id for r in self.bodies("lease_request")]

    async def close(self) -> None:
        for scheduled in self.scheduled:
            scheduled.cancel()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def directive(
    mode: pb.Mode.ValueType,
    epoch: int = 4,
    *,
    purge: bool = False,
    ttl: float = 30.0,
    heartbeat: float = 3600.0,
) -> pb.ServerMessage:
    return pb.ServerMessage(
        directive=pb.Directive(
            epoch=epoch,
            mode=mode,
            reason="r",
            heartbeat_interval_seconds=heartbeat,
            lease_ttl_seconds=ttl,
            purge_spool=purge,
        )
    )


def grant(request_id: int, granted: bool = True, ttl: float = 30.0) -> pb.ServerMessage:
    return pb.ServerMessage(
        lease_grant=pb.LeaseGrant(request_id=request_id, granted=granted, ttl_seconds=ttl)
    )


def channels(message: pb.Ack | pb.Heartbeat | pb.Hello) -> dict[str, bool]:
    return {c.name: c.state == pb.CHANNEL_STATE_ACTIVE for c in message.channels}


def kinds(messages: list[pb.AgentMessage]) -> list[str]:
    return [str(m.WhichOneof("body")) for m in messages]


async def wait_until(predicate: Callable[[], object]) -> None:
    """Poll for up to 5 s: what runs (an agent, a plane) is watched from outside, as the
    server watches an agent."""
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def settle() -> None:
    """Let spawned tasks (lease requests) run."""
    for _ in range(5):
        await asyncio.sleep(0)


@asynccontextmanager
async def running(work: Coroutine[Any, Any, None]) -> AsyncIterator[asyncio.Task[None]]:
    """``work`` as a task for the block (an agent's ``run``), cancelled and awaited after."""
    task = asyncio.create_task(work)
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def capture_under_lease(
    agent: Agent, outbox: Outbox, *, ttl: float = 30.0, heartbeat: float = 3600.0
) -> None:
    """ALLOWED, the lease request it sends, the grant, one capture tick."""
    await agent.handle(directive(pb.MODE_ALLOWED, 3, ttl=ttl, heartbeat=heartbeat), outbox)
    await settle()
    await agent.handle(grant(outbox.lease_requests()[-1], ttl=ttl), outbox)
    agent.engine.tick()


@asynccontextmanager
async def simulated_agent(
    config: SimulatedConfig, clock: Callable[[], float], **options: Any
) -> AsyncIterator[tuple[SimulatedAgent, Outbox]]:
    """A simulated agent whose stream is an ``Outbox``: its channel leads nowhere. The
    outbox's tasks and the channel are closed afterwards."""
    channel = grpc.aio.insecure_channel("127.0.0.1:1")
    agent = SimulatedAgent(config, channel, rng=random.Random(1), clock=clock, **options)
    outbox = Outbox()
    try:
        yield agent, outbox
    finally:
        await outbox.close()
        await channel.close(grace=None)


Scenario = Callable[[SimulatedAgent, Outbox, FakeClock], Awaitable[None]]


async def drive_agent(
    scenario: Scenario,
    fault: Fault = Fault.NONE,
    tuning: Tuning | None = None,
    fault_tuning: FaultTuning | None = None,
    **options: Any,
) -> None:
    """``scenario`` against a simulated agent (with no fault: the reference agent, and its
    ground truth) on a clock the scenario moves."""
    clock = FakeClock()
    config = SimulatedConfig(
        "a", fault=fault, tuning=tuning or Tuning(), fault_tuning=fault_tuning or FaultTuning()
    )
    async with simulated_agent(config, clock, **options) as (agent, outbox):
        await scenario(agent, outbox, clock)


def run_agent(scenario: Scenario, fault: Fault = Fault.NONE, **options: Any) -> None:
    """``drive_agent`` in an event loop of its own."""
    asyncio.run(drive_agent(scenario, fault, **options))


class ScriptedControl(pb_grpc.AgentControlServicer):
    """Allows capture and grants every lease; records what each stream carried."""

    def __init__(self, lease_ttl: float = LEASE_TTL) -> None:
        self.lease_ttl = lease_ttl
        self.address = ""
        self.streams: list[list[pb.AgentMessage]] = []
        self.callers: list[str] = []
        self.ended_at: list[float] = []
        self.lease_requested_at: dict[str, list[float]] = {}  # caller -> when (monotonic)

    async def Connect(  # type: ignore[override]  # noqa: N802 - gRPC method name
        self, request_iterator: Any, context: Any
    ) -> None:
        received: list[pb.AgentMessage] = []
        self.streams.append(received)
        caller = str(dict(context.invocation_metadata()).get(INSECURE_IDENTITY_HEADER, ""))
        self.callers.append(caller)
        try:
            received.append(await context.read())
            allowed = pb.Directive(
                epoch=1,
                mode=pb.MODE_ALLOWED,
                heartbeat_interval_seconds=0.1,
                lease_ttl_seconds=self.lease_ttl,
            )
            await context.write(pb.ServerMessage(directive=allowed))
            while isinstance(message := await context.read(), pb.AgentMessage):
                received.append(message)
                if message.WhichOneof("body") == "lease_request":
                    self.lease_requested_at.setdefault(caller, []).append(time.monotonic())
                    answer = pb.LeaseGrant(
                        request_id=message.lease_request.request_id,
                        granted=True,
                        ttl_seconds=self.lease_ttl,
                    )
                    await context.write(pb.ServerMessage(lease_grant=answer))
        finally:
            self.ended_at.append(time.monotonic())


@asynccontextmanager
async def scripted_control(
    lease_ttl: float = LEASE_TTL,
) -> AsyncIterator[tuple[ScriptedControl, grpc.aio.Channel]]:
    """A ``ScriptedControl`` served on a free local port (at its ``address``), and a channel
    to it; both closed afterwards."""
    control = ScriptedControl(lease_ttl)
    server = grpc.aio.server()
    pb_grpc.add_AgentControlServicer_to_server(control, server)
    control.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    channel = open_channel(control.address)
    try:
        yield control, channel
    finally:
        await channel.close(grace=None)
        await server.stop(grace=None)


def agent_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``killswitch-agent`` run to its end (30 s at most), its output as text."""
    return subprocess.run(
        [str(BIN / "killswitch-agent"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def enrolling_agent(
    server: ServerProcess, cli: Cli, agent_id: str, state_dir: Path, *extra: str
) -> list[str]:
    """The command of the reference agent as shipped: it enrols with a fresh join token,
    keeps its identity in ``state_dir``, then connects over mTLS."""
    return [
        str(BIN / "killswitch-agent"),
        "run",
        "--server",
        server.address,
        "--agent-id",
        agent_id,
        "--state-dir",
        str(state_dir),
        "--enroll-token",
        cli.enroll_token(1),
        "--enroll-server",
        server.enroll_address,
        "--ca",
        str(server.ca_path),
        *extra,
    ]


class ScriptedCall:
    """A Connect call that ends as grpc aio ends one cancelled on the agent's side:
    ``read`` raises ``CancelledError``, or ``write`` says the RPC already finished.
    Without a failure it carries nothing until cancelled."""

    def __init__(self, failure: str = "") -> None:
        self.failure = failure
        self.written: list[pb.AgentMessage] = []
        self._cancelled = asyncio.Event()

    async def write(self, message: pb.AgentMessage) -> None:
        if self.failure == "write":
            raise asyncio.InvalidStateError("RPC already finished.")
        if self.failure == "write-error":
            raise RuntimeError("unforeseen")
        self.written.append(message)

    async def read(self) -> pb.ServerMessage:
        if self.failure == "read":
            await asyncio.sleep(0)  # noticed while waiting, as grpc aio notices it
            raise asyncio.CancelledError()
        await self._cancelled.wait()  # as grpc aio: a call cancelled here ends its reads
        raise asyncio.CancelledError()

    async def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def cancel(self) -> bool:
        self._cancelled.set()
        return True
