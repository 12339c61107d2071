"""The lease clock per platform, with the platform substituted, and a laptop asleep on each.

Each fake platform has two clocks: one that counts sleep and one that stops during it
(Linux CLOCK_MONOTONIC, Python's ``time.monotonic`` on macOS, Windows'
QueryUnbiasedInterruptTime). A laptop "sleeps" by moving only the first; an agent on
the wrong clock would wake with its lease still valid.
"""

from __future__ import annotations

import asyncio
import ctypes
import random
import sys
import time
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import grpc
import pytest
from killswitch.v1 import killswitch_pb2 as pb

from agent_stub import PLATFORM_CLOCK
from agent_stub import Agent
from agent_stub import AgentConfig
from agent_stub import NoSleepClock
from agent_stub import cli as agent_cli
from agent_stub import platform_clock
from agent_stub.clock import Clock
from agent_stub.clock import LibraryLoader
from simulator.faults import SimulatedConfig
from tests.agent_support import PER_TICK
from tests.agent_support import STOPPED
from tests.agent_support import Outbox
from tests.agent_support import directive
from tests.agent_support import grant
from tests.agent_support import kinds
from tests.agent_support import running
from tests.agent_support import scripted_control
from tests.agent_support import settle
from tests.agent_support import simulated_agent
from tests.agent_support import wait_until

# Stand-ins for the clock ids of the time module, to see which one is read.
BOOTTIME_ID, MONOTONIC_ID = 7, 1


@dataclass
class Machine:
    """Seconds since boot, and how many of them were spent asleep."""

    awake: float = 5_000.0
    asleep: float = 0.0
    reads: list[str] = field(default_factory=list)

    def counting_sleep(self) -> float:
        return self.awake + self.asleep

    def sleep(self, seconds: float) -> None:
        self.asleep += seconds

    def run(self, seconds: float) -> None:
        self.awake += seconds


def fake_clock_gettime(machine: Machine, sleep_counting_id: int) -> Callable[[int], float]:
    def clock_gettime(clock_id: int) -> float:
        machine.reads.append(f"clock_gettime({clock_id})")
        return machine.counting_sleep() if clock_id == sleep_counting_id else machine.awake

    return clock_gettime


class FakeWindowsLibrary:
    """kernelbase/kernel32 through ctypes: the functions found, and which were touched."""

    def __init__(self, machine: Machine, functions: set[str]) -> None:
        self._machine, self._functions = machine, functions

    def __getattr__(self, name: str) -> Any:
        if name not in self._functions:
            raise AttributeError(f"function '{name}' not found")
        machine = self._machine

        def into(pointer: Any, seconds: float) -> None:
            machine.reads.append(name)
            pointer.contents.value = round(seconds * 1e7)

        def tick_count() -> int:
            machine.reads.append(name)
            return round(machine.counting_sleep() * 1000)

        functions: dict[str, Callable[..., Any]] = {
            "QueryInterruptTime": lambda p: into(p, machine.counting_sleep()),
            "QueryUnbiasedInterruptTime": lambda p: into(p, machine.awake),
            "GetTickCount64": tick_count,
        }
        return functions[name]


def windows_loader(machine: Machine, exports: dict[str, set[str]]) -> LibraryLoader:
    def load(name: str) -> FakeWindowsLibrary:
        if name not in exports:
            raise OSError(f"[WinError 126] {name}.dll not found")
        return FakeWindowsLibrary(machine, exports[name])

    return load


WINDOWS_10 = {
    "kernelbase": {"QueryInterruptTime", "QueryUnbiasedInterruptTime"},
    "kernel32": {"GetTickCount64", "QueryUnbiasedInterruptTime"},
}
OLD_WINDOWS = {
    "kernelbase": {"QueryUnbiasedInterruptTime"},
    "kernel32": set(WINDOWS_10["kernel32"]),
}


@contextmanager
def platform(
    monkeypatch: pytest.MonkeyPatch, name: str, **time_attributes: object
) -> Iterator[None]:
    """``sys.platform`` and the time module as on ``name``, while the clock is chosen."""
    with monkeypatch.context() as patch:
        patch.setattr(sys, "platform", name)
        for attribute in ("CLOCK_BOOTTIME", "CLOCK_MONOTONIC"):
            patch.delattr(time, attribute, raising=False)
        for attribute, value in time_attributes.items():
            patch.setattr(time, attribute, value, raising=False)
        yield


