"""A process's start-up as an ordered list of runnables, in the spirit of controller-runtime's
manager: each is started in the order added and stopped in reverse, so whatever something
needs is up before it and still up after it.

If one fails to start, the ones already started are stopped, in reverse, and the failure
propagates: a server that cannot finish starting leaves nothing half-running. A runnable
that fails to stop is logged and the others still stop.

Some runnables do their work only on the replica that leads (``needs_leader``): with
several replicas sharing one database, one drives the runbook runs and the others adopt
its steps. They start on every replica all the same: the others serve reads and commands
from their state and must be ready to take over the moment the leader dies. So what the
flag changes is who asks: ``Manager.leads``, the one leadership check, which those
runnables are built with, and which logs when this replica gains or loses the lead.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable
from collections.abc import Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger("killswitch.lifecycle")


async def _nothing() -> None:
    """What a runnable with nothing to do on that side does."""


@dataclass(frozen=True, slots=True)
class Runnable:
    name: str
    start: Callable[[], Awaitable[None]] = _nothing
    stop: Callable[[], Awaitable[None]] = _nothing
    # Works only while ``Manager.leads()`` says this replica leads (see the module doc).
    needs_leader: bool = False


class Manager:
    def __init__(self, leads: Callable[[], Awaitable[bool]]) -> None:
        """``leads``: whether this process holds the lead now (the store's ``try_lead``)."""
        self._try_lead = leads
        self._leading: bool | None = None
        self._runnables: list[Runnable] = []
        self._started: list[Runnable] = []
        self._begun = False

    def add(self, runnable: Runnable) -> None:
        if self._begun:
            raise RuntimeError(f"{runnable.name} added after start: it would never start")
        self._runnables.append(runnable)

    @property
    def names(self) -> list[str]:
        """Every runnable, in start order."""
        return [runnable.name for runnable in self._runnables]

    async def start(self) -> None:
        self._begun = True
        for runnable in self._runnables:
            try:
                await runnable.start()
            except BaseException:
                log.error("runnable_start_failed", runnable=runnable.name)
                await self.stop()
                raise
            self._started.append(runnable)

    async def stop(self) -> None:
        """Stop what started, last first; safe to call twice."""
        while self._started:
            runnable = self._started.pop()
            try:
                await runnable.stop()
            except Exception:
                log.exception("runnable_stop_failed", runnable=runnable.name)

    async def leads(self) -> bool:
        """Whether this replica leads now; the runnables that need the lead ask this."""
        leading = await self._try_lead()
        if leading != self._leading:
            if leading or self._leading:  # not a replica that has never led: nothing changed
                log.info(
                    "leadership_acquired" if leading else "leadership_lost",
                    runnables=[each.name for each in self._runnables if each.needs_leader],
                )
            self._leading = leading
        return leading


async def wait_for_shutdown_signal() -> None:
    """Return at SIGINT or SIGTERM: how a server process is told to stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def cancel_and_wait(loop: asyncio.Task[None] | None) -> None:
    """End a background loop (None: never started) and wait until it has ended, so that
    what a stop does next (a last flush) never races the loop's last iteration. How the
    loop ended is not raised: the loops stopped this way log their own failures, and the
    stop must still do what comes next."""
    if loop is not None:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
