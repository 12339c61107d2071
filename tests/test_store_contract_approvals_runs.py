"""The ``Store`` contract, against both stores: resume requests and their approvals, and
runbook runs, whose steps are compare-and-set on the stored version.
"""

from __future__ import annotations

import dataclasses

import pytest

from control.domain import HoldKind
from control.domain.approvals import ResumeState
from control.domain.release import FULL_SHARE
from control.domain.rollout import Runbook
from control.domain.rollout import Wave
from control.domain.rollout import new_run
from control.domain.rollout import start_wave
from control.errors import Conflict
from control.errors import NotFound
from control.store import RunChange
from control.store import Store
from tests.store_contract import FIRST_CUT
from tests.store_contract import LAST_CUT
from tests.store_contract import Backend
from tests.store_contract import audit_actions
from tests.store_contract import decided
from tests.store_contract import draft
from tests.store_contract import pending_request
from tests.store_contract import record
from tests.store_contract import resume_request
from tests.store_contract import run_with_store
from tests.store_contract import staged_run
from tests.store_contract import version


def test_execute_resume_lifts_and_records_the_request_in_one_step(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.create_hold(draft("h1"), record("pause"))
        request = resume_request("h1")
        await store.save_resume_request(request, record("resume_requested"))
        hold = await store.execute_resume(request, 2000.0, record("resume", "approver-1"))
        assert (hold.id, hold.lifted_at, hold.lifted_by, hold.lifted_epoch) == (
            "h1",
            2000.0,
            "approver-1",
            2,
        )
        (stored,) = (await store.load()).shared.resume_requests
        assert stored == dataclasses.replace(request, state=ResumeState.EXECUTED, lifted_epoch=2)

        before = await store.read_audit(0, 100)
        with pytest.raises(Conflict, match="already lifted"):
            await store.execute_resume(request, 2001.0, record("resume"))
        other = dataclasses.replace(request, id="resume-2", hold_id="nope")
        with pytest.raises(NotFound, match="unknown hold 'nope'"):
            await store.execute_resume(other, 2001.0, record("resume"))
        assert await store.read_audit(0, 100) == before
        assert [r.id for r in (await store.load()).shared.resume_requests] == ["resume-1"]

    run_with_store(backend, body)


def test_approvals_round_trip(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.save_resume_request(resume_request("h1"), record("resume_requested"))
        (loaded,) = (await store.load()).shared.resume_requests
        assert loaded == resume_request("h1")

    run_with_store(backend, body)


def test_two_deciders_at_once_cannot_both_win(backend: Backend) -> None:
    """A request write is a compare-and-set on its revision and state."""
    pending = pending_request()
    edited = dataclasses.replace(pending, revision=2, reason="all clear, really")

    async def body(store: Store) -> None:
        await store.create_hold(draft("h1"), record("pause"))
        await store.save_resume_request(pending, record("resume.request"))
        # Both approvers saw revision 1, pending; the first decision wins.
        await store.save_resume_request(
            decided(pending, ResumeState.APPROVED, "approver-1"), record("resume.approve")
        )
        before = await store.load(), await store.read_audit(0, 100)
        with pytest.raises(Conflict, match=r"changed meanwhile \(now revision 1, approved\)"):
            await store.save_resume_request(
                decided(pending, ResumeState.DENIED, "approver-2"), record("resume.deny")
            )
        # Nor can the second approve it again.
        with pytest.raises(Conflict, match=r"changed meanwhile \(now revision 1, approved\)"):
            await store.save_resume_request(
                decided(pending, ResumeState.APPROVED, "approver-2"), record("resume.approve")
            )
        assert (await store.load(), await store.read_audit(0, 100)) == before

        # The requester edits (approvals dropped); a decision on revision 1 is now stale,
        # and so is executing it.
        await store.save_resume_request(edited, record("resume.edit"))
        stale = decided(pending, ResumeState.APPROVED, "approver-2")
        with pytest.raises(Conflict, match=r"changed meanwhile \(now revision 2, pending\)"):
            await store.save_resume_request(stale, record("resume.approve"))
        with pytest.raises(Conflict, match="changed since it was approved"):
            await store.execute_resume(stale, 2000.0, record("resume"))
        assert (await store.load()).shared.holds[0].active, "the hold stays"

        # Revision 2, approved and executed: then nothing more is written over it, and
        # no run can consume it.
        approved = decided(edited, ResumeState.APPROVED, "approver-2")
        await store.save_resume_request(approved, record("resume.approve"))
        await store.execute_resume(approved, 2000.0, record("resume"))
        with pytest.raises(Conflict, match="resume-1' is executed"):
            await store.save_resume_request(
                dataclasses.replace(approved, revision=3), record("resume.edit")
            )
        consume = RunChange(version(staged_run(), 1), "ic-1", 2001.0, executed_request=approved)
        with pytest.raises(Conflict, match="resume-1' is executed"):
            await store.commit_run(consume, [record("runbook.start")])
        state = await store.load()
        ((stored,), runs) = state.shared.resume_requests, state.shared.runs
        assert (stored.state, stored.revision, runs) == (ResumeState.EXECUTED, 2, [])

    run_with_store(backend, body)


def test_a_run_step_commits_its_hold_changes_under_one_epoch(backend: Backend) -> None:
    """Take-over: lift the approved hold, create the rollout hold, consume the request."""
    book = Runbook("staged", "seed", (Wave("1%", share=100), Wave("all", share=FULL_SHARE)))
    run = new_run(
        book, file_name="f.yaml", source="name: staged", started_by="ic-1", now=1.0, epoch=1
    )
    rollout = dataclasses.replace(
        draft("h-rollout"), kind=HoldKind.ROLLOUT, release=book.release_through(0, FIRST_CUT)
    )

    async def body(store: Store) -> None:
        await store.create_hold(draft("h1"), record("pause"))
        request = resume_request("h1")
        started = start_wave(run, 0, now=2.0, cutoff=FIRST_CUT)
        change = RunChange(
            version(started, 1),
            "automation-1",
            2.0,
            create=rollout,
            lift_hold_id="h1",
            executed_request=request,
        )
        commit = await store.commit_run(change, [record("runbook.start")])
        assert commit.epoch == 2
        assert [(h.id, h.active) for h in commit.holds] == [("h1", False), ("h-rollout", True)]
        # A refused step changes nothing: the hold it would lift is gone.
        before = await store.read_audit(0, 100)
        again = dataclasses.replace(change, run=version(started, 2))
        with pytest.raises(Conflict, match="already lifted"):
            await store.commit_run(again, [record("runbook.start")])
        assert await store.read_audit(0, 100) == before
        # Widening the release is a step of its own, with its own epoch.
        widened = await store.commit_run(
            RunChange(
                version(started, 2),
                "control-plane",
                3.0,
                release=("h-rollout", book.release_through(1, LAST_CUT)),
            ),
            [],
        )
        assert widened.epoch == 3
        assert widened.holds[0].release == book.release_through(1, LAST_CUT)
        # A step that touches no hold allocates no epoch.
        last = version(started, 3)
        assert (await store.commit_run(RunChange(last, "control-plane", 4.0), [])).epoch == 0
        state = await store.load()
        assert (state.shared.epoch, state.shared.runs) == (3, [last])
        holds = {h.id: h for h in state.shared.holds}
        assert holds["h-rollout"].release == book.release_through(1, LAST_CUT)
        assert holds["h1"].lifted_by == "automation-1"
        (stored_request,) = state.shared.resume_requests
        assert (stored_request.state, stored_request.lifted_epoch) == (ResumeState.EXECUTED, 2)
        assert await audit_actions(store) == ["pause", "runbook.start"]

    run_with_store(backend, body)


def test_a_run_step_based_on_a_stale_version_is_refused(backend: Backend) -> None:
    """Two writers (replicas, or a tick and an abort) never both move one run."""
    run = staged_run()

    async def body(store: Store) -> None:
        await store.create_hold(draft("h1"), record("pause"))
        await store.commit_run(RunChange(version(run, 1), "ic-1", 1.0), [record("runbook.start")])
        moved = version(start_wave(run, 0, now=2.0, cutoff=FIRST_CUT), 2)
        await store.commit_run(RunChange(moved, "control-plane", 2.0), [record("wave")])
        state, audit = await store.load(), await store.read_audit(0, 100)

        stale = [
            # Based on version 1, which is no longer the stored one.
            RunChange(version(run, 2), "ic-2", 3.0, lift_hold_id="h1"),
            # A first step of a run that is already stored.
            RunChange(version(run, 1), "ic-2", 3.0, create=draft("h2")),
            # A step from the future.
            RunChange(version(run, 4), "ic-2", 3.0),
            RunChange(version(run, 0), "ic-2", 3.0),
        ]
        for change in stale:
            with pytest.raises(Conflict, match=r"run run-1 was changed by another writer"):
                await store.commit_run(change, [record("runbook.abort", "ic-2")])
        assert await store.load() == state, "no hold, epoch or run changed"
        assert await store.read_audit(0, 100) == audit, "and no audit entry"
        assert [r.version for r in state.shared.runs] == [2]

    run_with_store(backend, body)


def test_a_run_stored_without_a_version_is_version_0(backend: Backend) -> None:
    """Runs stored before versions existed: their next step is version 1."""
    run = staged_run()

    async def body(store: Store) -> None:
        await store.commit_run(RunChange(version(run, 1), "ic-1", 1.0), [])
        backend.strip_run_versions()
        (old,) = (await store.load()).shared.runs
        assert old == version(run, 0)
        await store.commit_run(RunChange(version(run, 1), "ic-1", 2.0), [])
        assert [r.version for r in (await store.load_shared()).runs] == [1]

    run_with_store(backend, body)
