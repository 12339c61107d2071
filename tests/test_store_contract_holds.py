"""The ``Store`` contract, against both stores: holds and epochs, the shared state a
replica loads, the lead, and the schema (``tests.store_contract`` says how each store's
database is set up).
"""

from __future__ import annotations

import dataclasses

import pytest

from control.domain import HoldDraft
from control.domain import HoldKind
from control.domain import Scope
from control.errors import Conflict
from control.errors import NotFound
from control.errors import StoreError
from control.store import RunChange
from control.store import Store
from control.store.postgres import MIGRATIONS as PG_MIGRATIONS
from control.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from tests.store_contract import Backend
from tests.store_contract import PostgresBackend
from tests.store_contract import agent
from tests.store_contract import audit_actions
from tests.store_contract import certificate
from tests.store_contract import draft
from tests.store_contract import nothing
from tests.store_contract import record
from tests.store_contract import resume_request
from tests.store_contract import run_with_store
from tests.store_contract import staged_run
from tests.store_contract import version


def test_holds_epochs_and_agents_survive_reopen(backend: Backend) -> None:
    saved = agent("a")

    async def write(store: Store) -> None:
        h1 = await store.create_hold(draft("h1", Scope.selector({"region": "eu"})), record("pause"))
        h2 = await store.create_hold(draft("h2", Scope.agents(["a", "b"])), record("pause"))
        lifted = await store.lift_hold("h1", "ic-2", 2000.0, record("resume", "ic-2"))
        assert (h1.created_epoch, h2.created_epoch, lifted.lifted_epoch) == (1, 2, 3)
        await store.save_agents([saved])

    async def reopened(store: Store) -> None:
        state = await store.load()
        assert state.shared.epoch == 3
        assert [(h.id, h.active) for h in state.shared.holds] == [("h1", False), ("h2", True)]
        assert state.shared.holds[0].scope == Scope.selector({"region": "eu"})
        assert state.shared.holds[0].lifted_by == "ic-2"
        assert state.shared.holds[1].scope.agent_ids == frozenset({"a", "b"})
        (loaded,) = state.agents
        # Exactly as written, the stream as its replica saw it included (the plane
        # decides what a row means to it). Evidence survives: a violation never clears
        # by itself.
        assert loaded == saved
        # Epochs keep going up across restarts, and so does the audit chain.
        h3 = await store.create_hold(draft("h3"), record("pause"))
        assert h3.created_epoch == 4
        assert await audit_actions(store) == ["pause", "pause", "resume", "pause"]

    run_with_store(backend, write)
    run_with_store(backend, reopened)


