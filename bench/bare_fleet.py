"""Bare clients for the baseline: N bidi streams over K connections that ack every push.

The transport is the product agent's own (``open_channel``: same keepalive
options, one TCP connection per channel) and so is the reconnect backoff, so
the only thing missing compared with ``killswitch-agent simulate`` is product
logic: no capture engine, no leases kept, no reports.

With ``--heartbeat-every S --lease-every S`` each stream also sends a heartbeat and a
lease request at that pace (each from a random point of its interval): the idle message
rate of the product's agents, for the pause benchmark's idle baseline, which runs such a
fleet apart from the one whose pushes it times.

With ``--tls DIR`` every agent connects over TLS with its own client certificate from
``DIR`` (``bench.bare_tls``), so on a channel of its own, which it opens afresh after
every ended stream, as the product's agents over mTLS do.

Run: ``python -m bench.bare_fleet --server HOST:PORT --agents N (--connections K | --tls DIR)
[--heartbeat-every 10 --lease-every 20]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
from collections.abc import Awaitable
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from agent_stub.backoff import Backoff
from agent_stub.channels import open_channel

DEFAULT_CONNECTIONS = 8

STOPPED = [
    pb.Channel(name=name, state=pb.CHANNEL_STATE_STOPPED)
    for name in ("keyboard", "mouse", "screen")
]


@dataclass(frozen=True, slots=True)
class Chatter:
    """The idle messages each stream sends, every so many seconds (0: never)."""

    heartbeat_every: float = 0.0
    lease_every: float = 0.0

    def messages(self) -> list[tuple[float, pb.AgentMessage]]:
        heartbeat = pb.AgentMessage(heartbeat=pb.Heartbeat(channels=STOPPED))
        lease = pb.AgentMessage(lease_request=pb.LeaseRequest(request_id=1))
        paced = [(self.heartbeat_every, heartbeat), (self.lease_every, lease)]
        return [(period, message) for period, message in paced if period > 0]


async def _every(
    period: float,
    message: pb.AgentMessage,
    send: Callable[[pb.AgentMessage], Awaitable[None]],
    rng: random.Random,
) -> None:
    """``message`` every ``period``, from a random point of the first."""
    await asyncio.sleep(rng.uniform(0, period))
    while True:
        await send(message)
        await asyncio.sleep(period)


async def _session(
    stub: pb_grpc.AgentControlAsyncStub, agent_id: str, backoff: Backoff, chatter: Chatter
) -> None:
    call = stub.Connect()  # type: ignore[call-arg]  # aio streams are written explicitly
    paced = chatter.messages()
    writing = asyncio.Lock()  # with chatter, one write at a time, as the agent's outbox does

    async def send(message: pb.AgentMessage) -> None:
        async with writing:
            await call.write(message)

    write = send if paced else call.write
    idle: list[asyncio.Task[None]] = []
    try:
        await write(pb.AgentMessage(hello=pb.Hello(agent_id=agent_id)))
        rng = random.Random(agent_id)
        idle += [asyncio.create_task(_every(p, m, send, rng)) for p, m in paced]
        while True:
            message = await call.read()
            if not isinstance(message, pb.ServerMessage):
                return
            backoff.reset()
            if message.WhichOneof("body") != "directive":
                continue  # a lease grant: nothing to answer
            directive = message.directive
            ack = pb.Ack(epoch=directive.epoch, mode=directive.mode, channels=STOPPED)
            await write(pb.AgentMessage(ack=ack))
    finally:
        for task in idle:
            task.cancel()
        call.cancel()


async def run_client(
    stub: pb_grpc.AgentControlAsyncStub,
    agent_id: str,
    seed: float,
    chatter: Chatter,
    reopen: Callable[[], Awaitable[pb_grpc.AgentControlAsyncStub]] | None = None,
) -> None:
    """Keep one stream open forever; like the agent, retry on any failure after a backoff.

    With ``reopen`` (an agent's own channel, over TLS) each retry is on a fresh channel,
    as the product's agents over mTLS do: after a server restart a fresh channel connects
    at once, where the old one would wait out gRPC's own reconnect backoff (1 s, 1.6 s...).
    """
    backoff = Backoff(rng=random.Random(seed))
    while True:
        # Any failure (UNAVAILABLE, INTERNAL, CANCELLED, a write on a dead call) means retry.
        with contextlib.suppress(Exception):
            await _session(stub, agent_id, backoff, chatter)
        await asyncio.sleep(backoff.next_delay())
        if reopen is not None:
            stub = await reopen()


class OwnChannel:
    """One agent's TLS channel to the server, with its own client certificate."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials) -> None:
        self._target = target
        self._credentials = credentials
        self.channel = open_channel(target, credentials=credentials)

    def stub(self) -> pb_grpc.AgentControlAsyncStub:
        return pb_grpc.AgentControlStub(self.channel)

    async def reopen(self) -> pb_grpc.AgentControlAsyncStub:
        old, self.channel = self.channel, open_channel(self._target, credentials=self._credentials)
        await old.close(grace=None)
        return self.stub()


def agent_name(index: int) -> str:
    """The ``index``-th agent's id, which its certificate names over TLS."""
    return f"laptop-{index:05d}"


async def run_fleet(
    target: str, agents: int, connections: int, chatter: Chatter, tls_dir: Path | None
) -> None:
    """Plaintext over ``connections`` shared channels, or with ``tls_dir`` a channel per agent."""
    names = [agent_name(i) for i in range(agents)]
    rng = random.Random(1)
    channels: list[grpc.aio.Channel] = []
    own: list[OwnChannel] = []
    if tls_dir is None:
        k = max(1, min(connections, agents))
        channels = [open_channel(target, own_connection=True) for _ in range(k)]
        stubs = [pb_grpc.AgentControlStub(channel) for channel in channels]
        clients = [
            run_client(stubs[i % k], name, rng.random(), chatter) for i, name in enumerate(names)
        ]
    else:
        # Imported here: the plaintext fleet loads what it did, not the control plane's
        # PKI module (about 1 MiB) that makes the certificates.
        from bench.bare_tls import agent_credentials

        own = [OwnChannel(target, c) for c in agent_credentials(tls_dir, names)]
        clients = [
            run_client(o.stub(), name, rng.random(), chatter, o.reopen)
            for o, name in zip(own, names, strict=True)
        ]
    try:
        await asyncio.gather(*clients)
    finally:
        await asyncio.gather(
            *(channel.close(grace=None) for channel in channels),
            *(o.channel.close(grace=None) for o in own),
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_fleet", description=__doc__)
    parser.add_argument("--server", required=True, help="HOST:PORT")
    parser.add_argument("--agents", type=int, required=True)
    parser.add_argument(
        "--connections", type=int, help=f"plaintext connections (default {DEFAULT_CONNECTIONS})"
    )
    parser.add_argument(
        "--tls", type=Path, metavar="DIR", help="each agent its own certificate and connection"
    )
    parser.add_argument("--heartbeat-every", type=float, default=0.0, help="seconds; 0: never")
    parser.add_argument("--lease-every", type=float, default=0.0, help="seconds; 0: never")
    args = parser.parse_args()
    if args.tls is not None and args.connections is not None:
        parser.exit(2, f"{parser.prog}: error: --connections is for plaintext: with --tls"
                       " every agent has a connection of its own\n")  # fmt: skip
    connections = DEFAULT_CONNECTIONS if args.connections is None else args.connections
    transport = f"{connections} connections" if args.tls is None else "TLS, one connection each"
    print(f"bare fleet: {args.agents} streams over {transport}", flush=True)
    chatter = Chatter(args.heartbeat_every, args.lease_every)
    asyncio.run(run_fleet(args.server, args.agents, connections, chatter, args.tls))


if __name__ == "__main__":
    main()
