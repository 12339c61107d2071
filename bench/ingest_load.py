"""Load the ingest drill adds on top of the simulated fleet, and how it reads the sink.

* ``probe``: a few extra agents (leased by their own small simulator, which never
  uploads) upload every ``every`` seconds and time each ``UploadBatch`` round trip.
  ``every`` is above the gateway's verdict-cache TTL, so each probe batch waits for the
  control plane's verdict as a fleet batch does.
* ``burst``: one batch for each of N agents, sent as fast as the client can (``concurrency``
  calls in flight over ``connections`` channels), pre-serialized so the client spends
  its CPU on gRPC only. The time to absorb one full round of uploads.
* ``sink_batches`` / ``late_in_sink``: what landed in the product's sink.

Every batch has the size a fleet agent's has (``agent_stub.batches.upload_request``:
13 events a capture tick over one upload interval).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import grpc
from killswitch.v1 import killswitch_pb2 as pb

from agent_stub.batches import upload_request
from agent_stub.capture import EVENTS_PER_TICK
from agent_stub.capture import Batch
from agent_stub.channels import open_channel
from agent_stub.identity import insecure_metadata
from control.ingest.checks import MAX_SKEW_ALLOWANCE
from control.ingest.sink import load_sequences
from control.ingest.sink_format import SINK_DIR
from control.ingest.sink_format import day_manifests
from control.ingest.sink_format import manifest_entries
from control.ingest.sink_format import read_record

UPLOAD_METHOD = "/killswitch.v1.IngestGateway/UploadBatch"
CALL_TIMEOUT_SECONDS = 30.0


def fleet_sized_request(agent_id: str, sequence: int, upload_every: float) -> bytes:
    """A batch as a fleet agent uploads it: one interval of capture, ending now."""
    now = time.time()
    count = max(1, round(sum(EVENTS_PER_TICK.values()) * upload_every))
    batch = Batch(now - upload_every, now, count, spool_generation=0, rest_first_at=now)
    return upload_request(agent_id, sequence, batch, now).SerializeToString()


def _uploader(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    """UploadBatch with the bytes passed through: serialized beforehand, parsed after."""
    return channel.unary_unary(UPLOAD_METHOD, request_serializer=None, response_deserializer=None)


# ------------------------------------------------------------------ latency probes


@dataclass(slots=True)
class ProbeResult:
    latencies: list[float] = field(default_factory=list)  # seconds, accepted batches only
    refused: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)


async def _probe_one(
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes],
    agent_id: str,
    *,
    until: float,
    every: float,
    upload_every: float,
    result: ProbeResult,
    rng: random.Random,
) -> None:
    sequence = 1
    await asyncio.sleep(rng.uniform(0, every))
    while time.monotonic() < until:
        request = fleet_sized_request(agent_id, sequence, upload_every)
        started = time.perf_counter()
        try:
            raw = await call(
                request, timeout=CALL_TIMEOUT_SECONDS, metadata=insecure_metadata(agent_id)
            )
        except grpc.aio.AioRpcError as exc:
            result.errors[exc.code().name] += 1
        else:
            elapsed = time.perf_counter() - started
            answer = pb.UploadBatchResponse.FromString(raw)
            if answer.accepted:
                result.latencies.append(elapsed)
            else:
                result.refused[answer.reason[:60]] += 1
            sequence = max(sequence + answer.accepted, answer.next_sequence)
        await asyncio.sleep(every * rng.uniform(0.8, 1.2))


async def probe(
    target: str, agent_ids: Sequence[str], duration: float, every: float, upload_every: float
) -> ProbeResult:
    channel = open_channel(target)
    call = _uploader(channel)
    result = ProbeResult()
    until = time.monotonic() + duration
    rng = random.Random(7)
    try:
        await asyncio.gather(
            *(
                _probe_one(
                    call,
                    agent_id,
                    until=until,
                    every=every,
                    upload_every=upload_every,
                    result=result,
                    rng=rng,
                )
                for agent_id in agent_ids
            )
        )
    finally:
        await channel.close(grace=None)
    return result


# ------------------------------------------------------------------ one round, at once


@dataclass(frozen=True, slots=True)
class BurstResult:
    sent: int
    accepted: int
    refused: int
    errors: int
    seconds: float
    # Batches sent a second time under the number the gateway named (a fleet agent's
    # own upload took the number meanwhile).
    retried: int
    # The box's CPU time left idle (idle and I/O wait, every core) while the round ran:
    # near 0 when the round is bound by CPU, as a throughput figure should be; well above
    # it when uploads sat waiting (on a commit, say) and more in flight would go faster.
    idle_share: float


def cpu_times() -> tuple[int, int]:
    """(idle, total) clock ticks of every core since boot, from ``/proc/stat``."""
    fields = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


async def burst(
    target: str,
    agent_ids: Sequence[str],
    sequences_of: Callable[[Sequence[str]], Mapping[str, int]],
    upload_every: float,
    *,
    connections: int,
    concurrency: int,
) -> BurstResult:
    """One batch per agent, numbered by ``sequences_of`` once every batch is built."""
    # Built without their numbers (0 is not serialized), which are read just before
    # sending and put in front: a field before the others parses the same.
    bodies = [fleet_sized_request(agent_id, 0, upload_every) for agent_id in agent_ids]
    sequences = sequences_of(agent_ids)
    requests = [
        (a, pb.UploadBatchRequest(sequence=sequences[a]).SerializeToString() + body)
        for a, body in zip(agent_ids, bodies, strict=True)
    ]
    channels = [open_channel(target) for _ in range(connections)]
    calls = [_uploader(c) for c in channels]
    for channel in channels:
        await channel.channel_ready()
    counts = {"accepted": 0, "refused": 0, "errors": 0, "retried": 0}
    slots = asyncio.Semaphore(concurrency)

    async def send(i: int, agent_id: str, request: bytes) -> None:
        async with slots:
            call = calls[i % len(calls)]
            metadata = insecure_metadata(agent_id)
            try:
                answer = pb.UploadBatchResponse.FromString(
                    await call(request, timeout=CALL_TIMEOUT_SECONDS, metadata=metadata)
                )
                if not answer.accepted and answer.next_sequence > sequences[agent_id]:
                    counts["retried"] += 1
                    again = pb.UploadBatchRequest.FromString(request)
                    again.sequence = answer.next_sequence
                    answer = pb.UploadBatchResponse.FromString(
                        await call(
                            again.SerializeToString(),
                            timeout=CALL_TIMEOUT_SECONDS,
                            metadata=metadata,
                        )
                    )
            except grpc.aio.AioRpcError:
                counts["errors"] += 1
                return
            counts["accepted" if answer.accepted else "refused"] += 1

    idle0, total0 = cpu_times()
    started = time.perf_counter()
    await asyncio.gather(*(send(i, a, r) for i, (a, r) in enumerate(requests)))
    elapsed = time.perf_counter() - started
    idle1, total1 = cpu_times()
    await asyncio.gather(*(c.close(grace=None) for c in channels))
    return BurstResult(
        sent=len(requests),
        accepted=counts["accepted"],
        refused=counts["refused"],
        errors=counts["errors"],
        seconds=elapsed,
        retried=counts["retried"],
        idle_share=(idle1 - idle0) / max(1, total1 - total0),
    )


# ------------------------------------------------------------------ the product's sink


def sink_batches(data_dir: Path) -> int:
    """Batches the sink's manifests hold (one whole line each), every agent, every day."""
    total = 0
    for manifest in day_manifests(data_dir / SINK_DIR):
        total += manifest.read_bytes().count(b"\n")
    return total