def linux_clock(monkeypatch: pytest.MonkeyPatch, machine: Machine) -> Clock:
    with platform(
        monkeypatch,
        "linux",
        CLOCK_BOOTTIME=BOOTTIME_ID,
        CLOCK_MONOTONIC=MONOTONIC_ID,
        clock_gettime=fake_clock_gettime(machine, BOOTTIME_ID),
    ):
        return platform_clock()


def macos_clock(monkeypatch: pytest.MonkeyPatch, machine: Machine) -> Clock:
    def mach_absolute_time() -> float:
        machine.reads.append("time.monotonic")
        return machine.awake

    with platform(
        monkeypatch,
        "darwin",
        CLOCK_MONOTONIC=MONOTONIC_ID,
        clock_gettime=fake_clock_gettime(machine, MONOTONIC_ID),
        monotonic=mach_absolute_time,
    ):
        return platform_clock()


def windows_clock(monkeypatch: pytest.MonkeyPatch, machine: Machine) -> Clock:
    with platform(monkeypatch, "win32"):
        return platform_clock(windows_loader(machine, WINDOWS_10))


def old_windows_clock(monkeypatch: pytest.MonkeyPatch, machine: Machine) -> Clock:
    with platform(monkeypatch, "win32"):
        return platform_clock(windows_loader(machine, OLD_WINDOWS))


PLATFORMS: dict[str, Callable[[pytest.MonkeyPatch, Machine], Clock]] = {
    "linux": linux_clock,
    "macos": macos_clock,
    "windows": windows_clock,
    "windows-before-10": old_windows_clock,
}
# What each platform's clock must read, and nothing else.
READS = {
    "linux": f"clock_gettime({BOOTTIME_ID})",
    "macos": f"clock_gettime({MONOTONIC_ID})",
    "windows": "QueryInterruptTime",
    "windows-before-10": "GetTickCount64",
}


@dataclass
class Laptop:
    """A machine on one of ``PLATFORMS``, and the lease clock chosen there."""

    platform: str
    machine: Machine
    clock: Clock


@pytest.fixture(params=PLATFORMS)
def laptop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Laptop:
    machine = Machine()
    return Laptop(request.param, machine, PLATFORMS[request.param](monkeypatch, machine))


# ---------------------------------------------------------------- the choice per platform


def test_each_platform_reads_its_sleep_counting_clock(laptop: Laptop) -> None:
    machine, clock = laptop.machine, laptop.clock
    machine.reads.clear()
    before = clock()
    machine.sleep(3_600)
    machine.run(2.5)
    assert clock() - before == pytest.approx(3_602.5), "sleep counts"
    assert set(machine.reads) == {READS[laptop.platform]}


def test_windows_never_uses_the_unbiased_interrupt_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """QueryUnbiasedInterruptTime leaves sleep out: even where it is the only one, refuse."""
    machine = Machine()
    only_unbiased = {"kernelbase": {"QueryUnbiasedInterruptTime"}, "kernel32": set()}
    with platform(monkeypatch, "win32"), pytest.raises(NoSleepClock) as caught:
        platform_clock(windows_loader(machine, only_unbiased))
    assert "QueryInterruptTime" in str(caught.value) and "GetTickCount64" in str(caught.value)
    assert machine.reads == []


def test_the_real_windows_loader_refuses_off_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    with platform(monkeypatch, "win32"), pytest.raises(NoSleepClock, match=r"^win32: no tick"):
        platform_clock()


@pytest.mark.parametrize(
    ("name", "missing"),
    [("linux", "CLOCK_BOOTTIME"), ("darwin", "CLOCK_MONOTONIC")],
)
def test_a_clock_gettime_platform_without_its_clock_refuses(
    monkeypatch: pytest.MonkeyPatch, name: str, missing: str
) -> None:
    with platform(monkeypatch, name), pytest.raises(NoSleepClock, match=missing):
        platform_clock()


