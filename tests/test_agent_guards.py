"""The agent checks what it is told: no epoch rollback (also across restarts), bounded
TTLs and intervals, nonsense fails closed."""

from __future__ import annotations

import asyncio
import json
import math
import random
from pathlib import Path

import grpc
import pytest
from killswitch.v1 import killswitch_pb2 as pb
from structlog.testing import capture_logs

from agent_stub import Agent
from agent_stub import AgentConfig
from agent_stub import limits
from agent_stub.applied import STATE_FILE
from agent_stub.applied import Applied
from agent_stub.applied import AppliedStateError
from agent_stub.applied import AppliedStore
from agent_stub.identity import insecure_metadata
from simulator.faulty import SimulatedAgent
from tests.agent_support import PER_TICK
from tests.agent_support import Outbox
from tests.agent_support import capture_under_lease
from tests.agent_support import directive
from tests.agent_support import grant
from tests.agent_support import kinds
from tests.agent_support import run_agent
from tests.agent_support import running
from tests.agent_support import scripted_control
from tests.agent_support import settle
from tests.agent_support import wait_until
from tests.fake_clock import FakeClock

# ---------------------------------------------------------------- epochs


def test_an_older_allowed_after_a_pause_is_refused_nacked_and_changes_nothing() -> None:
    async def scenario(agent: SimulatedAgent, outbox: Outbox, clock: FakeClock) -> None:
        await capture_under_lease(agent, outbox)
        await agent.handle(directive(pb.MODE_PAUSED, 9), outbox)
        requests = outbox.lease_requests()
        with capture_logs() as logs:
            # A replica that has not read epoch 9 yet recomputes ALLOWED at 7.
            await agent.handle(directive(pb.MODE_ALLOWED, 7), outbox)
        await settle()
        nack = outbox.sent[-1].nack
        assert nack.epoch == 7
        assert nack.reason == "refused directive at epoch 7: older than applied epoch 9 (PAUSED)"
        assert [e["event"] for e in logs] == ["stale_directive_refused"]
        assert logs[0]["log_level"] == "warning"
        assert agent.directive is not None and agent.directive.mode == pb.MODE_PAUSED
        assert agent.applied_epoch == 9
        assert outbox.lease_requests() == requests, "no lease asked for"
        # A grant arriving now (for any request) gives no lease either.
        await agent.handle(grant(requests[-1]), outbox)
        request_id, _ = agent.lease.request()
        await agent.handle(grant(request_id), outbox)
        agent.engine.tick()
        assert not agent.lease.holds(clock()) and not agent.engine.capturing
        assert agent.engine.events_captured_total == PER_TICK
        assert agent.truth.events_without_lease == 0

    run_agent(scenario)


def test_the_same_epoch_again_is_applied_again_and_a_newer_one_wins() -> None:
    async def scenario(agent: Agent, outbox: Outbox, clock: FakeClock) -> None:
        await agent.handle(directive(pb.MODE_PAUSED, 9), outbox)
        await agent.handle(directive(pb.MODE_PAUSED, 9), outbox)
        assert [a.epoch for a in outbox.bodies("ack")] == [9, 9] and not outbox.bodies("nack")
        await agent.handle(directive(pb.MODE_ALLOWED, 10), outbox)
        await settle()
        assert outbox.bodies("ack")[-1].epoch == 10 and outbox.lease_requests()

    run_agent(scenario)


def test_an_older_directive_than_a_nacked_pause_is_refused_too() -> None:
    """A pause the agent could not fully obey still moved it on: it stopped what it could."""

    async def scenario(agent: Agent, outbox: Outbox, clock: FakeClock) -> None:
        await agent.handle(directive(pb.MODE_UNSPECIFIED, 9), outbox)
        assert outbox.sent[-1].nack.epoch == 9
        await agent.handle(directive(pb.MODE_ALLOWED, 8), outbox)
        assert "older than applied epoch 9 (UNSPECIFIED)" in outbox.sent[-1].nack.reason
        assert not outbox.lease_requests()

    run_agent(scenario)


# ---------------------------------------------------------------- the epoch on disk


