"""Store health means writes work: causes, the beat as a write, the reserve, the plane.

The file systems are real: a small tmpfs that the test fills, and an ext4 image that
the kernel turns read-only under the open database (as ``errors=remount-ro`` does on
a failing disk). Both need root.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors as pg_errors

from control.errors import StoreError
from control.errors import StoreUnavailable
from control.plane import ControlPlane
from control.store import Store
from control.store import causes
from control.store.postgres import PostgresStore
from control.store.reserve import RESERVE_BYTES
from control.store.reserve import RESERVE_FILENAME
from tests.conftest import ADMIN_DSN
from tests.disks import fill
from tests.disks import mount_ext4
from tests.disks import mount_tmpfs
from tests.disks import mounted
from tests.disks import turn_read_only
from tests.store_contract import SqliteBackend
from tests.store_contract import agent
from tests.store_contract import draft
from tests.store_contract import record
from tests.store_contract import run_with_store


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, unmounted afterwards."""
    yield from mounted(mount_tmpfs, tmp_path / "disk")


@pytest.fixture
def ext4_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB ext4 image mounted with errors=remount-ro, unmounted afterwards."""
    yield from mounted(mount_ext4, tmp_path / "disk")


# ------------------------------------------------------------------ causes


@pytest.mark.parametrize(
    ("number", "cause"),
    [
        (errno.ENOSPC, causes.DISK_FULL),
        (errno.EDQUOT, causes.DISK_FULL),
        (errno.EROFS, causes.READ_ONLY_FS),
        (errno.EIO, causes.IO_ERROR),
    ],
)
def test_os_errors_name_their_cause(number: int, cause: str) -> None:
    assert causes.from_os_error(OSError(number, os.strerror(number))) == cause


def test_postgres_errors_name_their_cause() -> None:
    assert causes.from_postgres(pg_errors.ReadOnlySqlTransaction()) == causes.READ_ONLY_DB
    assert causes.from_postgres(pg_errors.DiskFull()) == causes.DISK_FULL
    assert causes.from_postgres(pg_errors.AdminShutdown()) == causes.UNREACHABLE
    assert causes.from_postgres(psycopg.OperationalError("server closed the connection"))
    assert causes.from_postgres(pg_errors.UniqueViolation()) is None, "a query's own fault"


def test_only_causes_that_do_not_pass_by_themselves_are_cannot_write() -> None:
    assert causes.unavailable(causes.DISK_FULL).cannot_write
    assert causes.unavailable(causes.ON_RESERVE).cannot_write
    assert not causes.unavailable(causes.UNREACHABLE).cannot_write
    assert causes.label_for("store failed: whatever the driver said") == causes.OTHER_LABEL


# ------------------------------------------------------------------ SQLite


def test_sqlite_beat_is_a_write_and_a_pause_commits_from_the_reserve(small_disk: Path) -> None:
    async def body(store: Store) -> None:
        reported: list[StoreUnavailable] = []
        store.report_failures_to(reported.append)
        reserve = small_disk / RESERVE_FILENAME
        assert reserve.stat().st_blocks * 512 >= RESERVE_BYTES, "preallocated, not sparse"
        await store.beat("r1")
        fill(small_disk)
        # A SELECT 1 would still pass here: the beat must write.
        with pytest.raises(StoreUnavailable) as full:
            await store.beat("r1")
        assert str(full.value) == causes.DISK_FULL and full.value.cannot_write
        assert [e.cause for e in reported] == [causes.DISK_FULL], "reported as it happened"
        with pytest.raises(StoreUnavailable, match=causes.DISK_FULL):
            await store.append_audit([record("not a pause: no reserve for it")])
        assert reserve.exists()

        hold = await store.create_hold(draft("h1"), record("pause"))
        assert hold.created_epoch == 1 and not reserve.exists()
        # The pause is durable: a new connection reads it back.
        assert [h.id for h in (await store.load_shared()).holds] == ["h1"]
        with pytest.raises(StoreUnavailable, match=causes.ON_RESERVE):
            await store.beat("r1")

        (small_disk / "fill").unlink()
        await store.beat("r1")
        assert reserve.exists(), "the probe put the reserve back"

    async def reopened(store: Store) -> None:
        assert [h.id for h in (await store.load_shared()).holds] == ["h1"]

    run_with_store(SqliteBackend(small_disk), body)
    run_with_store(SqliteBackend(small_disk), reopened)


def test_sqlite_on_a_file_system_turned_read_only_names_it(ext4_disk: Path) -> None:
    async def body(store: Store) -> None:
        await store.beat("r1")
        turn_read_only(ext4_disk)
        with pytest.raises(StoreUnavailable) as refused:
            await store.beat("r1")
        assert str(refused.value) == causes.READ_ONLY_FS
        with pytest.raises(StoreUnavailable, match=causes.READ_ONLY_FS):
            await store.create_hold(draft("h1"), record("pause"))

    run_with_store(SqliteBackend(ext4_disk), body)


def test_a_failed_write_makes_the_plane_unhealthy_at_once(small_disk: Path) -> None:
    """No waiting for the next beat: leases stop with the first write that fails."""

    async def body(store: Store) -> None:
        plane = ControlPlane(store, clock=time.time, store_probe_interval=3600)
        await plane.start()
        try:
            assert plane.store_healthy and plane.store_health.cause == ""
            fill(small_disk)
            with pytest.raises(StoreError):
                await plane.audit.append(record("anything that writes"))
            assert not plane.store_healthy
            assert plane.store_health.cause == causes.DISK_FULL
        finally:
            (small_disk / "fill").unlink(missing_ok=True)
            await plane.stop()

    run_with_store(SqliteBackend(small_disk), body)


# ------------------------------------------------------------------ PostgreSQL


def test_postgres_beat_is_a_write_refused_by_a_read_only_database(pg_dsn: str) -> None:
    """A hot standby, or a database set read-only: the beat must notice."""
    name = pg_dsn.rpartition("/")[2]

    def admin(sql: str) -> None:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(sql)

    async def main() -> None:
        store = await PostgresStore.open(pg_dsn, pool_size=1)
        reported: list[StoreUnavailable] = []
        store.report_failures_to(reported.append)
        try:
            await store.beat("r1")
            await asyncio.to_thread(
                admin, f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'
            )
            # New sessions get the setting: make the pool open one.
            await asyncio.to_thread(
                admin,
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
            )
            with pytest.raises(StoreUnavailable) as refused:
                await store.beat("r1")
            assert str(refused.value) == causes.READ_ONLY_DB and refused.value.cannot_write
            with pytest.raises(StoreUnavailable, match=causes.READ_ONLY_DB):
                await store.create_hold(draft("h1"), record("pause"))
            assert {e.cause for e in reported} == {causes.READ_ONLY_DB}

            # Writable again: a refused connection was replaced, and the new one can
            # stage agent rows (its temporary table was made), so flushes work again.
            await asyncio.to_thread(
                admin, f'ALTER DATABASE "{name}" RESET default_transaction_read_only'
            )
            for _ in range(3):  # a session opened while read-only stays so: one more refusal
                with contextlib.suppress(StoreUnavailable):
                    await store.beat("r1")
                    break
            else:
                raise AssertionError("the store never took writes again")
            await store.save_agents([agent("a1")])
            assert (await store.load_agent("a1")) is not None
        finally:
            await store.close()

    asyncio.run(main())
