"""What the plane tests run a ``ControlPlane`` with: a recording store, a session that
stands in for an agent's stream, the people and reports they use, and the started plane."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from control.domain import CaptureReport
from control.domain.audit import AuditRecord
from control.domain.identity import Principal
from control.domain.identity import Role
from control.errors import StoreError
from control.plane import ControlPlane
from control.store import DecidedLabels
from control.store import Store
from control.store import StoredAgent
from control.store.sqlite import SqliteStore
from tests.fake_clock import FakeClock

IC = Principal("ic-1", Role.INCIDENT_COMMANDER, serial="01")
SRE = Principal("sre-1", Role.SRE, serial="02")

STOPPED = {"keyboard": False, "mouse": False, "screen": False}
REPORT = CaptureReport(events_total=10)


class RecordingStore(SqliteStore):
    """The real SQLite store, counting batch writes and able to fail them."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.agents: dict[str, StoredAgent] = {}
        self.batches: list[int] = []
        self.fail_writes = False

    async def save_agents(
        self,
        agents: Sequence[StoredAgent],
        audit: Sequence[AuditRecord] = (),
        labels: Sequence[DecidedLabels] = (),
    ) -> None:
        if self.fail_writes:
            raise StoreError("disk full")
        await super().save_agents(agents, audit, labels)
        if agents:
            self.batches.append(len(agents))
        self.agents.update({a.agent_id: a for a in agents})


class Session:
    """A stream as the plane sees it. Bound to a plane, it sends (records) each directive
    it is told about, as ``AgentSession`` does: acks count only for what was sent."""

    def __init__(self, plane: ControlPlane | None = None, agent_id: str = "") -> None:
        self.notified = 0
        self.closed = ""
        self._plane, self._agent_id = plane, agent_id

    def notify(self) -> None:
        self.notified += 1
        if self._plane is not None:
            self._plane.directive_sent(
                self._agent_id, self._plane.directive_for(self._agent_id).epoch
            )

    def close(self, reason: str) -> None:
        self.closed = reason


def connect_agent(plane: ControlPlane, agent_id: str) -> Session:
    """``agent_id`` connects to ``plane`` (no labels) over a Session bound to it."""
    session = Session(plane, agent_id)
    plane.connect(agent_id, {}, session)
    return session


async def started(
    store: Store, clock: Callable[[], float] | None = None, **options: Any
) -> ControlPlane:
    """A plane on ``store``, started, that writes only when the test flushes or stops it
    (on a ``FakeClock`` unless given one)."""
    plane = ControlPlane(store, clock=clock or FakeClock(), flush_interval=3600, **options)
    await plane.start()
    return plane


def run_plane(
    tmp_path: Path,
    body: Callable[[ControlPlane, RecordingStore, FakeClock], Awaitable[None]],
    **options: Any,
) -> None:
    """``body`` against a started plane on a fresh ``RecordingStore`` in ``tmp_path``, with
    a clock it moves; the plane is stopped afterwards."""

    async def main() -> None:
        store, clock = await RecordingStore.open(tmp_path), FakeClock()
        plane = await started(store, clock, **options)
        try:
            await body(plane, store, clock)
        finally:
            await plane.stop()

    asyncio.run(main())


@asynccontextmanager
async def two_planes(
    store_a: Store, store_b: Store, clock: Callable[[], float] | None = None, **options: Any
) -> AsyncIterator[tuple[ControlPlane, ControlPlane]]:
    """Replicas a and b, each started on its own store of one database (and on its own
    ``FakeClock`` unless given one); stopped, and their stores closed, afterwards."""
    plane_a, plane_b = (
        ControlPlane(
            store, clock=clock or FakeClock(), flush_interval=3600, replica_id=name, **options
        )
        for store, name in ((store_a, "a"), (store_b, "b"))
    )
    try:
        await plane_a.start()
        await plane_b.start()
        yield plane_a, plane_b
    finally:
        for plane, store in ((plane_a, store_a), (plane_b, store_b)):
            await plane.stop()
            await store.close()
