"""Bare clients for the baseline: N bidi streams over K connections that ack every push.

The transport is the product agent's own (``open_channel``: same keepalive
options, one TCP connection per channel) and so is the reconnect backoff, so
the only thing missing compared with ``killswitch-agent simulate`` is product
logic: no capture engine, no heartbeats.

Run: ``python -m bench.bare_fleet --server HOST:PORT --agents N --connections K``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random

from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from agent_stub.backoff import Backoff
from agent_stub.channels import open_channel

STOPPED = [
    pb.Channel(name=name, state=pb.CHANNEL_STATE_STOPPED)
    for name in ("keyboard", "mouse", "screen")
]


async def _session(stub: pb_grpc.AgentControlAsyncStub, agent_id: str, backoff: Backoff) -> None:
    call = stub.Connect()  # type: ignore[call-arg]  # aio streams are written explicitly
    try:
        await call.write(pb.AgentMessage(hello=pb.Hello(agent_id=agent_id)))
        while True:
            message = await call.read()
            if not isinstance(message, pb.ServerMessage):
                return
            backoff.reset()
            directive = message.directive
            ack = pb.Ack(epoch=directive.epoch, mode=directive.mode, channels=STOPPED)
            await call.write(pb.AgentMessage(ack=ack))
    finally:
        call.cancel()


async def run_client(stub: pb_grpc.AgentControlAsyncStub, agent_id: str, seed: float) -> None:
    """Keep one stream open forever; like the agent, retry on any failure after a backoff."""
    backoff = Backoff(rng=random.Random(seed))
    while True:
        # Any failure (UNAVAILABLE, INTERNAL, CANCELLED, a write on a dead call) means retry.
        with contextlib.suppress(Exception):
            await _session(stub, agent_id, backoff)
        await asyncio.sleep(backoff.next_delay())


async def run_fleet(target: str, agents: int, connections: int) -> None:
    k = max(1, min(connections, agents))
    channels = [open_channel(target, own_connection=True) for _ in range(k)]
    stubs = [pb_grpc.AgentControlStub(channel) for channel in channels]
    rng = random.Random(1)
    try:
        await asyncio.gather(
            *(run_client(stubs[i % k], f"laptop-{i:05d}", rng.random()) for i in range(agents))
        )
    finally:
        await asyncio.gather(*(channel.close(grace=None) for channel in channels))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_fleet", description=__doc__)
    parser.add_argument("--server", required=True, help="HOST:PORT")
    parser.add_argument("--agents", type=int, required=True)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    print(f"bare fleet: {args.agents} streams over {args.connections} connections", flush=True)
    asyncio.run(run_fleet(args.server, args.agents, args.connections))


if __name__ == "__main__":
    main()
