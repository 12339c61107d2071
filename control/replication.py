"""Several replicas, one fleet: keep this replica's shared state in step with the database.

Each replica serves its own agents from memory. What every replica must agree on
(holds and the epoch, resume requests, revocations, runbook runs) lives in the
database; a change committed anywhere is announced (PostgreSQL ``NOTIFY``) and every
replica re-reads it. The re-read is level-triggered and also runs on a timer, so a
missed notification costs at most one interval, never a pause.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from control.governance import Governance
from control.plane import ControlPlane
from control.runbooks import RunbookRunner
from control.store import Store

log = structlog.get_logger("killswitch.replication")

DEFAULT_RESYNC_SECONDS = 5.0


class Replication:
    def __init__(
        self,
        store: Store,
        plane: ControlPlane,
        governance: Governance,
        runner: RunbookRunner,
        *,
        resync_seconds: float = DEFAULT_RESYNC_SECONDS,
    ) -> None:
        self._store = store
        self._plane = plane
        self._governance = governance
        self._runner = runner
        self._resync_seconds = resync_seconds
        self._poked = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._store.watch(self._poked.set), name="store-watch"),
            asyncio.create_task(self._loop(), name="replica-resync"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), self._resync_seconds)
            self._poked.clear()
            try:
                await self.resync()
            except Exception as exc:
                # The store probe reports a lost database; here, just try again later.
                log.warning("resync_failed", error=repr(exc))

    async def resync(self) -> None:
        shared = await self._store.load_shared()
        await self._plane.adopt(shared.epoch, shared.holds)
        self._governance.adopt(shared.resume_requests, shared.revoked_serials)
        self._runner.adopt(shared.runs)
