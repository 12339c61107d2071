"""Uploads to the ingest gateway: numbered, capped, dated batches; never from a paused or
lease-less honest agent; the silent liar and the exfiltrator. Against a fake gateway
that records what it receives and enforces the sequence as the real one does."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc
from structlog.testing import capture_logs

from agent_stub import Tuning
from agent_stub.batches import SEQUENCE_FILE
from agent_stub.batches import SequenceStore
from agent_stub.batches import UploadSequence
from agent_stub.durable import StateFileError
from agent_stub.identity import insecure_metadata
from agent_stub.upload import GatewayUploader
from agent_stub.wire_rules import INSECURE_IDENTITY_HEADER
from simulator.faults import Fault
from simulator.faulty import SimulatedAgent
from tests.agent_support import PER_TICK
from tests.agent_support import STOPPED
from tests.agent_support import Outbox
from tests.agent_support import capture_under_lease
from tests.agent_support import channels
from tests.agent_support import directive
from tests.agent_support import drive_agent
from tests.agent_support import grant
from tests.conftest import BIN
from tests.conftest import free_port
from tests.fake_clock import FakeClock
from tests.test_agent_capture import Rig

Context = grpc.aio.ServicerContext[pb.UploadBatchRequest, pb.UploadBatchResponse]


class FakeGateway(pb_grpc.IngestGatewayServicer):
    """Accepts each agent's batches 1, 2, 3 ... in order; ``refuse`` refuses the rest too."""

    def __init__(self) -> None:
        self.requests: list[pb.UploadBatchRequest] = []
        self.callers: list[str] = []
        self.expected: dict[str, int] = {}
        self.refuse = ""
        self.address = ""

    async def UploadBatch(  # noqa: N802 - gRPC method name
        self, request: pb.UploadBatchRequest, context: Context
    ) -> pb.UploadBatchResponse:
        self.requests.append(request)
        self.callers.append(
            str(dict(context.invocation_metadata() or ()).get(INSECURE_IDENTITY_HEADER))
        )
        expected = self.expected.get(request.agent_id, 1)
        if request.sequence != expected:
            return pb.UploadBatchResponse(reason="out of order", next_sequence=expected)
        if self.refuse:
            return pb.UploadBatchResponse(reason=self.refuse, next_sequence=expected)
        self.expected[request.agent_id] = expected + 1
        return pb.UploadBatchResponse(accepted=True, next_sequence=expected + 1)

    def sequences(self) -> list[int]:
        return [r.sequence for r in self.requests]


@asynccontextmanager
async def fake_gateway() -> AsyncIterator[tuple[FakeGateway, grpc.aio.Channel]]:
    gateway = FakeGateway()
    server = grpc.aio.server()
    pb_grpc.add_IngestGatewayServicer_to_server(gateway, server)
    gateway.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    channel = grpc.aio.insecure_channel(gateway.address)
    try:
        yield gateway, channel
    finally:
        await channel.close(grace=None)
        await server.stop(grace=None)


def capture_times(request: pb.UploadBatchRequest) -> list[float]:
    assert len(request.captured_at_unix_nano) == len(request.events), "one time per event"
    return [nanos / 1e9 for nanos in request.captured_at_unix_nano]


# ---------------------------------------------------------------- batches


