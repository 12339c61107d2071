"""The agent's timed work (capture ticks, heartbeats, renewals, the proof report): rounds
on the event loop's timer that stop while the laptop is suspended."""

from __future__ import annotations

import asyncio
import itertools

from structlog.testing import capture_logs

from agent_stub.periodic import Scheduled
from agent_stub.periodic import SharedRounds
from agent_stub.stream import ControlStream
from tests.agent_support import ScriptedCall
from tests.agent_support import wait_until


def test_rounds_come_every_period_read_anew_each_time() -> None:
    async def scenario() -> None:
        awake = asyncio.Event()
        awake.set()
        loop = asyncio.get_running_loop()
        times: list[float] = []
        period = [0.01]
        scheduled = Scheduled(
            lambda: times.append(loop.time()),
            first_delay=0.0,
            awake=awake,
            period=lambda: period[0],
        )
        await wait_until(lambda: len(times) >= 3)
        period[0] = 0.2  # a directive slowed the heartbeats
        count = len(times)
        await wait_until(lambda: len(times) >= count + 2)
        scheduled.cancel()
        assert times[count + 1] - times[count] >= 0.2
        assert scheduled.pending is False

    asyncio.run(scenario())


def test_nothing_runs_while_suspended_and_the_round_due_runs_once_on_waking() -> None:
    async def scenario() -> None:
        awake = asyncio.Event()
        loop = asyncio.get_running_loop()
        rounds: list[float] = []
        scheduled = Scheduled(
            lambda: rounds.append(loop.time()), first_delay=0.0, awake=awake, period=lambda: 0.02
        )
        await asyncio.sleep(0.2)  # ten periods asleep
        assert rounds == [], "a suspended laptop does no work"
        woke = loop.time()
        awake.set()
        await wait_until(lambda: len(rounds) >= 3)
        scheduled.cancel()
        assert rounds[0] - woke < 0.1, "the round due runs on waking"
        gaps = [later - earlier for earlier, later in itertools.pairwise(rounds)]
        assert min(gaps) >= 0.018, "the rounds missed asleep are not made up in a burst"

    asyncio.run(scenario())


def test_a_round_that_raises_is_logged_and_the_rounds_go_on() -> None:
    async def scenario() -> None:
        awake = asyncio.Event()
        awake.set()
        rounds: list[int] = []

        def flaky() -> None:
            rounds.append(len(rounds))
            if len(rounds) == 1:
                raise RuntimeError("one bad round")

        with capture_logs() as logs:
            scheduled = Scheduled(flaky, first_delay=0.0, awake=awake, period=lambda: 0.01)
            await wait_until(lambda: len(rounds) >= 3)
            scheduled.cancel()
        assert [e["event"] for e in logs] == ["scheduled_action_failed"]

    asyncio.run(scenario())


def test_cancel_ends_it_even_while_it_waits_for_waking_and_once_runs_once() -> None:
    async def scenario() -> None:
        awake = asyncio.Event()
        rounds: list[str] = []
        asleep = Scheduled(
            lambda: rounds.append("periodic"), first_delay=0.0, awake=awake, period=lambda: 0.01
        )
        await asyncio.sleep(0.02)
        assert asleep.pending, "due, waiting for the laptop to wake"
        asleep.cancel()
        assert not asleep.pending
        once = Scheduled(lambda: rounds.append("once"), first_delay=0.0, awake=awake)
        awake.set()
        await wait_until(lambda: "once" in rounds)
        await asyncio.sleep(0.05)
        assert rounds == ["once"], "a cancelled round never runs; a one-shot runs once"
        assert not once.pending

    asyncio.run(scenario())


def test_shared_rounds_run_each_agent_once_a_period_in_its_slot_and_skip_sleepers() -> None:
    async def scenario() -> None:
        rounds = SharedRounds(0.1, slots=4)
        awake, asleep = asyncio.Event(), asyncio.Event()
        awake.set()
        loop = asyncio.get_running_loop()
        ran: dict[str, list[float]] = {"early": [], "late": [], "asleep": [], "flaky": [], "x": []}

        def flaky() -> None:
            ran["flaky"].append(loop.time())
            raise RuntimeError("one bad round")

        with capture_logs() as logs:
            rounds.schedule(lambda: ran["early"].append(loop.time()), first_delay=0.0, awake=awake)
            rounds.schedule(lambda: ran["late"].append(loop.time()), first_delay=0.07, awake=awake)
            rounds.schedule(lambda: ran["asleep"].append(0.0), first_delay=0.0, awake=asleep)
            rounds.schedule(flaky, first_delay=0.0, awake=awake)
            cancelled = rounds.schedule(lambda: ran["x"].append(0.0), first_delay=0, awake=awake)
            cancelled.cancel()
            await wait_until(lambda: len(ran["early"]) >= 3 and len(ran["late"]) >= 3)
            rounds.close()
        assert ran["asleep"] == [], "a suspended agent's rounds are skipped"
        assert ran["x"] == [], "a cancelled round never runs"
        assert len(ran["flaky"]) >= 3, "a round that raises does not end the others"
        assert {e["event"] for e in logs} == {"scheduled_action_failed"}
        for times in (ran["early"], ran["late"]):
            gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
            assert min(gaps) >= 0.09, "once a period each"
        # Each in its own slot: the late one a few slots after the early one.
        offset = (ran["late"][0] - ran["early"][0]) % 0.1
        assert 0.04 <= offset <= 0.09

    asyncio.run(scenario())


def test_work_scheduled_from_a_running_round_leaves_that_round_tied_to_the_stream() -> None:
    """A stream keeps what it must cancel at close; a round counts as pending while its
    action runs, so work the action schedules does not drop it from the stream's list."""

    async def scenario() -> None:
        awake = asyncio.Event()
        awake.set()
        stream = ControlStream(ScriptedCall())  # type: ignore[arg-type]
        rounds: list[str] = []

        def beat() -> None:
            rounds.append("beat")
            if len(rounds) == 1:
                stream.schedule(Scheduled(lambda: None, first_delay=0.0, awake=awake))

        stream.schedule(Scheduled(beat, first_delay=0.0, awake=awake, period=lambda: 0.01))
        await wait_until(lambda: len(rounds) >= 2)
        await stream.close()
        after_close = len(rounds)
        await asyncio.sleep(0.05)
        assert len(rounds) == after_close, "closing the stream cancelled the running round"

    asyncio.run(scenario())
