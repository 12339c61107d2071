"""What only the PostgreSQL store does: several servers on one database, and a network
between the server and its data.

The contract every store honours is in the ``test_store_contract_*`` modules.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
import uuid
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from control.domain.audit import verify_chain
from control.errors import Conflict
from control.errors import StoreError
from control.store import DecidedLabels
from control.store import RunChange
from control.store import Store
from control.store import StoredAgent
from control.store import postgres
from control.store.postgres import MIGRATIONS
from control.store.postgres import PostgresStore
from tests.store_contract import Changes
from tests.store_contract import PostgresBackend
from tests.store_contract import SqlRefused
from tests.store_contract import agent
from tests.store_contract import certificate
from tests.store_contract import decision
from tests.store_contract import draft
from tests.store_contract import nothing
from tests.store_contract import postgres_backend
from tests.store_contract import record
from tests.store_contract import resume_request
from tests.store_contract import run_with_store
from tests.store_contract import staged_run
from tests.store_contract import watching


@pytest.fixture
def pg() -> Iterator[PostgresBackend]:
    yield from postgres_backend()


def test_replicas_starting_together_migrate_once(pg: PostgresBackend) -> None:
    async def main() -> None:
        stores = await asyncio.gather(*(pg.open() for _ in range(3)))
        try:
            hold = await stores[0].create_hold(draft("h1"), record("pause"))
            assert [h.id for h in (await stores[2].load()).shared.holds] == [hold.id]
        finally:
            await asyncio.gather(*(store.close() for store in stores))

    every_version = [(version,) for version in range(1, len(MIGRATIONS) + 1)]
    asyncio.run(main())
    assert pg.sql("SELECT version FROM schema_version ORDER BY version") == every_version
    run_with_store(pg, nothing)
    assert pg.sql("SELECT version FROM schema_version ORDER BY version") == every_version


def test_concurrent_writers_get_unique_epochs_in_commit_order(pg: PostgresBackend) -> None:
    """Two servers, 100 holds each, every one created and lifted at once: 400 epochs."""
    per_store = 100

    async def main() -> None:
        stores = await asyncio.gather(pg.open(pool_size=4), pg.open(pool_size=4))

        async def pause_and_resume(store: PostgresStore, hold_id: str) -> tuple[int, int]:
            hold = await store.create_hold(draft(hold_id), record("pause", target=hold_id))
            lifted = await store.lift_hold(hold_id, "ic-1", 2000.0, record("resume", "ic-1"))
            assert lifted.lifted_epoch > hold.created_epoch
            return hold.created_epoch, lifted.lifted_epoch

        try:
            pairs = await asyncio.gather(
                *(
                    pause_and_resume(store, f"s{n}-h{i}")
                    for n, store in enumerate(stores)
                    for i in range(per_store)
                )
            )
            epochs = sorted(epoch for pair in pairs for epoch in pair)
            assert epochs == list(range(1, 4 * per_store + 1))
            state = await stores[1].load()
            assert state.shared.epoch == 4 * per_store
            # Each audit entry was appended in its epoch's transaction, after the epoch
            # lock: the chain lists the changes in epoch order.
            entries, head = await stores[0].read_audit(0, 1000)
            assert verify_chain(entries, head) is None
            created = {h.id: h.created_epoch for h in state.shared.holds}
            pauses = [created[e.record.target] for e in entries if e.record.action == "pause"]
            assert pauses == sorted(pauses)
            assert len(entries) == 4 * per_store
        finally:
            await asyncio.gather(*(store.close() for store in stores))

    asyncio.run(main())


def test_an_unreachable_database_is_a_quick_clear_error() -> None:
    started = time.monotonic()
    with pytest.raises(StoreError) as refused:
        asyncio.run(PostgresStore.open("postgresql://postgres@127.0.0.1:1/test"))
    assert time.monotonic() - started < 5
    assert str(refused.value) == (
        "cannot connect to PostgreSQL at 127.0.0.1:1/test: Connection refused"
    )
    with pytest.raises(StoreError, match="invalid PostgreSQL DSN"):
        asyncio.run(PostgresStore.open("postgresql://[::1"))


def test_database_failures_are_one_line_store_errors(pg: PostgresBackend) -> None:
    async def body(store: Store) -> None:
        pg.break_audit_inserts("disk on fire")
        with pytest.raises(StoreError) as failed:
            await store.append_audit([record("one")])
        assert re.fullmatch(r"PostgreSQL at \S+ failed: disk on fire", str(failed.value))

    async def closed() -> None:
        store = await pg.open()
        await store.close()
        with pytest.raises(StoreError, match="store is closed"):
            await store.beat("replica-1")

    run_with_store(pg, body)
    asyncio.run(closed())


def test_connections_killed_under_the_store_are_replaced(pg: PostgresBackend) -> None:
    """A database restart or failover must not fail the next pause."""
    app = f"killswitch-test-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        dsn = make_conninfo(pg.dsn, application_name=app)
        store = await PostgresStore.open(dsn, schema=pg.schema, pool_size=2)
        try:
            await store.create_hold(draft("h1"), record("pause"))
            killed = await asyncio.to_thread(
                pg.sql,
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                f" WHERE application_name = '{app}'",
            )
            assert killed == [(True,), (True,)]
            assert (await store.create_hold(draft("h2"), record("pause"))).created_epoch == 2
        finally:
            await store.close()

    asyncio.run(main())


def test_no_free_connection_is_a_clear_error(
    pg: PostgresBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "CHECKOUT_TIMEOUT_SECONDS", 0.2)

    async def main() -> None:
        store = await pg.open(pool_size=1)
        try:
            with psycopg.connect(pg.dsn) as blocker:
                # Another server holds the epoch row: the first pause waits on it with
                # the only pooled connection, so the second cannot get one.
                blocker.execute(f'SET search_path TO "{pg.schema}"')
                blocker.execute("SELECT epoch FROM epoch_counter FOR UPDATE")
                waiting = asyncio.create_task(store.create_hold(draft("h1"), record("pause")))
                await asyncio.sleep(0.1)
                with pytest.raises(StoreError, match=r"unavailable: no connection within 0.2 s"):
                    await store.create_hold(draft("h2"), record("pause"))
            assert (await waiting).created_epoch == 1
        finally:
            await store.close()

    asyncio.run(main())


def test_the_database_refuses_what_would_rewrite_history(pg: PostgresBackend) -> None:
    async def body(store: Store) -> None:
        await store.create_hold(draft("h1"), record("one"))

    run_with_store(pg, body)
    with pytest.raises(SqlRefused, match="entries cannot be truncated"):
        pg.sql("TRUNCATE audit_log")
    with pytest.raises(SqlRefused, match="entries cannot be changed"):
        pg.sql(
            "INSERT INTO audit_log SELECT * FROM audit_log WHERE seq = 1"
            " ON CONFLICT (seq) DO UPDATE SET actor = 'someone-else'"
        )
    for statement in ("DELETE FROM audit_head", "TRUNCATE audit_head"):
        with pytest.raises(SqlRefused, match="audit_head only moves forward"):
            pg.sql(statement)
    for statement in ("UPDATE epoch_counter SET epoch = 0", "TRUNCATE epoch_counter"):
        with pytest.raises(SqlRefused, match="epoch_counter only moves forward"):
            pg.sql(statement)
    assert pg.sql("SELECT seq FROM audit_head") == [(1,)]
    assert pg.sql("SELECT epoch FROM epoch_counter") == [(1,)]


def test_an_agent_sending_nul_does_not_block_the_batch(pg: PostgresBackend) -> None:
    """PostgreSQL text cannot hold U+0000; the row is kept with a replacement character."""

    async def body(store: Store) -> None:
        await store.save_agents([agent("a", nack_reason="bad\x00reason"), agent("b")])
        reasons = {a.agent_id: a.status.nack_reason for a in (await store.load()).agents}
        assert reasons == {"a": "bad\ufffdreason", "b": ""}

    run_with_store(pg, body)
    # Labels are JSONB: an operator can ask the database which agents a selector covers.
    assert pg.sql("""SELECT agent_id FROM agents WHERE labels @> '{"region": "eu"}'""") == [
        ("a",),
        ("b",),
    ]


def named(pg: PostgresBackend, app: str) -> str:
    """The test DSN with an application_name, to find the store's sessions by."""
    return make_conninfo(pg.dsn, application_name=app)