def test_refused_lift_changes_nothing_and_appends_no_audit_entry(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.create_hold(draft("h1"), record("pause"))
        await store.lift_hold("h1", "ic-1", 2000.0, record("resume"))
        before = await store.read_audit(0, 100)
        with pytest.raises(NotFound, match="unknown hold 'nope'"):
            await store.lift_hold("nope", "ic-1", 2001.0, record("resume"))
        with pytest.raises(Conflict, match="'h1' was already lifted at epoch 2"):
            await store.lift_hold("h1", "ic-1", 2001.0, record("resume"))
        with pytest.raises(Conflict, match="hold 'h1' already exists"):
            await store.create_hold(draft("h1"), record("pause"))
        assert await store.read_audit(0, 100) == before
        assert (await store.load()).shared.epoch == 2, "refused writes allocate no epoch"

    run_with_store(backend, body)


def test_a_failed_audit_append_rolls_back_the_state_change(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.create_hold(draft("h1"), record("pause"))
        # The next audit insert fails, after the hold change ran.
        backend.break_audit_inserts("disk on fire")
        with pytest.raises(StoreError, match="disk on fire"):
            await store.create_hold(draft("h2"), record("pause"))
        with pytest.raises(StoreError, match="disk on fire"):
            await store.lift_hold("h1", "ic-1", 2000.0, record("resume"))
        state = await store.load()
        assert [(h.id, h.active) for h in state.shared.holds] == [("h1", True)]
        assert state.shared.epoch == 1
        assert (await store.read_audit(0, 100))[1].seq == 1

    run_with_store(backend, body)


def test_a_lifted_hold_is_reactivated_in_place(backend: Backend) -> None:
    """A laptop's opt-out: each cycle re-activates one row, never adds one, archived or not."""
    opt_out = dataclasses.replace(
        draft("opt-out-laptop-1", Scope.agents(["laptop-1"])), kind=HoldKind.OPT_OUT
    )

    async def body(store: Store) -> None:
        first = await store.reactivate_hold(opt_out, record("hold.create"))
        with pytest.raises(Conflict, match="hold 'opt-out-laptop-1' is already active"):
            await store.reactivate_hold(opt_out, record("hold.create"))
        await store.lift_hold(opt_out.id, "employee-1", 1100.0, record("hold.lift"))
        again = await store.reactivate_hold(
            dataclasses.replace(opt_out, reason="again", created_at=1200.0), record("hold.create")
        )
        assert (again.id, again.reason, again.active) == (opt_out.id, "again", True)
        assert again.created_epoch > first.created_epoch
        await store.lift_hold(opt_out.id, "employee-1", 1300.0, record("hold.lift"))
        assert (await store.archive_history(2000.0, 2000.0, 10)).holds == 1
        assert (await store.load()).shared.holds == []
        third = await store.reactivate_hold(opt_out, record("hold.create"))
        assert (await store.load()).shared.holds == [third]
        assert await store.archived_hold(opt_out.id) is None
        assert backend.sql("SELECT count(*) FROM holds") == [(1,)]
        assert await audit_actions(store) == ["hold.create", "hold.lift"] * 2 + ["hold.create"]

    run_with_store(backend, body)


def test_load_shared_is_load_without_the_agents(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.save_agents([agent("a")])
        await store.create_hold(draft("h1"), record("pause"))
        await store.create_hold(draft("h2"), record("pause"))
        await store.lift_hold("h2", "ic-1", 2000.0, record("resume"))
        await store.save_resume_request(resume_request("h1"), record("resume_requested"))
        await store.record_certificate(certificate("01", "sre-1"), None)
        await store.record_certificate(certificate("02", "sre-2"), None)
        await store.revoke_certificates("02", 1500.0, record("cert_revoked"))
        await store.commit_run(RunChange(version(staged_run(), 1), "ic-1", 1.0), [])

        loaded, shared = await store.load(), await store.load_shared()
        assert shared == loaded.shared
        assert (shared.epoch, [h.id for h in shared.holds]) == (3, ["h1", "h2"])
        assert (len(shared.resume_requests), shared.revoked) == (1, {"02": "sre-2"})
        assert [r.id for r in shared.runs] == ["run-1"]
        assert await store.load_agent("a") == loaded.agents[0]
        assert await store.load_agent("nobody") is None

    run_with_store(backend, body)


def test_one_store_alone_leads(backend: Backend) -> None:
    async def body(store: Store) -> None:
        assert await store.try_lead()
        assert await store.try_lead(), "and keeps the lead"

    run_with_store(backend, body)


def test_newer_schema_is_refused_with_a_clear_error(backend: Backend) -> None:
    run_with_store(backend, nothing)
    backend.set_schema_version(99)
    with pytest.raises(StoreError, match=r"schema version 99, newer than .* upgrade the server"):
        run_with_store(backend, nothing)


def test_upgrading_archives_the_lifted_opt_outs_of_earlier_cycles(backend: Backend) -> None:
    """A database from before one-hold opt-outs, with a row per cycle: the lifted ones
    leave the hot path (still readable as archived); the active one stays."""

    def opt_out(hold_id: str) -> HoldDraft:
        return dataclasses.replace(draft(hold_id, Scope.agents(["l1"])), kind=HoldKind.OPT_OUT)

    async def before(store: Store) -> None:
        for hold_id in ("hold-000000000001", "hold-000000000002"):
            await store.create_hold(opt_out(hold_id), record("hold.create"))
            await store.lift_hold(hold_id, "employee-1", 1100.0, record("hold.lift"))
        await store.create_hold(opt_out("hold-000000000003"), record("hold.create"))
        await store.create_hold(draft("hold-000000000004"), record("hold.create"))
        await store.lift_hold("hold-000000000004", "approver-1", 1100.0, record("hold.lift"))

    async def after(store: Store) -> None:
        hot = {h.id for h in (await store.load()).shared.holds}
        assert hot == {"hold-000000000003", "hold-000000000004"}
        assert await store.archived_hold("hold-000000000001") is not None

    run_with_store(backend, before)
    postgres = isinstance(backend, PostgresBackend)
    migrations = PG_MIGRATIONS if postgres else SQLITE_MIGRATIONS
    version = next(n for n, script in enumerate(migrations) if "kind = 'opt_out'" in script)
    if postgres:
        backend.sql(f"DELETE FROM schema_version WHERE version > {version}")
    else:
        backend.set_schema_version(version)
    run_with_store(backend, after)
