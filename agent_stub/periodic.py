"""Timed work that stops while the agent's process is suspended.

Every round is a callback on the event loop's timer, not a task asleep in a loop: a
simulator runs 10,000 agents in one process, each ticking its capture every second,
and a task's wake-up (its sleep's future, the timer, the task step) cost several times
a timer callback's. At a 10,000-agent pause that overhead took the core the acks
needed: the simulator, not the server, set the pace (issue 17's profiles).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Protocol

import structlog

log = structlog.get_logger("killswitch.agent.periodic")


class Scheduled:
    """``action`` after ``first_delay`` seconds, then every ``period()`` seconds if a
    period is given, until ``cancel``.

    ``period`` is read at each round because directives change intervals. Nothing runs
    while ``awake`` is clear: a suspended laptop does no work, late or otherwise; the
    round that fell due meanwhile runs once it is set again. An action that raises is
    logged and the rounds go on: one bad round must not end the heartbeats.
    """

    def __init__(
        self,
        action: Callable[[], None],
        *,
        first_delay: float,
        awake: asyncio.Event,
        period: Callable[[], float] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._action = action
        self._awake = awake
        self._period = period
        self._waking: asyncio.Task[None] | None = None
        self._cancelled = False
        # While the action runs (it may schedule more work on the stream that holds this).
        self._running = False
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(first_delay, self._due)

    @property
    def pending(self) -> bool:
        """Whether a round is running or still to come."""
        return self._timer is not None or self._waking is not None or self._running

    def cancel(self) -> None:
        self._cancelled = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._waking is not None:
            self._waking.cancel()
            self._waking = None

    def _due(self) -> None:
        self._timer = None
        if self._awake.is_set():
            self._run()
        else:  # rare: only a simulated suspension clears it
            self._waking = self._loop.create_task(self._run_once_awake())

    async def _run_once_awake(self) -> None:
        await self._awake.wait()
        self._waking = None
        self._run()

    def _run(self) -> None:
        self._running = True
        try:
            _run_guarded(self._action)
        finally:
            self._running = False
        if self._period is not None and not self._cancelled:
            self._timer = self._loop.call_later(self._period(), self._due)


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class SharedRounds:
    """The rounds of many agents of one period on one timer, for a simulator that runs
    10,000 agents in one process: ``slots`` callbacks a period, each running the rounds
    whose first delay fell in its slot, instead of a timer per agent per round.

    Unlike ``Scheduled``, a round that falls due while its agent is suspended is skipped,
    not run on waking: the next one comes a period later. Only for work where that is
    the same, such as capture ticks (a tick captures nothing a lease does not cover, and
    the lease's own watchdog stops the channels at expiry, asleep or not).
    """

    def __init__(self, period: float, *, slots: int = 20) -> None:
        self._period = period
        self._slots: list[dict[int, tuple[Callable[[], None], asyncio.Event]]] = [
            {} for _ in range(slots)
        ]
        self._next_slot = 0
        self._members = itertools.count()
        self._timer: Scheduled | None = None

    def schedule(
        self, action: Callable[[], None], *, first_delay: float, awake: asyncio.Event
    ) -> Cancellable:
        """``action`` every period, in the slot ``first_delay`` falls in, until cancelled."""
        if self._timer is None:
            always = asyncio.Event()
            always.set()
            width = self._period / len(self._slots)
            self._timer = Scheduled(
                self._run_slot, first_delay=width, awake=always, period=lambda: width
            )
        slot = self._slots[int(first_delay / self._period * len(self._slots)) % len(self._slots)]
        key = next(self._members)
        slot[key] = (action, awake)
        return _Member(slot, key)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _run_slot(self) -> None:
        slot = self._slots[self._next_slot]
        self._next_slot = (self._next_slot + 1) % len(self._slots)
        for action, awake in list(slot.values()):
            if awake.is_set():
                _run_guarded(action)


def _run_guarded(action: Callable[[], None]) -> None:
    """One round; one that raises is logged, and the rounds go on."""
    try:
        action()
    except Exception:
        log.exception("scheduled_action_failed", action=repr(action))


class _Member:
    def __init__(self, slot: dict[int, tuple[Callable[[], None], asyncio.Event]], key: int) -> None:
        self._slot, self._key = slot, key

    def cancel(self) -> None:
        self._slot.pop(self._key, None)
