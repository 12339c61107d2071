"""History compaction, against both stores (the ``Store`` contract of ``archive_history``).

What is archived leaves ``load`` and ``load_shared``; what is still in force (an active
hold, an open request, an active run) stays however old it is; nothing else changes:
not the epoch, not the audit chain, not what a write over an archived row is refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from pathlib import Path

import pytest

from control.domain.approvals import ResumeState
from control.domain.rollout import Run
from control.domain.rollout import RunState
from control.domain.rollout import end_run
from control.errors import Conflict
from control.store import ArchivedCounts
from control.store import RunChange
from control.store import SharedState
from control.store import Store
from control.store import codec
from control.store.sqlite import DB_FILENAME
from control.store.sqlite import MIGRATIONS
from tests.store_contract import Backend
from tests.store_contract import SqliteBackend
from tests.store_contract import audit_actions
from tests.store_contract import decided
from tests.store_contract import draft
from tests.store_contract import pending_request
from tests.store_contract import record
from tests.store_contract import run_with_store
from tests.store_contract import staged_run
from tests.store_contract import version

BEFORE = 10_000.0
NOW = 30_000.0


def ended(run_id: str, at: float, state: RunState = RunState.COMPLETED) -> Run:
    return version(end_run(staged_run(run_id), state, now=at, repaused=False), 1)


async def build_history(store: Store) -> None:
    """Old and recent, finished and still in force, of each kind."""
    for hold_id in ("h-old-lifted", "h-new-lifted", "h-old-active"):
        await store.create_hold(draft(hold_id), record("pause"))
    await store.lift_hold("h-old-lifted", "ic-1", 2000.0, record("lift"))
    await store.lift_hold("h-new-lifted", "ic-1", 20_000.0, record("lift"))
    requests = [
        # Decided long ago: archived.
        decided(pending_request("h-old-lifted"), ResumeState.DENIED, "approver-1"),
        # Still pending, created long ago, expired long ago: archived.
        dataclasses.replace(pending_request("h-old-active"), expires_at=4600.0),
        # Created long ago but open until after the cutoff: stays.
        dataclasses.replace(pending_request("h-old-active"), expires_at=50_000.0),
        # Decided recently: stays.
        dataclasses.replace(
            decided(pending_request("h-new-lifted"), ResumeState.DENIED, "approver-1"),
            decided_at=15_000.0,
        ),
    ]
    for number, request in enumerate(requests, start=1):
        saved = dataclasses.replace(request, id=f"resume-{number}")
        await store.save_resume_request(saved, record("resume.request"))
    runs = [
        ended("run-old-done", 2000.0),
        ended("run-old-aborted", 3000.0, RunState.ABORTED),
        ended("run-new-halted", 20_000.0, RunState.HALTED),
        version(staged_run("run-old-active"), 1),  # started at 1.0, still running
    ]
    for run in runs:
        await store.commit_run(RunChange(run, "ic-1", 1.0), [record("runbook.step")])


def hot_ids(shared: SharedState) -> tuple[list[str], list[str], list[str]]:
    return (
        sorted(h.id for h in shared.holds),
        sorted(r.id for r in shared.resume_requests),
        sorted(r.id for r in shared.runs),
    )


HOT_AFTER = (
    ["h-new-lifted", "h-old-active"],
    ["resume-3", "resume-4"],
    ["run-new-halted", "run-old-active"],
)


def test_compaction_archives_exactly_the_old_finished_rows(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await build_history(store)
        before = await store.load()
        actions = await audit_actions(store)

        assert await store.archive_history(BEFORE, NOW, 1000) == ArchivedCounts(1, 2, 2)
        after = await store.load()
        assert hot_ids(after.shared) == HOT_AFTER
        assert hot_ids(await store.load_shared()) == HOT_AFTER
        # Nothing else moved: the epoch, the rows kept, the agents, the audit chain.
        assert after.shared.epoch == before.shared.epoch == 5
        kept = {h.id: h for h in before.shared.holds}
        assert after.shared.holds == [kept["h-new-lifted"], kept["h-old-active"]]
        assert after.agents == before.agents
        assert await audit_actions(store) == actions  # and it verifies
        # Done once: a second pass (another replica's) finds nothing.
        assert await store.archive_history(BEFORE, NOW, 1000) == ArchivedCounts()

    run_with_store(backend, body)
    run_with_store(backend, reopened_still_archived)


async def reopened_still_archived(store: Store) -> None:
    assert hot_ids((await store.load()).shared) == HOT_AFTER


def test_archived_rows_are_found_by_id_and_stay_refused(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await build_history(store)
        await store.archive_history(BEFORE, NOW, 1000)

        hold = await store.archived_hold("h-old-lifted")
        assert hold is not None and (hold.lifted_at, hold.lifted_by) == (2000.0, "ic-1")
        request = await store.archived_request("resume-1")
        assert request is not None and request.state is ResumeState.DENIED
        run = await store.archived_run("run-old-aborted")
        assert run is not None and (run.state, run.ended_at) == (RunState.ABORTED, 3000.0)
        # Hot, unknown: not archived.
        assert await store.archived_hold("h-old-active") is None
        assert await store.archived_request("resume-3") is None
        assert await store.archived_run("run-old-active") is None
        assert await store.archived_hold("nope") is None

        # The id is still taken and the row still final: nothing writes over it.
        with pytest.raises(Conflict, match="already lifted"):
            await store.lift_hold("h-old-lifted", "ic-2", NOW, record("lift"))
        with pytest.raises(Conflict, match="resume-1' is denied"):
            await store.save_resume_request(
                dataclasses.replace(request, revision=2), record("resume.edit")
            )
        with pytest.raises(Conflict, match="already exists"):
            await store.create_hold(draft("h-old-lifted"), record("pause"))
        assert hot_ids(await store.load_shared()) == HOT_AFTER

    run_with_store(backend, body)


def test_compaction_goes_a_batch_per_call(backend: Backend) -> None:
    async def body(store: Store) -> None:
        for number in range(5):
            await store.create_hold(draft(f"h{number}"), record("pause"))
            await store.lift_hold(f"h{number}", "ic-1", 2000.0 + number, record("lift"))
        counts = [(await store.archive_history(BEFORE, NOW, 2)).holds for _ in range(4)]
        assert counts == [2, 2, 1, 0]
        assert (await store.load_shared()).holds == []

    run_with_store(backend, body)


def test_two_compactors_at_once_archive_each_row_once(backend: Backend) -> None:
    """Every replica compacts: two at once must neither fail nor count a row twice."""

    async def body(store: Store) -> None:
        for number in range(40):
            await store.create_hold(draft(f"h{number}"), record("pause"))
            await store.lift_hold(f"h{number}", "ic-1", 2000.0, record("lift"))
        other = await backend.open()
        try:

            async def drain(each: Store) -> int:
                total = 0
                while moved := (await each.archive_history(BEFORE, NOW, 3)).holds:
                    total += moved
                return total

            totals = await asyncio.gather(drain(store), drain(other))
        finally:
            await other.close()
        assert sum(totals) == 40
        assert (await store.load_shared()).holds == []

    run_with_store(backend, body)


def test_runs_ended_before_the_migration_are_archived_too(tmp_path: Path) -> None:
    """The migration fills the new ``ended_at`` column from each stored run."""
    conn = sqlite3.connect(tmp_path / DB_FILENAME)
    for number, script in enumerate(MIGRATIONS[:5], start=1):
        conn.executescript(f"{script}; PRAGMA user_version={number};")
    old = ended("run-old", 2000.0)
    conn.execute(
        "INSERT INTO runbook_runs (id, state, started_at, run) VALUES (?, ?, ?, ?)",
        codec.run_to_row(old)[:4],
    )
    conn.commit()
    conn.close()

    async def body(store: Store) -> None:
        assert await store.archive_history(BEFORE, NOW, 1000) == ArchivedCounts(runs=1)
        assert await store.archived_run("run-old") == old

    run_with_store(SqliteBackend(tmp_path), body)
