"""The ingest gateway under a steady upload load, against a bare gRPC upload sink.

Starts `killswitch serve --insecure`, leases N agents on Connect streams (claimed
identities), starts `killswitch ingest --insecure`, and has every agent upload one
10-event batch every INTERVAL seconds (2,000 agents every 6 s is the rate of 10,000
every 30 s) for SECONDS. Then the same load against a bare sink: a grpc.aio server
that appends each batch to one file and fsyncs, with no checks and no control plane.
Prints accepted batches per second and upload latency (p50/p99) for both, and the ratio.

Run: ``.venv/bin/python -m bench.ingest_gateway [--agents N] [--interval S] [--seconds S]``;
``--bare-sink PORT DIR`` is the baseline server (started by the benchmark itself).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from agent_stub.config import DEFAULT_LEASE_TTL_SECONDS
from agent_stub.identity import insecure_metadata
from bench.procs import Child
from bench.procs import free_port

BIN = Path(sys.executable).parent
EVENTS_PER_BATCH = 10
PAYLOAD = b"k" * 100
# Each channel its own connection (gRPC shares one per target otherwise), with at most
# a few hundred streams each, as the simulator does.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
CONNECTIONS = 16


def ts(at: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(at * 1e9))
    return stamp


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


# ---------------------------------------------------------------- the bare sink


class BareSink(pb_grpc.IngestGatewayServicer):
    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    async def UploadBatch(  # noqa: N802
        self, request: pb.UploadBatchRequest, context: Any
    ) -> pb.UploadBatchResponse:
        data = request.SerializeToString()
        await asyncio.to_thread(self._write, data)
        return pb.UploadBatchResponse(accepted=True, next_sequence=request.sequence + 1)

    def _write(self, data: bytes) -> None:
        os.write(self._fd, len(data).to_bytes(4, "big") + data)
        os.fsync(self._fd)


async def bare_sink(port: int, directory: Path) -> None:
    server = grpc.aio.server()
    pb_grpc.add_IngestGatewayServicer_to_server(BareSink(directory / "bare.log"), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# ---------------------------------------------------------------- the fleet


async def lease(
    channel: grpc.aio.Channel, agent_id: str, hold: asyncio.Event, calls: list[Any]
) -> None:
    """Connect, ack the directive ALLOWED, get a lease; keep the stream open."""
    outbox: asyncio.Queue[pb.AgentMessage] = asyncio.Queue()

    async def messages() -> AsyncIterator[pb.AgentMessage]:
        yield pb.AgentMessage(hello=pb.Hello(agent_id=agent_id))
        while True:
            get = asyncio.ensure_future(outbox.get())
            stop = asyncio.ensure_future(hold.wait())
            done, _ = await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
            if stop in done:
                get.cancel()
                return
            stop.cancel()
            yield get.result()

    stub = pb_grpc.AgentControlStub(channel)
    call = stub.Connect(messages(), metadata=insecure_metadata(agent_id))
    calls.append(call)  # open until the benchmark ends
    async for reply in call:
        if reply.WhichOneof("body") == "directive":
            ack = pb.Ack(epoch=reply.directive.epoch, mode=pb.MODE_ALLOWED)
            await outbox.put(pb.AgentMessage(ack=ack))
            await outbox.put(pb.AgentMessage(lease_request=pb.LeaseRequest(request_id=1)))
        elif reply.lease_grant.granted:
            return


async def upload_load(
    address: str, agents: list[str], interval: float, seconds: float, *, claims: bool
) -> tuple[int, int, list[float]]:
    channels = [grpc.aio.insecure_channel(address, CHANNEL_OPTIONS) for _ in range(CONNECTIONS)]
    accepted = refused = 0
    latencies: list[float] = []
    end = time.monotonic() + seconds

    async def agent(index: int, agent_id: str) -> None:
        nonlocal accepted, refused
        stub = pb_grpc.IngestGatewayStub(channels[index % len(channels)])
        metadata = insecure_metadata(agent_id) if claims else ()
        await asyncio.sleep(random.uniform(0, interval))
        sequence = 1
        while time.monotonic() < end:
            now = time.time()
            request = pb.UploadBatchRequest(
                agent_id=agent_id,
                sequence=sequence,
                events=[
                    pb.CaptureEvent(channel="keyboard", payload=PAYLOAD)
                    for _ in range(EVENTS_PER_BATCH)
                ],
                captured_at_unix_nano=[
                    int((now - 1 + i / 10) * 1e9) for i in range(EVENTS_PER_BATCH)
                ],
                sent_at=ts(now),
            )
            started = time.perf_counter()
            try:
                answer = await stub.UploadBatch(request, timeout=10, metadata=metadata)
            except grpc.aio.AioRpcError:
                refused += 1
            else:
                latencies.append(time.perf_counter() - started)
                if answer.accepted:
                    accepted += 1
                    sequence += 1
                else:
                    refused += 1
            await asyncio.sleep(interval)

    await asyncio.gather(*(agent(i, a) for i, a in enumerate(agents)))
    for channel in channels:
        await channel.close(grace=None)
    return accepted, refused, latencies


def summary(name: str, seconds: float, result: tuple[int, int, list[float]]) -> float:
    accepted, refused, latencies = result
    latencies.sort()

    def pct(q: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0
        )

    rate = accepted / seconds
    print(
        f"{name:8} accepted {accepted} ({rate:.0f}/s), refused {refused},"
        f" upload latency p50 {pct(0.5):.1f} ms p99 {pct(0.99):.1f} ms"
    )
    return rate


async def run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    grpc_port, http_port, gw_port, bare_port = (free_port() for _ in range(4))
    lease_ttl = max(DEFAULT_LEASE_TTL_SECONDS, args.seconds * 3)
    server = Child(
        "serve",
        [str(BIN / "killswitch"), "serve", "--insecure", "--data-dir", str(work / "control"),
         "--grpc", f"127.0.0.1:{grpc_port}", "--http", f"127.0.0.1:{http_port}",
         "--log-level", "warning", "--lease-ttl", str(lease_ttl)],
        work / "serve.log", work,
    )  # fmt: skip
    url = f"http://127.0.0.1:{http_port}/readyz"
    wait_until(lambda: urllib.request.urlopen(url, timeout=1).status == 200, 30, "serve")
    agents = [f"laptop-{i:05d}" for i in range(args.agents)]
    hold = asyncio.Event()
    control = [
        grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}", CHANNEL_OPTIONS)
        for _ in range(CONNECTIONS)
    ]
    calls: list[Any] = []
    for first in range(0, len(agents), 100):  # a fleet connecting over a few seconds
        await asyncio.wait_for(
            asyncio.gather(
                *(
                    lease(control[i % CONNECTIONS], agents[i], hold, calls)
                    for i in range(first, min(first + 100, len(agents)))
                )
            ),
            timeout=60,
        )
    gateway = Child(
        "ingest",
        [str(BIN / "killswitch"), "ingest", "--insecure", "--data-dir", str(work / "ingest"),
         "--listen", f"127.0.0.1:{gw_port}", "--control", f"127.0.0.1:{grpc_port}",
         "--log-level", "info", "--log-format", "json"],
        work / "ingest.log", work,
    )  # fmt: skip
    bare = Child(
        "bare",
        [sys.executable, "-m", "bench.ingest_gateway", "--bare-sink", str(bare_port), str(work)],
        work / "bare.log", Path.cwd(),
    )  # fmt: skip
    await asyncio.sleep(2)
    print(
        f"{args.agents} agents, one {EVENTS_PER_BATCH}-event batch every {args.interval:g} s"
        f" each, for {args.seconds:g} s"
    )
    gw = summary(
        "gateway",
        args.seconds,
        await upload_load(f"127.0.0.1:{gw_port}", agents, args.interval, args.seconds, claims=True),
    )
    raw = summary(
        "bare",
        args.seconds,
        await upload_load(
            f"127.0.0.1:{bare_port}", agents, args.interval, args.seconds, claims=False
        ),
    )
    print(f"bare / gateway throughput: {raw / gw:.2f}x" if gw else "gateway accepted nothing")
    windows = [
        json.loads(line)
        for line in (work / "ingest.log").read_text().splitlines()
        if '"authorization_latency"' in line
    ]
    if windows:
        print(
            f"authorization (the gateway's AuthorizeBatches round trips, {len(windows)} windows"
            f" of 10 s): p50 {statistics.median(w['p50_ms'] for w in windows):.1f} ms,"
            f" worst window p99 {max(w['p99_ms'] for w in windows):.1f} ms,"
            f" {sum(w['checks'] for w in windows) / max(1, sum(w['calls'] for w in windows)):.1f}"
            " checks per call"
        )
    hold.set()
    for child in (bare, gateway, server):
        child.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--interval", type=float, default=6.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--bare-sink", nargs=2, metavar=("PORT", "DIR"))
    args = parser.parse_args()
    if args.bare_sink:
        asyncio.run(bare_sink(int(args.bare_sink[0]), Path(args.bare_sink[1])))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