def terminate(pg: PostgresBackend, app: str, where: str) -> int:
    """Terminate the sessions of ``app`` matching ``where``; how many there were."""
    killed = pg.sql(
        "SELECT pg_terminate_backend(a.pid, 5000) FROM pg_stat_activity a"
        f" WHERE a.application_name = '{app}' AND {where}"
    )
    return len(killed)


LISTENING = "a.query ILIKE 'LISTEN%'"
LEADING = (
    "EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.locktype = 'advisory'"
    f" AND l.classid = {postgres.LEAD_LOCK_CLASS} AND l.granted)"
)


def test_watch_sees_what_other_replicas_commit(pg: PostgresBackend) -> None:
    run = dataclasses.replace(staged_run(), version=1)

    async def main() -> None:
        writer, watcher = await asyncio.gather(pg.open(), pg.open())
        async with watching(watcher, writer) as (changes, _):
            # Once when it starts listening: whatever came before may have been missed.
            await changes.wait("listening started")
            writes: list[tuple[str, Callable[[], Awaitable[object]]]] = [
                ("create_hold", lambda: writer.create_hold(draft("h1"), record("pause"))),
                ("lift_hold", lambda: writer.lift_hold("h1", "ic-1", 2.0, record("resume"))),
                ("commit_run", lambda: writer.commit_run(RunChange(run, "ic-1", 3.0), [])),
                (
                    "save_resume_request",
                    lambda: writer.save_resume_request(resume_request("h1"), record("ask")),
                ),
                (
                    "record_certificate",
                    lambda: writer.record_certificate(certificate("01", "a"), None),
                ),
                (
                    "revoke_certificates",
                    lambda: writer.revoke_certificates("01", 4.0, record("revoke")),
                ),
                (
                    "save_agents with decided labels",
                    lambda: writer.save_agents(
                        [], [record("inventory.import")], [decision("a", org="finance")]
                    ),
                ),
            ]
            for what, write in writes:
                changes.clear()
                await write()
                await changes.wait(what)
            # Writes that change nothing shared announce nothing: agents, audit entries.
            changes.clear()
            await writer.save_agents([agent("a")], [record("enrolled")])
            await writer.append_audit([record("denied")])
            await asyncio.sleep(0.2)
            assert not changes.happened()

    asyncio.run(main())


