"""One capture agent's control loop: connect, obey directives, ack, heartbeat, reconnect."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from enum import StrEnum

import grpc
import structlog
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from agent_stub.backoff import Backoff
from agent_stub.capture import CaptureEngine, ChannelStuck

log = structlog.get_logger("killswitch.agent")

AGENT_VERSION = "agent-stub/0.1.0"
DEFAULT_HEARTBEAT_SECONDS = 10.0

# Keepalive finds a dead server or a silently dropped connection within ~30 s.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_reconnect_backoff_ms", 10_000),
]


class Behaviour(StrEnum):
    """How a simulated agent (mis)behaves; real agents are always OBEDIENT."""

    OBEDIENT = "obedient"
    # A capture channel is stuck on: every pause is nacked.
    NACK = "nack"
    # Connected but frozen: reads directives, never acks or heartbeats.
    SILENT = "silent"


@dataclass(slots=True)
class AgentConfig:
    agent_id: str
    labels: dict[str, str] = field(default_factory=dict)
    behaviour: Behaviour = Behaviour.OBEDIENT


def open_channel(target: str, *, own_connection: bool = True) -> grpc.aio.Channel:
    """A channel to the control server; ``own_connection`` stops gRPC sharing one TCP link."""
    options = list(CHANNEL_OPTIONS)
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    return grpc.aio.insecure_channel(target, options=options)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        channel: grpc.aio.Channel,
        *,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._stub = pb_grpc.AgentControlStub(channel)
        self._rng = rng or random.Random()
        self._backoff = backoff or Backoff(rng=self._rng)
        stuck = frozenset({"screen"}) if config.behaviour is Behaviour.NACK else frozenset()
        self.engine = CaptureEngine(stuck_channels=stuck)
        if stuck:
            self.engine.active["screen"] = True
        self.applied_epoch = 0
        self.applied_mode: int = pb.MODE_UNSPECIFIED
        self.connected = False
        self._heartbeat_interval = DEFAULT_HEARTBEAT_SECONDS

    @property
    def agent_id(self) -> str:
        return self.config.agent_id

    def _channels(self) -> list[pb.Channel]:
        return [
            pb.Channel(
                name=name,
                state=pb.CHANNEL_STATE_ACTIVE if on else pb.CHANNEL_STATE_STOPPED,
            )
            for name, on in self.engine.active.items()
        ]

    async def run(self) -> None:
        """Keep a control stream open forever, reconnecting with jittered backoff."""
        while True:
            try:
                await self._session()
                reason = "server closed the stream"
            except grpc.aio.AioRpcError as exc:
                # During a server restart INTERNAL and CANCELLED show up as well as
                # UNAVAILABLE: any status means "try again later".
                reason = f"{exc.code().name}: {exc.details()}"
            finally:
                self.connected = False
            delay = self._backoff.next_delay()
            log.info("agent_reconnecting", agent_id=self.agent_id, reason=reason, delay=delay)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        # aio streams are written to explicitly; the stubs only know the iterator form.
        call = self._stub.Connect()  # type: ignore[call-arg]
        write_lock = asyncio.Lock()
        hello = pb.Hello(
            agent_id=self.agent_id,
            labels=self.config.labels,
            agent_version=AGENT_VERSION,
            last_applied_epoch=self.applied_epoch,
            channels=self._channels(),
        )
        await call.write(pb.AgentMessage(hello=hello))
        heartbeats: asyncio.Task[None] | None = None
        try:
            while True:
                message = await call.read()
                if not isinstance(message, pb.ServerMessage):  # EOF: the server ended it
                    return
                if not message.HasField("directive"):
                    continue
                self.connected = True
                self._backoff.reset()
                reply = self.apply(message.directive)
                if reply is None:
                    continue
                async with write_lock:
                    await call.write(reply)
                if heartbeats is None:
                    heartbeats = asyncio.create_task(self._heartbeat_loop(call, write_lock))
        finally:
            if heartbeats is not None:
                heartbeats.cancel()
            call.cancel()

    def apply(self, directive: pb.Directive) -> pb.AgentMessage | None:
        """Apply a directive and return the ack or nack to send (None: stay silent)."""
        if directive.heartbeat_interval_seconds > 0:
            self._heartbeat_interval = directive.heartbeat_interval_seconds
        if self.config.behaviour is Behaviour.SILENT:
            return None
        if directive.mode == pb.MODE_PAUSED:
            try:
                self.engine.stop_all()
            except ChannelStuck as exc:
                return pb.AgentMessage(nack=pb.Nack(epoch=directive.epoch, reason=str(exc)))
        elif directive.mode == pb.MODE_ALLOWED:
            self.engine.start_all()
        else:
            # Unknown means off.
            self.engine.stop_all()
            return pb.AgentMessage(
                nack=pb.Nack(epoch=directive.epoch, reason=f"unknown mode {directive.mode}")
            )
        self.applied_epoch, self.applied_mode = directive.epoch, directive.mode
        return pb.AgentMessage(
            ack=pb.Ack(epoch=directive.epoch, mode=directive.mode, channels=self._channels())
        )

    async def _heartbeat_loop(
        self,
        call: grpc.aio.StreamStreamCall[pb.AgentMessage, pb.ServerMessage],
        write_lock: asyncio.Lock,
    ) -> None:
        # A random first offset spreads a fleet's heartbeats evenly over the interval.
        await asyncio.sleep(self._rng.uniform(0, self._heartbeat_interval))
        while True:
            beat = pb.Heartbeat(applied_epoch=self.applied_epoch, channels=self._channels())
            try:
                async with write_lock:
                    await call.write(pb.AgentMessage(heartbeat=beat))
            except Exception as exc:  # the stream ended; the reader reconnects
                log.debug("heartbeat_failed", agent_id=self.agent_id, error=repr(exc))
                return
            await asyncio.sleep(self._heartbeat_interval)
