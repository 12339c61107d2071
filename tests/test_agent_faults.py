"""How an agent handles directives and lease grants, honestly and under each fault."""

from __future__ import annotations

import asyncio

import pytest
from killswitch.v1 import killswitch_pb2 as pb

from agent_stub import Tuning
from simulator.faults import Fault
from simulator.faults import FaultTuning
from simulator.faulty import SimulatedAgent
from simulator.fleet import fault_counts
from simulator.fleet import fleet_configs
from tests.agent_support import PER_TICK
from tests.agent_support import STOPPED
from tests.agent_support import Outbox
from tests.agent_support import capture_under_lease
from tests.agent_support import channels
from tests.agent_support import directive
from tests.agent_support import grant
from tests.agent_support import run_agent
from tests.agent_support import settle
from tests.agent_support import wait_until
from tests.fake_clock import FakeClock

# ---------------------------------------------------------------- honest agent


def test_allowed_is_acked_and_capture_waits_for_the_lease_grant() -> None:
    async def scenario(agent: SimulatedAgent, outbox: Outbox, clock: FakeClock) -> None:
        assert not agent.engine.capturing, "unknown state means off"
        await agent.handle(directive(pb.MODE_ALLOWED, 3), outbox)
        await settle()
        ack, request = outbox.sent
        assert ack.ack.epoch == 3 and ack.ack.mode == pb.MODE_ALLOWED
        assert channels(ack.ack) == STOPPED and ack.ack.report.events_captured_total == 0
        assert request.lease_request.request_id == 1
        agent.engine.tick()
        assert agent.engine.events_captured_total == 0, "no capture before the grant"
        await agent.handle(grant(1), outbox)
        agent.engine.tick()
        assert agent.engine.events_captured_total == PER_TICK
        clock.advance(30)  # no renewal was granted: the lease runs out
        agent.engine.tick()
        assert agent.engine.events_captured_total == PER_TICK and not agent.engine.capturing
        assert agent.truth.events_without_lease == 0

    run_agent(scenario)


def test_leases_are_renewed_every_third_of_the_ttl_while_allowed() -> None:
    async def scenario(agent: SimulatedAgent, outbox: Outbox, clock: FakeClock) -> None:
        await agent.handle(directive(pb.MODE_ALLOWED, 3, ttl=0.3), outbox)
        started = asyncio.get_running_loop().time()
        await wait_until(lambda: len(outbox.lease_requests()) == 3)
        assert outbox.lease_requests() == [1, 2, 3]
        # The first renewal at a random point of the first 0.1 s, then one every 0.1 s.
        assert asyncio.get_running_loop().time() - started >= 0.1, "one every 0.1 s"
        await agent.handle(directive(pb.MODE_PAUSED, 4), outbox)
        await asyncio.sleep(0.25)
        assert outbox.lease_requests() == [1, 2, 3], "no renewals while paused"

    run_agent(scenario)


@pytest.mark.parametrize("purge", [True, False])
def test_pause_stops_revokes_and_purges_or_quarantines_then_acks_the_evidence(
    purge: bool,
) -> None:
    async def scenario(agent: SimulatedAgent, outbox: Outbox, clock: FakeClock) -> None:
        await capture_under_lease(agent, outbox)
        agent.engine.tick()
        await agent.handle(directive(pb.MODE_PAUSED, 4, purge=purge), outbox)
        ack = outbox.sent[-1].ack
        assert ack.epoch == 4 and ack.mode == pb.MODE_PAUSED and channels(ack) == STOPPED
        assert ack.report.events_captured_total == 2 * PER_TICK
        assert ack.report.spool_events == 0 and ack.report.HasField("last_event_at")
        assert (ack.purged_events, ack.quarantined_events) == (
            (2 * PER_TICK, 0) if purge else (0, 2 * PER_TICK)
        )
        assert agent.engine.quarantined_events == ack.quarantined_events, "kept aside or gone"
        assert not agent.lease.holds(clock()), "a pause ends the lease at once"
        agent.engine.start_all()  # even a channel started by mistake captures nothing
        agent.engine.tick()
        assert agent.engine.events_captured_total == 2 * PER_TICK
        assert agent.applied_epoch == 4

    run_agent(scenario)


