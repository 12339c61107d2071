"""The SQLite store against its contract, on a real file."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from pathlib import Path

import pytest

from control.domain import (
    AgentStatus,
    CaptureReport,
    Desired,
    HoldDraft,
    HoldKind,
    Mode,
    Scope,
    draft_hold,
)
from control.errors import Conflict, NotFound, StoreError
from control.store import StoredAgent
from control.store.sqlite import SqliteStore


def draft(hold_id: str, scope: Scope | None = None) -> HoldDraft:
    return draft_hold(
        hold_id=hold_id,
        kind=HoldKind.INCIDENT,
        scope=scope or Scope.fleet(),
        reason="leak",
        ticket="INC-1",
        created_by="ic-1",
        created_at=1000.0,
    )


async def _lifecycle(data_dir: Path) -> None:
    store = await SqliteStore.open(data_dir)
    h1 = await store.create_hold(draft("h1", Scope.selector({"region": "eu"})))
    h2 = await store.create_hold(draft("h2", Scope.agents(["a", "b"])))
    lifted = await store.lift_hold("h1", "ic-2", 2000.0)
    assert (h1.created_epoch, h2.created_epoch, lifted.lifted_epoch) == (1, 2, 3)
    with pytest.raises(Conflict):
        await store.lift_hold("h1", "ic-2", 2001.0)
    with pytest.raises(NotFound):
        await store.lift_hold("nope", "ic-2", 2001.0)
    status = AgentStatus(
        first_seen=1.0,
        last_seen=2.0,
        connected=True,
        acked_epoch=2,
        acked_mode=Mode.PAUSED,
        acked_at=2.0,
        channels={"screen": False},
        report=CaptureReport(events_total=50, last_event_at=1.9, spool_events=0),
        ack_report=CaptureReport(events_total=48, last_event_at=1.8, spool_events=2),
        purged_events=7,
        verified_at=2.5,
        lease_expires_at=61.0,
        uploads_refused=3,
        violation="events_captured_total rose from 48 to 50",
        violation_at=2.6,
    )
    agent = StoredAgent(
        "a", {"region": "eu"}, Desired(Mode.PAUSED, ("h2",), "leak", 2, 1.5), status
    )
    await store.save_agents([agent])
    await store.close()

    reopened = await SqliteStore.open(data_dir)
    state = await reopened.load()
    assert state.epoch == 3
    assert [(h.id, h.active) for h in state.holds] == [("h1", False), ("h2", True)]
    assert state.holds[0].scope == Scope.selector({"region": "eu"})
    assert state.holds[0].lifted_by == "ic-2"
    assert state.holds[1].scope.agent_ids == frozenset({"a", "b"})
    (loaded,) = state.agents
    assert loaded.desired == agent.desired
    assert loaded.status.acked_epoch == 2 and loaded.status.channels == {"screen": False}
    assert loaded.status.connected is False, "nobody is connected to a process that just started"
    # Evidence survives a restart: a violation never clears by itself.
    expected = dataclasses.replace(status, connected=False, disconnected_at=None)
    assert loaded.status == expected
    # Epochs keep going up across restarts.
    h3 = await reopened.create_hold(draft("h3"))
    assert h3.created_epoch == 4
    await reopened.close()


def test_holds_epochs_and_agents_survive_reopen(tmp_path: Path) -> None:
    asyncio.run(_lifecycle(tmp_path))


def test_database_uses_wal_and_full_sync(tmp_path: Path) -> None:
    async def open_close() -> None:
        store = await SqliteStore.open(tmp_path)
        await store.close()

    asyncio.run(open_close())
    conn = sqlite3.connect(tmp_path / "killswitch.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_newer_schema_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "killswitch.db")
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        asyncio.run(SqliteStore.open(tmp_path))


def test_unwritable_data_dir_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot create data dir"):
        asyncio.run(SqliteStore.open(blocker / "sub"))