def test_a_watch_hears_only_its_own_schema() -> None:
    """Deployments sharing a database in different schemas (and parallel test runs) do
    not wake each other: the channel is the schema's, like the lead lock. Until
    2026-12-05 it was one channel for the database, and a watch test failed in CI when
    another worker's test committed a hold in its own schema."""
    mine, other = postgres_backend(), postgres_backend()
    here, elsewhere = next(mine), next(other)

    async def main() -> None:
        writer, watcher = await asyncio.gather(elsewhere.open(), here.open())
        async with watching(watcher, writer) as (changes, _):
            await changes.wait("listening started")
            changes.clear()
            await writer.create_hold(draft("h1"), record("pause"))
            await asyncio.sleep(0.3)
            assert not changes.happened(), "heard a hold committed in another schema"
            ours = await here.open()
            try:
                await ours.create_hold(draft("h1"), record("pause"))
                await changes.wait("a hold created in its own schema")
            finally:
                await ours.close()

    try:
        asyncio.run(main())
    finally:
        for backend in (mine, other):
            next(backend, None)  # drops the schema


def test_watch_reconnects_and_says_so(pg: PostgresBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Notifications sent while it was away are lost: changed() once it listens again."""
    monkeypatch.setattr(postgres, "WATCH_RETRY_FIRST_SECONDS", 0.05)
    app = f"killswitch-watch-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        writer = await pg.open()
        watcher = await PostgresStore.open(named(pg, app), schema=pg.schema, pool_size=1)
        async with watching(watcher, writer) as (changes, watch):
            await changes.wait("listening started")
            for attempt in range(2):
                changes.clear()
                assert await asyncio.to_thread(terminate, pg, app, LISTENING) == 1
                await changes.wait(f"reconnect {attempt + 1}")
                # Listening again, for real.
                changes.clear()
                await writer.create_hold(draft(f"h{attempt}"), record("pause"))
                await changes.wait(f"a hold created after reconnect {attempt + 1}")
            assert not watch.done()

    asyncio.run(main())


def test_watch_ends_when_the_store_closes(pg: PostgresBackend) -> None:
    async def main() -> None:
        store = await pg.open()
        changes = Changes()
        watching = asyncio.create_task(store.watch(changes))
        await changes.wait("listening started")
        await store.close()
        await asyncio.wait_for(watching, 2)

    asyncio.run(main())


def test_exactly_one_replica_leads_and_another_takes_over(
    pg: PostgresBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ask the database every time rather than answer from the last second's check.
    monkeypatch.setattr(postgres, "LEAD_CHECK_SECONDS", 0.0)
    apps = [f"killswitch-lead-{n}-{uuid.uuid4().hex[:8]}" for n in range(3)]

    async def leader(stores: list[PostgresStore]) -> int:
        """The index of the only store that leads."""
        leading = [n for n, store in enumerate(stores) if await store.try_lead()]
        assert len(leading) == 1, leading
        return leading[0]

    async def takes_over(stores: list[PostgresStore], gone: int) -> int:
        for _ in range(20):
            leading = [n for n, store in enumerate(stores) if await store.try_lead()]
            if leading:
                assert len(leading) == 1 and leading[0] != gone, leading
                return leading[0]
            await asyncio.sleep(0.05)
        raise AssertionError("nobody took over the lead")

    async def main() -> None:
        stores = list(
            await asyncio.gather(
                *(PostgresStore.open(named(pg, app), schema=pg.schema, pool_size=1) for app in apps)
            )
        )
        try:
            first = await leader(stores)
            assert await leader(stores) == first, "the lead stays where it is"
            # Its session dies (a network partition, a failover): another takes over.
            assert await asyncio.to_thread(terminate, pg, apps[first], LEADING) == 1
            second = await takes_over(stores, first)
            assert await leader(stores) == second, "the old leader knows it lost"
            # A leader that shuts down hands over at once.
            await stores[second].close()
            rest = [store for n, store in enumerate(stores) if n != second]
            await takes_over(rest, -1)
            assert not await stores[second].try_lead(), "a closed store never leads"
        finally:
            await asyncio.gather(*(store.close() for store in stores))

    asyncio.run(main())


def test_leadership_is_per_schema(pg: PostgresBackend) -> None:
    """Deployments in different schemas of one database each have their own leader."""

    async def main() -> None:
        store = await pg.open()
        other = next(postgres_backend())
        try:
            other_store = await other.open()
            try:
                assert await store.try_lead()
                assert await other_store.try_lead()
            finally:
                await other_store.close()
        finally:
            await store.close()
            with psycopg.connect(pg.dsn, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(other.schema))
                )

    asyncio.run(main())


def test_an_unreachable_database_means_not_leading(pg: PostgresBackend) -> None:
    async def main() -> None:
        store = await pg.open()
        try:
            store._dsn = "postgresql://postgres@127.0.0.1:1/test"
            assert await store.try_lead() is False
        finally:
            await store.close()

    asyncio.run(main())


def test_two_replicas_moving_one_run_at_once_exactly_one_wins(pg: PostgresBackend) -> None:
    run = staged_run()

    async def main() -> None:
        stores = await asyncio.gather(pg.open(), pg.open())
        try:
            await stores[0].create_hold(draft("h1"), record("pause"))
            await stores[0].commit_run(
                RunChange(dataclasses.replace(run, version=1), "ic-1", 1.0), []
            )
            for base in (1, 2):
                # Both saw version ``base``; one aborts while the other starts a wave
                # (a hold change under a new epoch).
                step = dataclasses.replace(run, version=base + 1)
                results = await asyncio.gather(
                    stores[0].commit_run(
                        RunChange(step, "ic-1", 2.0, create=draft(f"r{base}")),
                        [record("runbook.wave")],
                    ),
                    stores[1].commit_run(
                        RunChange(step, "ic-2", 2.0), [record("runbook.abort", "ic-2")]
                    ),
                    return_exceptions=True,
                )
                conflicts = [r for r in results if isinstance(r, Conflict)]
                assert len(conflicts) == 1, results
                assert "was changed by another writer" in str(conflicts[0])
            state = await stores[1].load()
            assert [r.version for r in state.shared.runs] == [3]
            entries, head = await stores[1].read_audit(0, 100)
            assert verify_chain(entries, head) is None
            assert len(entries) == 1 + 2, "the pause and the two winning steps"
        finally:
            await asyncio.gather(*(store.close() for store in stores))

    asyncio.run(main())


def written(agent_id: str, by: str, *, connected_at: float, connected: bool = True) -> StoredAgent:
    row = agent(agent_id)
    status = dataclasses.replace(row.status, connected=connected, connected_at=connected_at)
    return dataclasses.replace(row, status=status, written_by=by, written_at=connected_at + 1)


def test_rows_other_replicas_wrote_are_read_once_past_the_cursor(pg: PostgresBackend) -> None:
    async def body(store: Store) -> None:
        await store.save_agents(
            [written("a", "r1", connected_at=10), written("b", "r2", connected_at=10)]
        )
        await store.beat("r1")
        first = await store.agents_written_since("", "r2")
        assert [(r.agent_id, r.written_by) for r in first.rows] == [("a", "r1")]
        assert first.rows[0] == written("a", "r1", connected_at=10)
        assert set(first.beat_ages) == {"r1"} and 0 <= first.beat_ages["r1"] < 5
        # Nothing new: an empty read (a row may come again, never be skipped).
        again = await store.agents_written_since(first.cursor, "r2")
        assert [r.agent_id for r in again.rows] in ([], ["a"])
        await store.save_agents([written("c", "r1", connected_at=11)])
        later = await store.agents_written_since(again.cursor, "r2")
        assert "c" in [r.agent_id for r in later.rows]

    run_with_store(pg, body)


def test_a_replica_cannot_overwrite_the_row_of_a_newer_stream(pg: PostgresBackend) -> None:
    """The agent moved from r1 to r2: r1's late disconnect must not erase r2's stream."""

    async def body(store: Store) -> None:
        await store.save_agents([written("a", "r1", connected_at=10)])
        await store.save_agents([written("a", "r2", connected_at=20)])
        await store.save_agents([written("a", "r1", connected_at=10, connected=False)])
        assert await store.load_agent("a") == written("a", "r2", connected_at=20)
        # Another replica cannot speak for r2's live stream either...
        await store.save_agents([written("a", "r3", connected_at=20)])
        assert (await store.load_agent("a")) == written("a", "r2", connected_at=20)
        # ...but r2 can, and once the stream is closed anyone may update the row.
        await store.save_agents([written("a", "r2", connected_at=20, connected=False)])
        await store.save_agents([written("a", "r3", connected_at=20, connected=False)])
        stored = await store.load_agent("a")
        assert stored is not None and stored.written_by == "r3"

    run_with_store(pg, body)


def test_beats_are_dated_by_the_database(pg: PostgresBackend) -> None:
    async def body(store: Store) -> None:
        await store.beat("r1")
        await asyncio.sleep(0.3)
        ages = (await store.agents_written_since("", "r2")).beat_ages
        assert 0.3 <= ages["r1"] < 5

    run_with_store(pg, body)


def test_a_label_cursor_never_skips_a_change_committed_concurrently(pg: PostgresBackend) -> None:
    """Two replicas relabel at once while a third reads past its cursor, as a resync does.

    Versions must become visible in order: were a version visible before an older one
    committed, the reader's cursor would pass the older one and that relabel would never
    reach the reader. Each write relabels agents of its own (and one shared agent), so a
    skipped write shows; what the reader pieced together must equal the table."""
    per_writer = 60

    async def main() -> None:
        writers = await asyncio.gather(pg.open(pool_size=4), pg.open(pool_size=4))
        reader = await pg.open(pool_size=1)
        seen: dict[str, DecidedLabels] = {}
        done = asyncio.Event()

        async def relabel(n: int, store: PostgresStore) -> None:
            async def one(i: int) -> None:
                batch = [decision(a, f"ic-{n}", i, org=f"w{n}") for a in ("shared", f"{n}-{i}")]
                await store.save_agents([], [record("inventory.import")], batch)

            await asyncio.gather(*(one(i) for i in range(per_writer)))

        async def follow() -> None:
            cursor = 0
            while True:
                finished = done.is_set()
                changes = await reader.labels_decided_since(cursor)
                for change in changes:
                    assert cursor < change.version  # oldest version first, none at or below
                    seen[change.agent_id] = change
                cursor = changes[-1].version if changes else cursor
                if finished:
                    return

        following = asyncio.create_task(follow())
        try:
            await asyncio.gather(*(relabel(n, w) for n, w in enumerate(writers)))
            done.set()
            await following
            table = {d.agent_id: d for d in await reader.labels_decided_since(0)}
            assert len(table) == 2 * per_writer + 1
            assert seen == table
            entries, head = await reader.read_audit(0, 1000)
            assert verify_chain(entries, head) is None and len(entries) == 2 * per_writer
        finally:
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
            await asyncio.gather(reader.close(), *(w.close() for w in writers))

    asyncio.run(main())