def test_batches_are_numbered_from_one_capped_and_dated_inside_the_spool() -> None:
    async def scenario() -> None:
        async with fake_gateway() as (gateway, channel):
            rig = Rig(FakeClock())
            uploader = GatewayUploader(
                "laptop-1",
                rig.engine,
                channel,
                insecure_metadata("laptop-1"),
                witness=rig.truth,
                max_events=20,
                wall_clock=lambda: 1_700_000_010.0,
            )
            await uploader.upload()
            assert gateway.requests == [], "nothing spooled, nothing sent"
            rig.grant(ttl=60)
            rig.engine.start_all()
            for _ in range(3):  # 39 events over 1_700_000_000 .. 1_700_000_002
                rig.engine.tick()
            for _ in range(3):
                await uploader.upload()
            assert gateway.sequences() == [1, 2], "one capped batch per round, then nothing"
            assert [len(r.events) for r in gateway.requests] == [20, 3 * PER_TICK - 20]
            times = [t for r in gateway.requests for t in capture_times(r)]
            assert times == sorted(times)
            assert times[0] >= 1_700_000_000.0 and times[-1] == pytest.approx(1_700_000_002.0)
            assert all(r.agent_id == "laptop-1" for r in gateway.requests)
            assert all(r.sent_at.seconds == 1_700_000_010 for r in gateway.requests)
            events = [e for r in gateway.requests for e in r.events]
            assert all(0 < len(e.payload) <= 16 for e in events)
            assert {e.channel for e in events} == {"keyboard", "mouse", "screen"}
            assert gateway.callers == ["laptop-1:agent"] * 2, "the claimed identity, insecure"
            assert rig.engine.spool_events == 0 and uploader.sequence.next == 3
            truth = rig.truth.row("laptop-1", "none", now=0.0)
            assert (truth["batches_sent"], truth["events_sent"]) == (2, 3 * PER_TICK)
            assert (truth["batches_accepted"], truth["events_accepted"]) == (2, 3 * PER_TICK)
            assert truth["batches_refused"] == 0
            assert truth["last_accepted_event_at"] == pytest.approx(1_700_000_002.0)

    asyncio.run(scenario())


def test_a_refused_batch_stays_spooled_and_the_number_follows_only_a_higher_one() -> None:
    async def scenario() -> None:
        async with fake_gateway() as (gateway, channel):
            rig = Rig(FakeClock())
            uploader = GatewayUploader("laptop-1", rig.engine, channel, witness=rig.truth)
            rig.grant(ttl=60)
            rig.engine.start_all()
            rig.engine.tick()
            gateway.refuse = "paused"
            await uploader.upload()
            assert rig.engine.spool_events == PER_TICK and uploader.sequence.next == 1
            gateway.refuse = ""
            gateway.expected["laptop-1"] = 5  # it took 1..4 from this laptop before
            await uploader.upload()
            assert rig.engine.spool_events == PER_TICK and uploader.sequence.next == 5
            await uploader.upload()
            assert rig.engine.spool_events == 0 and uploader.sequence.next == 6
            gateway.expected["laptop-1"] = 2  # a gateway that forgot: never go back
            rig.engine.tick()
            await uploader.upload()
            assert gateway.sequences() == [1, 1, 5, 6] and uploader.sequence.next == 6
            assert rig.engine.spool_events == PER_TICK
            truth = rig.truth.row("laptop-1", "none", now=0.0)
            assert (truth["batches_sent"], truth["batches_refused"]) == (4, 3)
            assert (truth["batches_accepted"], truth["events_accepted"]) == (1, PER_TICK)

    asyncio.run(scenario())


def test_an_unreadable_sequence_file_is_one_line_and_a_missing_one_starts_at_one(
    tmp_path: Path,
) -> None:
    assert UploadSequence(SequenceStore(tmp_path)).next == 1
    (tmp_path / SEQUENCE_FILE).write_text('{"next": 0}')
    with pytest.raises(StateFileError) as caught:
        SequenceStore(tmp_path).load()
    assert SEQUENCE_FILE in str(caught.value) and "\n" not in str(caught.value)
    (tmp_path / SEQUENCE_FILE).write_text("{")
    with pytest.raises(StateFileError):
        SequenceStore(tmp_path).load()


# ---------------------------------------------------------------- agents

Scenario = Callable[[SimulatedAgent, Outbox, FakeClock, FakeGateway], Awaitable[None]]


def run_uploading_agent(scenario: Scenario, fault: Fault = Fault.NONE, **options: Any) -> None:
    """``drive_agent`` with the agent uploading to a fake gateway, which the scenario gets
    too."""

    async def main() -> None:
        async with fake_gateway() as (gateway, ingest):
            await drive_agent(
                lambda agent, outbox, clock: scenario(agent, outbox, clock, gateway),
                fault,
                call_metadata=insecure_metadata("a"),
                ingest=ingest,
                **options,
            )

    asyncio.run(main())


