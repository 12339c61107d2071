"""The ``Store`` contract, against both stores: agent rows, violation evidence and its
acknowledgements, and the labels operators decide.
"""

from __future__ import annotations

import dataclasses

import pytest

from control.domain import AgentStatus
from control.errors import StoreError
from control.store import Store
from tests.store_contract import Backend
from tests.store_contract import SqlRefused
from tests.store_contract import agent
from tests.store_contract import audit_actions
from tests.store_contract import decision
from tests.store_contract import evidence
from tests.store_contract import nothing
from tests.store_contract import record
from tests.store_contract import run_with_store
from tests.store_contract import sighting


def test_agent_batches_upsert_and_the_last_row_of_an_agent_wins(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.save_agents([agent("a"), agent("b")])
        await store.save_agents([agent("b", region="us"), agent("c"), agent("b", region="ap")])
        labels = {a.agent_id: a.labels for a in (await store.load()).agents}
        assert labels == {"a": {"region": "eu"}, "b": {"region": "ap"}, "c": {"region": "eu"}}

    run_with_store(backend, body)


def test_a_replica_never_reads_back_its_own_rows(backend: Backend) -> None:
    """SQLite has one writer, which knows its rows; PostgreSQL leaves out the reader's."""

    async def body(store: Store) -> None:
        await store.save_agents([agent("a")])  # written by replica-a
        await store.beat("replica-a")
        changes = await store.agents_written_since("", "replica-a")
        assert changes.rows == []

    run_with_store(backend, body)


def test_an_acknowledged_violation_is_shared_state_with_its_audit_entry(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.acknowledge_violation("a", 2.6, record("agent.acknowledge_violation"))
        await store.acknowledge_violation("b", 5.0, record("agent.acknowledge_violation"))
        await store.acknowledge_violation("a", 9.5, record("agent.acknowledge_violation"))
        assert (await store.load_shared()).violation_acks == {"a": 9.5, "b": 5.0}
        assert (await store.load()).shared.violation_acks == {"a": 9.5, "b": 5.0}
        assert await audit_actions(store) == ["agent.acknowledge_violation"] * 3

    run_with_store(backend, body)


def test_violation_evidence_is_appended_once_and_read_until_acknowledged(
    backend: Backend,
) -> None:
    a1, b1, a2 = evidence("e1", "a", 5.0), evidence("e2", "b", 6.0), evidence("e3", "a", 0.1 + 7)

    async def body(store: Store) -> None:
        await store.record_violations([sighting(a2), sighting(a1)])
        await store.record_violations([sighting(b1)])
        # A retry after an unknown outcome: no second row, no second audit entry.
        await store.record_violations([sighting(a1), sighting(b1)])
        await store.record_violations([])
        assert (await store.load_shared()).violations == [a1, b1, a2]
        assert await audit_actions(store) == ["agent.violation"] * 3
        # An acknowledgement covers evidence up to its time; later evidence stays.
        await store.acknowledge_violation("a", 5.0, record("agent.acknowledge_violation"))
        assert (await store.load_shared()).violations == [b1, a2]

    async def reopened(store: Store) -> None:
        assert (await store.load()).shared.violations == [b1, a2]

    run_with_store(backend, body)
    run_with_store(backend, reopened)
    with pytest.raises(SqlRefused, match="append-only: entries cannot be changed"):
        backend.sql("UPDATE violation_evidence SET evidence = 'nothing' WHERE id = 'e2'")
    with pytest.raises(SqlRefused, match="append-only: entries cannot be deleted"):
        backend.sql("DELETE FROM violation_evidence WHERE id = 'e2'")
    assert backend.sql("SELECT count(*) FROM violation_evidence") == [(3,)]


def test_violation_evidence_is_stored_with_its_audit_entry_or_not_at_all(backend: Backend) -> None:
    async def write(store: Store) -> None:
        with pytest.raises(StoreError, match="audit is down"):
            await store.record_violations([sighting(evidence("e1", "a", 5.0))])
        assert (await store.load_shared()).violations == []

    run_with_store(backend, nothing)
    backend.break_audit_inserts("audit is down")
    run_with_store(backend, write)


def test_reported_labels_are_stored_apart_from_the_servers(backend: Backend) -> None:
    """What an agent claims survives a restart next to, never instead of, its labels;
    an agent that never connected has reported nothing (None), not "no labels"."""
    claimed = dataclasses.replace(
        agent("a", org="finance"),
        status=dataclasses.replace(agent("a").status, reported_labels={"org": "marketing"}),
    )
    silent = dataclasses.replace(agent("b", org="finance"), status=AgentStatus())
    bare = dataclasses.replace(
        agent("c"), status=dataclasses.replace(agent("c").status, reported_labels={})
    )

    async def write(store: Store) -> None:
        await store.save_agents([claimed, silent, bare])

    async def reopened(store: Store) -> None:
        rows = {a.agent_id: a for a in (await store.load()).agents}
        assert rows["a"] == claimed
        assert rows["a"].labels == {"org": "finance"}
        assert rows["a"].status.reported_labels == {"org": "marketing"}
        assert rows["b"].status.reported_labels is None
        assert rows["c"].status.reported_labels == {}
        assert await store.load_agent("a") == claimed

    run_with_store(backend, write)
    run_with_store(backend, reopened)


def test_decided_labels_are_read_back_by_version_only_when_they_change(backend: Backend) -> None:
    """An import that changes nothing moves no version; a replica reading past its cursor
    gets exactly the agents whose decided labels changed, each once, newest value."""

    async def body(store: Store) -> None:
        await store.save_agents(
            [], [record("inventory.import")], [decision("a", org="sales"), decision("b", org="hr")]
        )
        first = await store.labels_decided_since(0)
        assert [(d.agent_id, d.labels, d.set_by) for d in first] == [
            ("a", {"org": "sales"}, "ic-1"),
            ("b", {"org": "hr"}, "ic-1"),
        ]
        cursor = first[-1].version
        assert cursor > 0 and {d.version for d in first} == {cursor}
        assert await store.labels_decided_since(cursor) == []
        # b unchanged, a relabelled, c new: only a and c come back, past the cursor.
        await store.save_agents(
            [],
            [record("inventory.import", "ic-2")],
            [
                decision("a", "ic-2", 2000.0, org="finance"),
                decision("b", "ic-2", 2000.0, org="hr"),
                decision("c", "ic-2", 2000.0, org="finance"),
            ],
        )
        second = await store.labels_decided_since(cursor)
        assert [(d.agent_id, d.labels, d.set_by, d.set_at) for d in second] == [
            ("a", {"org": "finance"}, "ic-2", 2000.0),
            ("c", {"org": "finance"}, "ic-2", 2000.0),
        ]
        assert min(d.version for d in second) > cursor
        # Nothing changes: nothing to read, however often the import is repeated.
        await store.save_agents([], [], [decision("a", org="finance")])
        assert await store.labels_decided_since(second[-1].version) == []
        assert await audit_actions(store) == ["inventory.import"] * 2

    async def reopened(store: Store) -> None:
        everything = {d.agent_id: d.labels for d in await store.labels_decided_since(0)}
        assert everything == {"a": {"org": "finance"}, "b": {"org": "hr"}, "c": {"org": "finance"}}

    run_with_store(backend, body)
    run_with_store(backend, reopened)


def test_an_agents_row_reads_back_with_its_decided_labels(backend: Backend) -> None:
    """The replica serving an agent writes its row with the labels it knew; an import
    on another replica decided newer ones. Every read of the row (a restart, a failover's
    resync) must give the decided labels, or a pause by selector could miss the laptop."""
    stale = agent("a", org="marketing")
    self_labelled = agent("b", org="sales")  # labelled by its first report: no decision

    async def body(store: Store) -> None:
        await store.save_agents([stale, self_labelled])
        await store.save_agents([], [record("inventory.import")], [decision("a", org="finance")])
        await store.save_agents([stale])  # written again, by a replica not caught up yet
        rows = {a.agent_id: a for a in (await store.load()).agents}
        assert rows["a"] == dataclasses.replace(stale, labels={"org": "finance"})
        assert rows["b"] == self_labelled
        loaded = await store.load_agent("a")
        assert loaded is not None and loaded.labels == {"org": "finance"}

    run_with_store(backend, body)


def test_decided_labels_are_stored_with_their_audit_entries_or_not_at_all(
    backend: Backend,
) -> None:
    async def write(store: Store) -> None:
        with pytest.raises(StoreError, match="audit is down"):
            await store.save_agents(
                [agent("a")], [record("inventory.import")], [decision("a", org="finance")]
            )
        assert await store.labels_decided_since(0) == []
        assert (await store.load()).agents == []

    run_with_store(backend, nothing)
    backend.break_audit_inserts("audit is down")
    run_with_store(backend, write)
