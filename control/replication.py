"""Several replicas, one fleet: keep this replica's shared state in step with the database.

Each replica serves its own agents from memory. What every replica must agree on
(holds and the epoch, resume requests, revocations, runbook runs, acknowledged
violations, the labels operators decided) lives in the database; a change committed
anywhere is announced (PostgreSQL ``NOTIFY``) and every replica re-reads it (of the
labels, only those changed since its last read). The re-read is level-triggered and
also runs on a timer, so a missed notification costs at most one interval, never a
pause.

The agents other replicas serve are read back every ``agents_resync_seconds``: the rows
written since the last read, so that every replica answers for the whole fleet.

Both reads *resync*: read from the store now, then *adopt* (take in what another
replica committed; each part of the plane, the governance and the runner adopt their
own share). See ``control.plane`` for the two verbs.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import KW_ONLY
from dataclasses import dataclass
from dataclasses import field

import structlog

from control.freshness import DEFAULT_RESYNC_SECONDS
from control.governance import Governance
from control.plane import ControlPlane
from control.runbooks import RunbookRunner
from control.store import Store

log = structlog.get_logger("killswitch.replication")

# A verified stop on one replica shows on the others within this (plus one flush).
DEFAULT_AGENTS_RESYNC_SECONDS = 1.0


@dataclass(eq=False)
class Replication:
    """Keeps ``plane``, ``governance`` and ``runner`` in step with what other replicas
    commit to ``store``: the shared state every ``resync_seconds`` and on each
    notification, the agents other replicas serve every ``agents_resync_seconds``."""

    store: Store
    plane: ControlPlane
    governance: Governance
    runner: RunbookRunner
    _: KW_ONLY
    resync_seconds: float = DEFAULT_RESYNC_SECONDS
    agents_resync_seconds: float = DEFAULT_AGENTS_RESYNC_SECONDS
    # Where the last read of other replicas' agent rows ended.
    _cursor: str = field(default="", init=False, repr=False)
    # The newest label version adopted: the first read takes every decided label.
    _labels_version: int = field(default=0, init=False, repr=False)
    _poked: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, init=False, repr=False)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.store.watch(self._poked.set), name="store-watch"),
            asyncio.create_task(self._resync_loop(), name="replica-resync"),
            asyncio.create_task(self._resync_agents_loop(), name="replica-agents-resync"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _resync_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(
                    self.resync_seconds
                ):  # cancellable, unlike 3.11's wait_for
                    await self._poked.wait()
            self._poked.clear()
            try:
                await self.resync()
            except Exception as exc:
                # The store probe reports a lost database; here, just try again later.
                log.warning("resync_failed", error=repr(exc))

    async def resync(self) -> None:
        """Read what every replica shares (holds and epoch, requests, revocations, runs,
        violations, decided labels) and adopt it."""
        plane = self.plane
        read_started = plane.view.read_starting()
        shared = await self.store.load_shared()
        # Read after the holds, so it has every relabel committed before them: a pause
        # by selector is never judged against labels older than the pause. A failed
        # read leaves the view unadopted, so a replica stuck on old labels stops leasing.
        decided = await self.store.labels_decided_since(self._labels_version)
        plane.cache.adopt_labels(decided)
        self._labels_version = decided[-1].version if decided else self._labels_version
        await plane.holds.adopt_holds(shared.epoch, shared.holds, read_started)
        self.governance.adopt(shared.resume_requests, shared.revoked)
        plane.reports.adopt_violations(shared.violation_acks, shared.violations)
        self.runner.adopt(shared.runs)

    async def _resync_agents_loop(self) -> None:
        while True:
            try:
                await self.resync_agents()
            except Exception as exc:
                log.warning("mirror_failed", error=repr(exc))
            await asyncio.sleep(self.agents_resync_seconds)

    async def resync_agents(self) -> None:
        """Read what other replicas wrote about their agents since the last read, and
        adopt it."""
        changes = await self.store.agents_written_since(self._cursor, self.plane.replica_id)
        self.plane.membership.adopt_agents(changes)
        self._cursor = changes.cursor