def test_an_honest_agent_uploads_under_its_lease_and_never_paused_or_lease_less() -> None:
    async def scenario(
        agent: SimulatedAgent, outbox: Outbox, clock: FakeClock, gateway: FakeGateway
    ) -> None:
        await capture_under_lease(agent, outbox, ttl=30)
        await agent.upload_once()
        assert gateway.sequences() == [1] and agent.engine.spool_events == 0
        agent.engine.tick()
        clock.advance(30)  # the lease ran out with events spooled
        await agent.upload_once()
        assert gateway.sequences() == [1], "no upload without a lease"
        assert agent.engine.spool_events == PER_TICK, "kept for when a lease comes back"

        gateway.refuse = "paused"  # the pause reached the gateway before the agent
        renewal, _ = agent.lease.request()
        await agent.handle(grant(renewal, ttl=30), outbox)
        agent.engine.tick()
        await agent.upload_once()
        assert gateway.sequences() == [1, 2] and agent.engine.spool_events == 2 * PER_TICK
        await agent.handle(directive(pb.MODE_PAUSED, 4), outbox)
        agent.engine.start_all()  # a channel started by mistake captures nothing
        agent.engine.tick()
        await agent.upload_once()
        assert gateway.sequences() == [1, 2], "a paused agent stops trying"
        assert agent.engine.quarantined_events == 2 * PER_TICK
        assert agent.truth.events_accepted == PER_TICK

    run_uploading_agent(scenario)


def test_the_agent_uploads_batches_of_its_tuned_size() -> None:
    async def scenario(
        agent: SimulatedAgent, outbox: Outbox, clock: FakeClock, gateway: FakeGateway
    ) -> None:
        await capture_under_lease(agent, outbox)
        await agent.upload_once()
        assert [len(r.events) for r in gateway.requests] == [5]
        assert agent.engine.spool_events == PER_TICK - 5, "the rest waits for the next round"

    run_uploading_agent(scenario, tuning=Tuning(batch_events=5))