def next_sequences(data_dir: Path, agent_ids: Sequence[str]) -> dict[str, int]:
    """The sequence the gateway expects next from each agent: what it reads at start."""
    following, _ = load_sequences(data_dir / SINK_DIR)
    return {agent_id: following.get(agent_id, 1) for agent_id in agent_ids}


@dataclass(slots=True)
class SinkAudit:
    events: int = 0  # every event the manifests describe
    batches: int = 0
    checked_batches: int = 0  # read back, checksum verified, every capture time looked at
    # (agent, capture time) of accepted events captured after the allowance given
    late: list[tuple[str, float]] = field(default_factory=list)
    bad_checksums: int = 0


def late_in_sink(data_dir: Path, committed: float, allowance: Mapping[str, float]) -> SinkAudit:
    """Events in the sink captured after ``committed + allowance[agent]``.

    Every batch received from ``MAX_SKEW_ALLOWANCE`` before the pause on, or whose
    manifest dates an event after the pause, is read back, its checksum verified, and
    each event's capture time checked. Earlier batches cannot hold such events: the
    gateway refuses any event dated later than its receipt plus that allowance.
    """
    audit = SinkAudit()
    since = committed - MAX_SKEW_ALLOWANCE
    for manifest in day_manifests(data_dir / SINK_DIR):
        with manifest.with_suffix(".log").open("rb") as log:
            for entry, _ in manifest_entries(manifest):
                audit.batches += 1
                audit.events += entry.events
                bound = committed + allowance.get(entry.agent, 0.0)
                if entry.received_at < since and entry.last_event_at <= bound:
                    continue
                record = read_record(log, entry)
                if record is None:
                    audit.bad_checksums += 1
                    continue
                audit.checked_batches += 1
                batch = pb.UploadBatchRequest.FromString(record)
                for nanos in batch.captured_at_unix_nano:
                    at = nanos / 1e9
                    if at > bound:
                        audit.late.append((entry.agent, at))
    return audit
