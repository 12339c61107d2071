"""History compaction seen from the services: what is archived leaves memory, and naming
it by id says, in one line, when it finished and that it was archived."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from control.domain import Mode
from control.domain import Scope
from control.domain.identity import Principal
from control.domain.identity import Role
from control.errors import UnknownItem
from control.governance import Governance
from control.history import HistoryCompactor
from control.plane import ControlPlane
from control.runbooks import RunbookRunner
from control.store import ArchivedCounts
from control.store import RunChange
from control.store import Store
from control.store.sqlite import SqliteStore
from tests.plane_support import Session
from tests.test_store_history import ended

IC = Principal("ic-1", Role.INCIDENT_COMMANDER, serial="01")
APPROVER = Principal("approver-1", Role.APPROVER, serial="02")
DAY = 24 * 3600.0
START = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC


async def resync(store: Store, plane: ControlPlane) -> None:
    """What ``Replication.resync`` does with the holds."""
    await plane.resync_holds()


async def explained(governance: Governance, error: pytest.ExceptionInfo[UnknownItem]) -> str:
    message = str(await governance.explain_unknown(error.value))
    assert "\n" not in message
    return message


def test_archived_history_leaves_memory_and_is_named_in_one_line(tmp_path: Path) -> None:
    async def scenario() -> None:
        now = [START]
        store = await SqliteStore.open(tmp_path)
        plane = ControlPlane(store, clock=lambda: now[0], flush_interval=3600)
        governance = Governance(plane, store, clock=lambda: now[0], authority=None)
        runner = RunbookRunner(plane, governance, clock=lambda: now[0])
        state = await plane.start()
        await governance.start(state)
        try:
            old, _ = await plane.create_hold(Scope.fleet(), "leak", "INC-1", IC)
            kept, _ = await plane.create_hold(Scope.fleet(), "other leak", "INC-2", IC)
            request = await governance.request_resume(IC, old.id, "all clear", "INC-1")
            await governance.approve(APPROVER, request.id, request.revision, "ok")  # lifts
            run = ended("run-1", START + 60)
            await store.commit_run(RunChange(run, "ic-1", START), [])
            runner.adopt((await store.load_shared()).runs)

            now[0] += 8 * DAY
            compactor = HistoryCompactor(
                store, [governance, runner], clock=lambda: now[0], retention=7 * DAY
            )
            assert await compactor.compact() == ArchivedCounts(1, 1, 1)
            assert governance.requests(include_closed=True) == []
            assert runner.runs() == []
            await resync(store, plane)
            assert plane.active_holds() == [kept]

            with pytest.raises(UnknownItem) as hold_error:
                await governance.request_resume(IC, old.id, "again", "INC-1")
            assert await explained(governance, hold_error) == (
                f"hold {old.id} was lifted on 2027-01-15 08:00:00 UTC by approver-1"
                " (epoch 3) and archived; the audit log has its history (`killswitch audit`)"
            )
            with pytest.raises(UnknownItem) as request_error:
                await governance.approve(APPROVER, request.id, 0, "")
            assert (await explained(governance, request_error)).startswith(
                f"resume request {request.id} for hold {old.id} was executed on"
                " 2027-01-15 08:00:00 UTC and archived;"
            )
            with pytest.raises(UnknownItem) as run_error:
                runner.run("run-1")
            assert (await explained(governance, run_error)).startswith(
                "run run-1 (staged) ended completed on 2027-01-15 08:01:00 UTC and archived;"
            )
            # Never heard of: the plain answer, as before.
            with pytest.raises(UnknownItem) as unknown:
                plane.hold("hold-nope")
            assert await explained(governance, unknown) == "unknown hold 'hold-nope'"
        finally:
            await plane.stop()
            await store.close()

    asyncio.run(scenario())


def test_a_lift_missed_by_a_replica_is_not_kept_once_archived(tmp_path: Path) -> None:
    """Replica B still believes in a hold A lifted, and it is archived before B's next
    resync: B's snapshot no longer shows it at all, and B must let its agents go."""

    async def scenario() -> None:
        store_a, store_b = await SqliteStore.open(tmp_path), await SqliteStore.open(tmp_path)
        plane_a = ControlPlane(store_a, clock=lambda: START, flush_interval=3600)
        plane_b = ControlPlane(store_b, clock=lambda: START, flush_interval=3600)
        try:
            await plane_a.start()
            hold, _ = await plane_a.create_hold(Scope.fleet(), "leak", "INC-1", IC)
            await plane_b.start()
            plane_b.connect("laptop-1", {}, Session())
            assert plane_b.directive_for("laptop-1").desired.mode is Mode.PAUSED

            await plane_a.lift_hold(hold.id, IC)
            await store_a.archive_history(START + 1, START + 1, 1000)
            await resync(store_b, plane_b)

            assert plane_b.active_holds() == []
            assert plane_b.directive_for("laptop-1").desired.mode is Mode.ALLOWED
            with pytest.raises(UnknownItem):
                plane_b.hold(hold.id)
        finally:
            for plane in (plane_a, plane_b):
                await plane.stop()
            await store_a.close()
            await store_b.close()

    asyncio.run(scenario())
