"""What only the SQLite store does: its file, its pragmas, its own schema history.

The contract every store honours is in the ``test_store_contract_*`` modules.
"""

from __future__ import annotations

import asyncio
import sqlite3
import stat
from pathlib import Path

import pytest
import structlog

from control.domain.audit import GENESIS_HASH
from control.domain.audit import ChainHead
from control.errors import StoreError
from control.store import Store
from control.store.sqlite import DB_FILENAME
from control.store.sqlite import MIGRATIONS
from control.store.sqlite import SqliteStore
from tests.store_contract import SqliteBackend
from tests.store_contract import SqlRefused
from tests.store_contract import draft
from tests.store_contract import nothing
from tests.store_contract import record
from tests.store_contract import run_with_store

# test_audit_tamper builds its holds and audit records with these, imported from here.
__all__ = ["draft", "record"]


def test_database_uses_wal_and_full_sync(tmp_path: Path) -> None:
    run_with_store(SqliteBackend(tmp_path), nothing)
    assert SqliteBackend(tmp_path).sql("PRAGMA journal_mode") == [("wal",)]


def test_unwritable_data_dir_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot create data dir"):
        asyncio.run(SqliteStore.open(blocker / "sub"))


def test_version_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / DB_FILENAME)
    conn.executescript(MIGRATIONS[0])
    conn.execute("PRAGMA user_version=1")
    conn.execute("UPDATE epoch_counter SET epoch = 7")
    conn.commit()
    conn.close()

    async def body(store: Store) -> None:
        assert (await store.load()).shared.epoch == 7
        assert await store.read_audit(0, 10) == ([], ChainHead(0, GENESIS_HASH))
        hold = await store.create_hold(draft("h1"), record("pause"))
        assert hold.created_epoch == 8

    backend = SqliteBackend(tmp_path)
    run_with_store(backend, body)
    assert backend.sql("PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert len(MIGRATIONS) == 15


def test_insert_or_replace_cannot_overwrite_an_audit_entry(tmp_path: Path) -> None:
    """SQLite's REPLACE deletes without firing delete triggers: a trigger of its own."""

    async def body(store: Store) -> None:
        await store.append_audit([record("one")])

    backend = SqliteBackend(tmp_path)
    run_with_store(backend, body)
    with pytest.raises(SqlRefused, match="seq already written"):
        backend.sql("INSERT OR REPLACE INTO audit_log SELECT * FROM audit_log WHERE seq = 1")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_data_dir_and_database_files_are_owner_only(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "data"

    async def body(store: Store) -> None:
        await store.create_hold(draft("h1"), record("pause"))
        assert mode(data_dir) == 0o700
        for name in (DB_FILENAME, f"{DB_FILENAME}-wal", f"{DB_FILENAME}-shm"):
            assert mode(data_dir / name) == 0o600, name

    run_with_store(SqliteBackend(data_dir), body)


def test_loose_existing_permissions_are_tightened_with_a_warning(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    db_file = data_dir / DB_FILENAME
    db_file.touch()
    db_file.chmod(0o644)

    async def body(store: Store) -> None:
        assert (mode(data_dir), mode(db_file)) == (0o700, 0o600)

    with structlog.testing.capture_logs() as logs:
        run_with_store(SqliteBackend(data_dir), body)
    warnings = [(line["path"], line["was"]) for line in logs if line["log_level"] == "warning"]
    assert warnings == [(str(data_dir), "755"), (str(db_file), "644")]


def test_one_server_per_file_has_nothing_to_watch_and_always_leads(tmp_path: Path) -> None:
    calls: list[None] = []

    async def body(store: Store) -> None:
        await asyncio.wait_for(store.watch(lambda: calls.append(None)), 1)
        assert await store.try_lead()

    run_with_store(SqliteBackend(tmp_path), body)
    assert calls == []