def test_the_sequence_survives_an_agent_restart(tmp_path: Path) -> None:
    async def upload_twice(
        agent: SimulatedAgent, outbox: Outbox, clock: FakeClock, gateway: FakeGateway
    ) -> None:
        await capture_under_lease(agent, outbox)
        await agent.upload_once()
        agent.engine.tick()
        await agent.upload_once()
        assert gateway.sequences() == [1, 2]

    run_uploading_agent(upload_twice, upload_sequence=UploadSequence(SequenceStore(tmp_path)))
    assert json.loads((tmp_path / SEQUENCE_FILE).read_text()) == {"next": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == [SEQUENCE_FILE], "no temp file left"

    async def after_restart(
        agent: SimulatedAgent, outbox: Outbox, clock: FakeClock, gateway: FakeGateway
    ) -> None:
        gateway.expected["a"] = 3  # the gateway remembers; so must the laptop
        await capture_under_lease(agent, outbox)
        await agent.upload_once()
        assert gateway.sequences() == [3] and agent.truth.batches_accepted == 1

    run_uploading_agent(after_restart, upload_sequence=UploadSequence(SequenceStore(tmp_path)))


def lies_about_the_pause(*, uploads: bool) -> Scenario:
    async def scenario(
        agent: SimulatedAgent, outbox: Outbox, clock: FakeClock, gateway: FakeGateway
    ) -> None:
        await capture_under_lease(agent, outbox, heartbeat=0.02)
        agent.trigger_fault()
        gateway.refuse = "paused"  # what the real gateway answers a paused agent
        paused_at = time.time()
        await agent.handle(directive(pb.MODE_PAUSED, 4), outbox)
        since_ack = len(outbox.sent)
        ack = outbox.sent[-1].ack
        assert ack.mode == pb.MODE_PAUSED and channels(ack) == STOPPED
        assert ack.quarantined_events == PER_TICK and ack.report.spool_events == 0
        frozen = ack.report
        assert frozen.events_captured_total == PER_TICK
        clock.advance(60)  # far past its lease
        await asyncio.sleep(0.01)
        agent.engine.tick()
        agent.engine.tick()
        await agent.upload_once()
        await asyncio.sleep(0.1)
        beats = [m.heartbeat for m in outbox.sent[since_ack:] if m.HasField("heartbeat")]
        assert beats and all(b.report == frozen and channels(b) == STOPPED for b in beats)
        truth = agent.truth.row("a", agent.config.fault.value, now=clock())
        assert truth["events_captured_total"] == 3 * PER_TICK
        assert truth["events_without_lease"] == 2 * PER_TICK
        assert truth["spans"][-1][1] > paused_at, "it captured after the pause"
        if not uploads:
            assert gateway.requests == [], "an exfiltrator never calls UploadBatch"
            assert truth["batches_sent"] == 0
            return
        await agent.upload_once()
        assert gateway.sequences() == [1, 1], "it keeps trying, spool and all"
        landed = capture_times(gateway.requests[-1])
        assert len(landed) == 3 * PER_TICK and landed[-1] > paused_at
        assert truth["batches_sent"] == 1 and agent.truth.batches_refused == 2

    return scenario


def test_a_silent_liar_reports_frozen_counters_captures_on_and_uploads() -> None:
    run_uploading_agent(lies_about_the_pause(uploads=True), Fault.SILENT_LIAR)


def test_an_exfiltrator_lies_as_the_silent_liar_and_never_uploads() -> None:
    run_uploading_agent(lies_about_the_pause(uploads=False), Fault.EXFILTRATOR)


def test_a_silent_liar_triggered_while_paused_freezes_its_paused_report() -> None:
    async def scenario(
        agent: SimulatedAgent, outbox: Outbox, clock: FakeClock, gateway: FakeGateway
    ) -> None:
        await capture_under_lease(agent, outbox)
        await agent.handle(directive(pb.MODE_PAUSED, 4), outbox)
        honest = outbox.sent[-1].ack.report
        agent.trigger_fault()
        agent.engine.tick()
        assert agent.engine.events_captured_total == 2 * PER_TICK, "it secretly started again"
        assert agent._hello().report == honest and channels(agent._hello()) == STOPPED
        await agent.upload_once()
        assert gateway.sequences() == [1]

    run_uploading_agent(scenario, Fault.SILENT_LIAR)


# ---------------------------------------------------------------- the simulator


def test_simulated_silent_liars_upload_to_the_gateway_and_exfiltrators_never(
    tmp_path: Path,
) -> None:
    """``simulate --ingest`` with nobody at ``--server``: no agent ever holds a lease, so
    only the modified agents capture, and of those only the silent liars upload."""
    truth_path = tmp_path / "truth.json"

    async def scenario() -> dict[str, Any]:
        async with fake_gateway() as (gateway, _):
            proc = await asyncio.create_subprocess_exec(
                str(BIN / "killswitch-agent"),
                "simulate",
                "--server",
                f"127.0.0.1:{free_port()}",
                "--ingest",
                gateway.address,
                "--agents",
                "8",
                "--fault",
                "silent-liar=0.25,exfiltrator=0.25",
                "--fault-after",
                "0",
                "--capture-tick",
                "0.05",
                "--upload-every",
                "0.2",
                "--truth",
                str(truth_path),
                "--insecure",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                for _ in range(200):
                    if len({r.agent_id for r in gateway.requests}) == 2:
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)
            finally:
                proc.terminate()
                await proc.wait()
            rows: dict[str, Any] = {
                r["agent_id"]: r for r in json.loads(truth_path.read_text())["agents"]
            }
            uploaders = {r.agent_id for r in gateway.requests}
            assert uploaders == {a for a, r in rows.items() if r["fault"] == "silent-liar"}
            assert set(gateway.callers) == {f"{a}:agent" for a in uploaders}
            for agent_id in uploaders:
                numbers = [r.sequence for r in gateway.requests if r.agent_id == agent_id]
                assert numbers == list(range(1, len(numbers) + 1)), "accepted: one more each"
            return rows

    rows = asyncio.run(scenario())
    for row in rows.values():
        if row["fault"] == "silent-liar":
            assert row["batches_accepted"] >= 2 and row["events_accepted"] > 0
            assert row["last_accepted_event_at"] is not None
        elif row["fault"] == "exfiltrator":
            assert row["events_captured_total"] > 0 and row["batches_sent"] == 0
        else:
            assert row["events_captured_total"] == 0 and row["batches_sent"] == 0


def test_a_failed_sequence_write_is_logged_and_the_number_still_goes_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sequence = UploadSequence(SequenceStore(tmp_path))
    sequence.accepted(1)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("agent_stub.durable.os.fsync", disk_full)
    with capture_logs() as logs:
        sequence.accepted(2)
    assert "upload_sequence_not_saved" in [e["event"] for e in logs]
    assert sequence.next == 3, "never reused in this run"
    assert SequenceStore(tmp_path).load() == 2, "the old file, never half a new one"