def test_the_applied_epoch_is_on_disk_before_the_ack_leaves(tmp_path: Path) -> None:
    store = AppliedStore(tmp_path)
    on_disk_at_send: list[Applied] = []

    class Recording(Outbox):
        def send(self, message: pb.AgentMessage) -> None:
            if message.WhichOneof("body") == "ack":
                on_disk_at_send.append(store.load())
            super().send(message)

    async def main() -> None:
        channel = grpc.aio.insecure_channel("127.0.0.1:1")
        agent = Agent(AgentConfig("a"), channel, clock=FakeClock(), applied_store=store)
        outbox = Recording()
        await agent.handle(directive(pb.MODE_ALLOWED, 3), outbox)
        await agent.handle(directive(pb.MODE_PAUSED, 9), outbox)
        await outbox.close()
        await channel.close(grace=None)

    asyncio.run(main())
    assert on_disk_at_send == [Applied(3, pb.MODE_ALLOWED), Applied(9, pb.MODE_PAUSED)]
    assert json.loads((tmp_path / STATE_FILE).read_text()) == {
        "epoch": 9,
        "mode": "MODE_PAUSED",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE], "no temp file left"


def test_a_restarted_agent_refuses_an_older_allowed_from_a_lagging_replica(
    tmp_path: Path,
) -> None:
    """End to end over a real stream: the replica answers ALLOWED at epoch 1."""
    AppliedStore(tmp_path).save(Applied(9, pb.MODE_PAUSED))  # before the restart

    async def scenario() -> None:
        async with scripted_control() as (control, channel):
            agent = Agent(
                AgentConfig("laptop-1"),
                channel,
                call_metadata=insecure_metadata("laptop-1"),
                rng=random.Random(1),
                applied_store=AppliedStore(tmp_path),
            )
            assert (agent.applied_epoch, agent.applied_mode) == (9, pb.MODE_PAUSED)
            async with running(agent.run()):
                await wait_until(lambda: control.streams and "nack" in kinds(control.streams[0]))
                await asyncio.sleep(0.3)  # a lease TTL's worth of chances to go wrong
                stream = control.streams[0]
                assert stream[0].hello.last_applied_epoch == 9
                assert "lease_request" not in kinds(stream)
                nack = next(m.nack for m in stream if m.WhichOneof("body") == "nack")
                assert nack.epoch == 1 and "older than applied epoch 9 (PAUSED)" in nack.reason
                assert agent.engine.events_captured_total == 0 and not agent.engine.capturing
                assert AppliedStore(tmp_path).load() == Applied(9, pb.MODE_PAUSED)

    asyncio.run(scenario())


def test_a_failed_write_keeps_the_old_file_and_still_acks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = AppliedStore(tmp_path)
    store.save(Applied(9, pb.MODE_PAUSED))

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    async def scenario(agent: Agent, outbox: Outbox, clock: FakeClock) -> None:
        monkeypatch.setattr("agent_stub.durable.os.fsync", disk_full)
        with capture_logs() as logs:
            await agent.handle(directive(pb.MODE_PAUSED, 10), outbox)
        assert outbox.sent[-1].ack.epoch == 10, "the pause was obeyed: say so"
        assert "applied_epoch_not_saved" in [e["event"] for e in logs]
        assert agent.applied_epoch == 10

    run_agent(scenario, applied_store=store)
    assert store.load() == Applied(9, pb.MODE_PAUSED), "never half a file"


@pytest.mark.parametrize(
    "content", ["{", '{"epoch": "9", "mode": "MODE_PAUSED"}', '{"epoch": 9, "mode": "X"}', "[]"]
)
def test_an_unreadable_state_file_stops_the_agent_with_one_line(
    tmp_path: Path, content: str
) -> None:
    (tmp_path / STATE_FILE).write_text(content)
    with pytest.raises(AppliedStateError) as caught:
        AppliedStore(tmp_path).load()
    assert str(tmp_path / STATE_FILE) in str(caught.value) and "\n" not in str(caught.value)


# ---------------------------------------------------------------- TTLs and intervals