def test_a_grant_sent_before_the_pause_does_not_restart_capture() -> None:
    async def scenario(agent: SimulatedAgent, outbox: Outbox, clock: FakeClock) -> None:
        await agent.handle(directive(pb.MODE_ALLOWED, 3), outbox)
        await settle()
        await agent.handle(directive(pb.MODE_PAUSED, 4), outbox)
        await agent.handle(grant(1), outbox)
        agent.engine.tick()
        assert not agent.engine.capturing and agent.engine.events_captured_total == 0

    run_agent(scenario)


def test_refused_renewal_stops_capture_at_once() -> None:
    async def scenario(agent: SimulatedAgent, outbox: Outbox, clock: FakeClock) -> None:
        await capture_under_lease(agent, outbox)
        request_id, _ = agent.lease.request()
        await agent.handle(grant(request_id, granted=False), outbox)
        assert not agent.engine.capturing
        agent.engine.tick()
        assert agent.engine.events_captured_total == PER_TICK

    run_agent(scenario)


def test_unknown_mode_stops_capture_and_nacks() -> None:
    async def scenario(agent: SimulatedAgent, outbox: Outbox, clock: FakeClock) -> None:
        await capture_under_lease(agent, outbox)
        await agent.handle(directive(pb.MODE_UNSPECIFIED, 5), outbox)
        assert outbox.sent[-1].WhichOneof("body") == "nack"
        assert not agent.engine.capturing and not agent.lease.holds(clock())

    run_agent(scenario)


def test_heartbeats_carry_channels_and_counters_also_while_paused() -> None:
    async def scenario(agent: SimulatedAgent, outbox: Outbox, clock: FakeClock) -> None:
        await capture_under_lease(agent, outbox, heartbeat=0.02)
        await agent.handle(directive(pb.MODE_PAUSED, 4), outbox)
        await asyncio.sleep(0.1)
        beats = outbox.bodies("heartbeat")
        assert beats, "heartbeats continue while paused"
        assert beats[-1].applied_epoch == 4 and channels(beats[-1]) == STOPPED
        assert beats[-1].report.events_captured_total == PER_TICK

    run_agent(scenario)