@pytest.mark.parametrize("name", ["freebsd14", "sunos5", "cygwin", "emscripten"])
def test_other_platforms_have_no_clock_and_say_so(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    with platform(monkeypatch, name), pytest.raises(NoSleepClock) as caught:
        platform_clock()
    assert str(caught.value).startswith(f"{name}: no clock known to keep counting")


def test_this_machine_runs_leases_on_clock_boottime() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    assert not isinstance(PLATFORM_CLOCK, NoSleepClock)
    assert abs(PLATFORM_CLOCK() - time.clock_gettime(time.CLOCK_BOOTTIME)) < 1.0
    assert PLATFORM_CLOCK() != pytest.approx(time.time(), abs=3600), "never the wall clock"


def test_the_windows_readers_pass_a_real_ctypes_pointer(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the fake writes through is what real ctypes hands QueryInterruptTime."""
    seen: list[object] = []

    class Kernelbase:
        def __init__(self) -> None:
            def query(pointer: Any) -> None:
                seen.append(type(pointer))
                pointer.contents.value = 123_456_789

            self.QueryInterruptTime = query

    with platform(monkeypatch, "win32"):
        clock = platform_clock(lambda name: Kernelbase())
    assert clock() == pytest.approx(12.3456789)
    assert seen == [ctypes.POINTER(ctypes.c_ulonglong)]


# ---------------------------------------------------------------- a laptop asleep on each


def test_a_laptop_asleep_past_its_lease_captures_nothing_until_a_fresh_one(
    laptop: Laptop,
) -> None:
    machine, clock = laptop.machine, laptop.clock

    async def scenario() -> None:
        async with simulated_agent(SimulatedConfig("mac-1"), clock) as (agent, outbox):
            await agent.handle(directive(pb.MODE_ALLOWED, 3, ttl=30), outbox)
            await settle()
            before_sleep = outbox.lease_requests()[-1]
            await agent.handle(grant(before_sleep, ttl=30), outbox)
            agent.engine.tick()
            assert agent.engine.events_captured_total == PER_TICK
            # The pause commits while the lid is closed; the laptop wakes 40 s later.
            machine.sleep(40)
            agent.engine.tick()
            assert agent.engine.events_captured_total == PER_TICK, "the lease ran out asleep"
            assert agent.engine.active == STOPPED
            assert not agent.lease.holds(clock())
            # The answer to a request sent before the sleep is no fresh lease.
            await agent.handle(grant(before_sleep, ttl=30), outbox)
            agent.engine.tick()
            assert agent.engine.active == STOPPED and agent.engine.events_captured_total == PER_TICK
            assert agent.truth.events_without_lease == 0
            # A fresh lease, asked for after waking (as the renewal loop does), starts
            # capture again.
            agent.request_lease(outbox)
            fresh = outbox.lease_requests()[-1]
            await agent.handle(grant(fresh, ttl=30), outbox)
            agent.engine.tick()
            assert agent.engine.events_captured_total == 2 * PER_TICK
            assert agent.truth.events_without_lease == 0

    asyncio.run(scenario())


# ---------------------------------------------------------------- no clock: no capture


def test_an_agent_without_a_sleep_clock_refuses_every_lease_and_acks_pauses() -> None:
    async def scenario() -> None:
        channel = grpc.aio.insecure_channel("127.0.0.1:1")
        missing = NoSleepClock("sunos5: no clock known to keep counting while the machine sleeps")
        agent = Agent(AgentConfig("a"), channel, rng=random.Random(1), clock=missing)
        outbox = Outbox()
        try:
            await agent.handle(directive(pb.MODE_ALLOWED, 3), outbox)
            await settle()
            nack = outbox.sent[-1].nack
            assert nack.epoch == 3 and nack.reason == f"cannot capture here: {missing}"
            assert outbox.lease_requests() == [], "asks for no lease"
            request_id, _ = agent.lease.request()
            await agent.handle(grant(request_id), outbox)
            agent.engine.start_all()  # even channels started by mistake
            agent.engine.tick()
            assert agent.engine.events_captured_total == 0 and agent.engine.active == STOPPED
            await agent.handle(directive(pb.MODE_PAUSED, 4), outbox)
            assert outbox.sent[-1].ack.epoch == 4, "a pause is trivially obeyed"
        finally:
            await outbox.close()
            await channel.close(grace=None)

    asyncio.run(scenario())


def test_run_says_so_in_one_line_and_the_server_sees_the_nack(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = "sunos5: no clock known to keep counting while the machine sleeps"
    monkeypatch.setattr(agent_cli, "PLATFORM_CLOCK", NoSleepClock(reason))

    async def scenario() -> None:
        async with scripted_control() as (control, _):
            args = agent_cli.build_parser().parse_args(
                ["run", "--server", control.address, "--agent-id", "sun-1", "--insecure"]
            )
            async with running(agent_cli.run_one(args)):
                await wait_until(lambda: control.streams and "nack" in kinds(control.streams[0]))
                await asyncio.sleep(0.2)
                assert "lease_request" not in kinds(control.streams[0])

    asyncio.run(scenario())
    # The first line is the tool's own; the test's cancellation of the running agent may
    # add gRPC's shutdown noise after it, which a user's Ctrl-C path never shows.
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        f"killswitch-agent: will not capture: {reason}; it stays connected and refuses every lease"
    )