def test_a_grant_of_1e12_seconds_holds_at_most_an_hour() -> None:
    async def scenario(agent: Agent, outbox: Outbox, clock: FakeClock) -> None:
        with capture_logs() as logs:
            await capture_under_lease(agent, outbox, ttl=1e12)
        assert agent.lease.expires_at == 1_000.0 + limits.MAX_LEASE_TTL_SECONDS
        assert "lease_ttl_clamped" in [e["event"] for e in logs]
        assert agent.engine.events_captured_total == PER_TICK
        clock.advance(limits.MAX_LEASE_TTL_SECONDS)
        agent.engine.tick()
        assert not agent.engine.capturing and agent.engine.events_captured_total == PER_TICK

    run_agent(scenario)


@pytest.mark.parametrize("ttl", [math.nan, -5.0, 0.0, math.inf, -math.inf])
def test_a_nonsense_ttl_grant_holds_no_lease_and_says_so(ttl: float) -> None:
    async def scenario(agent: Agent, outbox: Outbox, clock: FakeClock) -> None:
        await agent.handle(directive(pb.MODE_ALLOWED, 3), outbox)
        await settle()
        with capture_logs() as logs:
            await agent.handle(grant(outbox.lease_requests()[-1], ttl=ttl), outbox)
        agent.engine.tick()
        assert agent.lease.expires_at is None and not agent.engine.capturing
        assert agent.engine.events_captured_total == 0
        assert [e["event"] for e in logs] == ["lease_grant_refused"]

    run_agent(scenario)


def test_a_lease_held_is_ended_by_a_nonsense_renewal() -> None:
    async def scenario(agent: Agent, outbox: Outbox, clock: FakeClock) -> None:
        await capture_under_lease(agent, outbox)
        request_id, _ = agent.lease.request()
        await agent.handle(grant(request_id, ttl=math.nan), outbox)
        assert not agent.engine.capturing and agent.lease.expires_at is None

    run_agent(scenario)


def test_bounds_and_clamps() -> None:
    floor, ceiling = limits.MIN_INTERVAL_SECONDS, limits.MAX_INTERVAL_SECONDS
    assert limits.heartbeat_interval(1e-9, 10.0) == floor
    assert limits.heartbeat_interval(1e9, 10.0) == ceiling
    assert limits.heartbeat_interval(math.inf, 10.0) == ceiling
    for nonsense in (math.nan, -1.0, 0.0):
        assert limits.heartbeat_interval(nonsense, 10.0) == 10.0
    assert limits.heartbeat_interval(0.5, 10.0) == 0.5, "the tests' pacing is untouched"
    assert limits.renewal_interval(0.01) == floor
    assert limits.renewal_interval(3600) == ceiling
    assert limits.renewal_interval(5.0) == pytest.approx(5 / 3)
    assert limits.directive_ttl(1e12, 60.0) == limits.MAX_LEASE_TTL_SECONDS
    for nonsense in (math.nan, -1.0, math.inf, 0.0):
        assert limits.directive_ttl(nonsense, 60.0) == 60.0
    assert limits.granted_ttl(3.0) == 3.0


def test_a_server_cannot_make_an_agent_flood_its_stream() -> None:
    async def scenario(agent: Agent, outbox: Outbox, clock: FakeClock) -> None:
        await agent.handle(directive(pb.MODE_ALLOWED, 3, ttl=1e-9, heartbeat=1e-9), outbox)
        await asyncio.sleep(0.3)
        most = 0.3 / limits.MIN_INTERVAL_SECONDS + 2
        assert 0 < len(outbox.bodies("heartbeat")) <= most
        assert 0 < len(outbox.lease_requests()) <= most

    run_agent(scenario)


def test_a_server_cannot_silence_an_agent_with_a_huge_heartbeat_interval() -> None:
    async def scenario(agent: Agent, outbox: Outbox, clock: FakeClock) -> None:
        await agent.handle(directive(pb.MODE_PAUSED, 3, heartbeat=math.inf), outbox)
        assert agent._heartbeat_interval == limits.MAX_INTERVAL_SECONDS

    run_agent(scenario)