def test_a_pause_ack_is_followed_by_one_capture_report_a_few_ticks_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The proof report comes after PROOF_REPORT_DELAY_SECONDS (here 0.05 s), not at the
    next heartbeat (here an hour away), and only while that pause is still applied."""
    monkeypatch.setattr("agent_stub.config.PROOF_REPORT_DELAY_SECONDS", 0.05)

    async def scenario(agent: SimulatedAgent, outbox: Outbox, clock: FakeClock) -> None:
        await capture_under_lease(agent, outbox)
        await agent.handle(directive(pb.MODE_PAUSED, 4), outbox)
        assert not outbox.bodies("heartbeat")
        await asyncio.sleep(0.2)
        (proof,) = outbox.bodies("heartbeat")
        assert proof.applied_epoch == 4 and channels(proof) == STOPPED
        assert proof.report.events_captured_total == PER_TICK
        # How long ago the ack went, by the agent's clock: the report's delay, at least.
        assert 0.05 <= proof.seconds_since_ack < 0.5
        # Resumed before its report was due: no proof of a pause no longer applied.
        await agent.handle(directive(pb.MODE_PAUSED, 5), outbox)
        await agent.handle(directive(pb.MODE_ALLOWED, 6), outbox)
        await asyncio.sleep(0.2)
        assert len(outbox.bodies("heartbeat")) == 1

    run_agent(scenario, tuning=Tuning(capture_tick=0.01))


# ---------------------------------------------------------------- faults


async def pause_once_faulty(
    agent: SimulatedAgent, outbox: Outbox, *, heartbeat: float = 3600.0
) -> None:
    """Capturing under a lease, the agent turns to its fault; then the pause (epoch 4)."""
    await capture_under_lease(agent, outbox, heartbeat=heartbeat)
    agent.trigger_fault()
    await agent.handle(directive(pb.MODE_PAUSED, 4), outbox)


def test_faults_wait_for_the_trigger() -> None:
    async def scenario(agent: SimulatedAgent, outbox: Outbox, clock: FakeClock) -> None:
        await capture_under_lease(agent, outbox)
        await agent.handle(directive(pb.MODE_PAUSED, 4), outbox)
        assert outbox.sent[-1].ack.epoch == 4 and not agent.engine.capturing

    run_agent(scenario, Fault.IGNORE)


def test_ignore_never_acts_on_directives_but_keeps_its_lease_machinery() -> None:
    async def scenario(agent: SimulatedAgent, outbox: Outbox, clock: FakeClock) -> None:
        await capture_under_lease(agent, outbox, heartbeat=0.02)
        agent.trigger_fault()
        sent = len(outbox.sent)
        await agent.handle(directive(pb.MODE_PAUSED, 4), outbox)
        await asyncio.sleep(0.1)
        assert not outbox.bodies("nack") and len(outbox.bodies("ack")) == 1
        assert len(outbox.bodies("heartbeat")) > 0 and len(outbox.sent) > sent
        agent.engine.tick()
        assert agent.engine.events_captured_total == 2 * PER_TICK, "still under its lease"
        request_id, _ = agent.lease.request()  # the renewal the server refuses
        await agent.handle(grant(request_id, granted=False), outbox)
        agent.engine.tick()
        assert agent.engine.events_captured_total == 2 * PER_TICK
        assert agent.truth.events_without_lease == 0

    run_agent(scenario, Fault.IGNORE)


def test_lie_acks_every_channel_stopped_and_captures_on_without_a_lease() -> None:
    async def scenario(agent: SimulatedAgent, outbox: Outbox, clock: FakeClock) -> None:
        await pause_once_faulty(agent, outbox, heartbeat=0.02)
        ack = outbox.sent[-1].ack
        assert ack.mode == pb.MODE_PAUSED and channels(ack) == STOPPED
        clock.advance(60)
        agent.engine.tick()
        assert agent.engine.events_captured_total == 2 * PER_TICK
        assert agent.engine.spool_events == 2 * PER_TICK, "nothing purged"
        assert agent.truth.events_without_lease == PER_TICK
        await asyncio.sleep(0.1)
        beat = outbox.bodies("heartbeat")[-1]
        assert channels(beat) == STOPPED
        assert beat.report.events_captured_total == 2 * PER_TICK, "real counters"

    run_agent(scenario, Fault.LIE)


def test_stubborn_nacks_naming_the_screen_but_captures_nothing_without_a_lease() -> None:
    async def scenario(agent: SimulatedAgent, outbox: Outbox, clock: FakeClock) -> None:
        await pause_once_faulty(agent, outbox)
        nack = outbox.sent[-1].nack
        assert nack.epoch == 4 and "screen" in nack.reason and "did not stop" in nack.reason
        assert agent.engine.active == {"keyboard": False, "mouse": False, "screen": True}
        agent.engine.tick()
        assert agent.engine.events_captured_total == PER_TICK
        assert agent.applied_epoch == 3, "a nack applies nothing"

    run_agent(scenario, Fault.STUBBORN)


def test_slow_applies_and_acks_each_directive_late_newest_wins() -> None:
    async def scenario(agent: SimulatedAgent, outbox: Outbox, clock: FakeClock) -> None:
        await pause_once_faulty(agent, outbox)
        await agent.handle(directive(pb.MODE_ALLOWED, 5), outbox)
        assert len(outbox.bodies("ack")) == 1 and agent.engine.capturing, "not yet"
        await asyncio.sleep(0.3)
        epochs = [a.epoch for a in outbox.bodies("ack")]
        assert epochs[-1] == 5 and epochs == sorted(epochs)
        assert agent.directive is not None and agent.directive.epoch == 5

    run_agent(scenario, Fault.SLOW, fault_tuning=FaultTuning(slow_max=0.2))


def test_offline_stays_away_for_twice_the_lease_ttl_and_does_not_upload() -> None:
    async def scenario(agent: SimulatedAgent, outbox: Outbox, clock: FakeClock) -> None:
        await agent.handle(directive(pb.MODE_ALLOWED, 3, ttl=40), outbox)
        agent.trigger_fault()
        assert agent._offline_remaining() == pytest.approx(80, abs=1)

    run_agent(scenario, Fault.OFFLINE)


def test_sleep_suspends_every_task_and_needs_a_fresh_lease_after() -> None:
    async def scenario(agent: SimulatedAgent, outbox: Outbox, clock: FakeClock) -> None:
        runner = asyncio.create_task(agent.run())  # capture ticks every 10 ms
        try:
            # A 1 s lease on the fake boottime clock, renewed every 1/3 s of real time.
            await capture_under_lease(agent, outbox, ttl=1.0)
            await wait_until(lambda: len(outbox.lease_requests()) == 2)
            assert agent.engine.events_captured_total > PER_TICK
            stale = 2  # a renewal, not answered before sleeping
            agent.trigger_fault()
            before, sent = agent.engine.events_captured_total, len(outbox.sent)
            clock.advance(5)  # boottime counts through the sleep, past the lease
            await asyncio.sleep(0.4)
            assert agent.engine.events_captured_total == before, "suspended: no ticks"
            assert len(outbox.sent) == sent, "suspended: no lease requests"
            await asyncio.sleep(0.2)
            assert agent.awake.is_set() and not agent.engine.capturing
            # What arrived while it slept: the answer to a request sent before.
            await agent.handle(grant(stale, ttl=1.0), outbox)
            await asyncio.sleep(0.05)
            assert agent.engine.events_captured_total == before, "no capture on a stale lease"
            fresh = outbox.lease_requests()[-1]
            assert fresh > stale, "renewed at once on waking"
            await agent.handle(grant(fresh, ttl=1.0), outbox)
            await asyncio.sleep(0.05)
            assert agent.engine.events_captured_total > before
            assert agent.truth.events_without_lease == 0
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    run_agent(
        scenario,
        Fault.SLEEP,
        tuning=Tuning(capture_tick=0.01),
        fault_tuning=FaultTuning(sleep_for=0.5),
    )


# ---------------------------------------------------------------- fleet


def test_fault_fractions_round_to_whole_agents_never_exceeding_the_total() -> None:
    assert fault_counts({Fault.LIE: 0.1, Fault.IGNORE: 0.1}, 50) == {
        Fault.LIE: 5,
        Fault.IGNORE: 5,
    }
    assert fault_counts({Fault.LIE: 0.5, Fault.SLOW: 0.5}, 3) == {Fault.LIE: 2, Fault.SLOW: 1}
    faulty = list(Fault)[1:]
    assert sum(fault_counts(dict.fromkeys(faulty, 1 / len(faulty)), 7).values()) == 7
    assert fault_counts({Fault.SLEEP: 0.01}, 10) == {Fault.SLEEP: 0}


def test_fault_assignment_is_deterministic_per_seed() -> None:
    faults = {Fault.LIE: 2, Fault.STUBBORN: 3}
    a = fleet_configs(50, seed=7, faults=faults)
    b = fleet_configs(50, seed=7, faults=dict(reversed(faults.items())))
    assert [(c.agent_id, c.labels, c.fault) for c in a] == [
        (c.agent_id, c.labels, c.fault) for c in b
    ]
    assert sum(c.fault is Fault.LIE for c in a) == 2
    assert sum(c.fault is Fault.STUBBORN for c in a) == 3
    other = fleet_configs(50, seed=8, faults=faults)
    assert [c.fault for c in other] != [c.fault for c in a]
