"""The server decides an agent's labels: what an agent reports never moves a hold.

Issue 13, break 5: a laptop paused by ``--selector org=finance`` reconnected as
``org=marketing``, got a lease, and its uploads were authorized.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agent_stub.identity import new_key_and_csr
from control.domain import CaptureReport
from control.domain import Mode
from control.domain import Scope
from control.domain.identity import Principal
from control.domain.identity import Role
from control.domain.labels import describe_change
from control.domain.labels import judge_report
from control.domain.labels import label_mismatch
from control.domain.labels import mismatch_json
from control.governance import Governance
from control.pki import Authority
from control.pki import initialise
from control.plane import ControlPlane
from control.replication import Replication
from control.runbooks import RunbookRunner
from control.store import Store
from control.store.postgres import PostgresStore
from control.store.sqlite import SqliteStore
from tests.plane_support import STOPPED
from tests.plane_support import Session
from tests.test_plane_epochs import two_replicas

IC = Principal("ic-1", Role.INCIDENT_COMMANDER, serial="01")
FINANCE = {"org": "finance", "region": "eu"}
MARKETING = {"org": "marketing", "region": "eu"}

# ------------------------------------------------------------------ the pure rules


def test_only_keys_the_agent_reports_can_contradict_the_server() -> None:
    server = {"org": "finance", "owner": "employee-7"}
    assert label_mismatch(server, None) == {}, "an agent that never reported claims nothing"
    assert label_mismatch(server, {}) == {}
    assert label_mismatch(server, {"org": "finance"}) == {}, "the inventory may know more"
    assert label_mismatch(server, {"org": "marketing", "site": "x"}) == {
        "org": ("finance", "marketing"),
        "site": (None, "x"),
    }
    assert mismatch_json(server, {"org": "marketing"}) == {
        "org": {"server": "finance", "reported": "marketing"}
    }


def test_a_report_is_news_only_when_its_contradiction_is() -> None:
    first = judge_report(FINANCE, None, MARKETING)
    assert first.mismatch == {"org": ("finance", "marketing")} and first.changed
    assert not judge_report(FINANCE, MARKETING, MARKETING).changed, "same claim: no news"
    assert judge_report(FINANCE, MARKETING, {"org": "sales"}).changed
    assert judge_report(FINANCE, MARKETING, FINANCE).changed, "a cleared claim is news too"
    assert not judge_report(FINANCE, None, FINANCE).changed


def test_a_relabel_is_described_key_by_key() -> None:
    old = {"org": "marketing", "ring": "canary", "region": "eu"}
    new = {"org": "finance", "region": "eu", "site": "berlin"}
    assert describe_change(old, new) == "org: marketing -> finance, -ring, +site=berlin"


# ------------------------------------------------------------------ the plane


@asynccontextmanager
async def plane_on(tmp_path: Path) -> AsyncIterator[tuple[ControlPlane, SqliteStore]]:
    store = await SqliteStore.open(tmp_path)
    plane = ControlPlane(store, clock=time.time, flush_interval=3600)
    await plane.start()
    try:
        yield plane, store
    finally:
        await plane.stop()
        await store.close()


async def audit_of(store: SqliteStore, action: str) -> list[str]:
    entries, _ = await store.read_audit(0, 1000)
    return [f"{e.record.target}: {e.record.detail}" for e in entries if e.record.action == action]


def test_a_paused_agent_that_relabels_itself_stays_paused(tmp_path: Path) -> None:
    """The break as reported: it reconnects as org=marketing and gets neither a lease
    nor an upload; the contradiction is shown, counted and audited once."""

    async def scenario() -> None:
        async with plane_on(tmp_path) as (plane, store):
            plane.connect("laptop-1", FINANCE, Session())  # first use: pinned
            plane.connect("laptop-2", MARKETING, Session())
            hold, covered = await plane.create_hold(
                Scope.selector({"org": "finance"}), "leak", "INC-1", IC
            )
            assert covered == 1
            plane.ack("laptop-1", hold.created_epoch, Mode.PAUSED, STOPPED, CaptureReport(10))
            for _ in range(3):  # the hostile agent keeps trying
                session = Session()
                plane.connect("laptop-1", MARKETING, session)
                view = plane.agent_view("laptop-1")
                assert view is not None
                assert view.desired.mode is Mode.PAUSED
                assert dict(view.labels) == FINANCE
                assert view.status.reported_labels == MARKETING
                lease = plane.grant_lease("laptop-1")
                assert not lease.granted and lease.reason.startswith("paused")
                now = time.time()
                assert not plane.authorize_upload("laptop-1", now - 1, now, 5).allowed
            assert plane.grant_lease("laptop-2").granted, "the honest marketing laptop"
            assert plane.census().label_mismatches == 1
            await plane.flush()
            assert await audit_of(store, "agent.label_mismatch") == [
                "laptop-1: org: server finance, reported marketing"
                " (the server's labels decide its holds)"
            ]
            plane.connect("laptop-1", {"org": "sales"}, Session())
            await plane.flush()
            assert len(await audit_of(store, "agent.label_mismatch")) == 2, "a new claim"
            stored = await store.load_agent("laptop-1")
            assert stored is not None and stored.labels == FINANCE

    asyncio.run(scenario())


def test_a_restarted_server_keeps_the_pinned_labels(tmp_path: Path) -> None:
    """The first report is pinned for good: a server restart is no second first use."""

    async def scenario() -> None:
        async with plane_on(tmp_path) as (plane, _):
            plane.connect("laptop-1", FINANCE, Session())
            await plane.flush()
        async with plane_on(tmp_path) as (plane, store):
            await plane.create_hold(Scope.selector({"org": "finance"}), "leak", "", IC)
            plane.connect("laptop-1", MARKETING, Session())
            assert not plane.grant_lease("laptop-1").granted
            await plane.flush()
            assert len(await audit_of(store, "agent.label_mismatch")) == 1

    asyncio.run(scenario())


def test_an_inventory_import_relabels_known_agents_and_their_state_follows(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with plane_on(tmp_path) as (plane, store):
            session = Session()
            plane.connect("laptop-1", MARKETING, session)  # pinned as marketing
            await plane.create_hold(Scope.selector({"org": "finance"}), "leak", "", IC)
            assert plane.grant_lease("laptop-1").granted
            notified = session.notified
            tally = await plane.expect_agents([("laptop-1", FINANCE), ("laptop-9", FINANCE)], IC)
            assert (tally.added, tally.relabelled, tally.unchanged) == (1, 1, 0)
            view = plane.agent_view("laptop-1")
            assert view is not None and view.desired.mode is Mode.PAUSED
            assert session.notified > notified, "the new directive goes out at once"
            assert not plane.grant_lease("laptop-1").granted
            assert await audit_of(store, "agent.relabel") == ["laptop-1: org: marketing -> finance"]
            # The agent still says marketing: now that contradicts the server.
            assert await audit_of(store, "agent.label_mismatch") == [
                "laptop-1: org: server finance, reported marketing"
                " (the server's labels decide its holds)"
            ]
            # An agent known only from the inventory cannot talk its way out either.
            plane.connect("laptop-9", MARKETING, Session())
            assert not plane.grant_lease("laptop-9").granted
            again = await plane.expect_agents([("laptop-1", FINANCE)], IC)
            assert (again.relabelled, again.unchanged) == (0, 1)
            assert len(await audit_of(store, "agent.relabel")) == 1
            assert [d for d in await audit_of(store, "inventory.import")] == [
                ": 1 added, 1 known, 1 relabelled",
                ": 0 added, 1 known, 0 relabelled",
            ]

    asyncio.run(scenario())


def test_a_join_tokens_labels_win_over_what_the_agent_reports(tmp_path: Path) -> None:
    """Pinned at enrolment, before the certificate exists: the agent's first connect
    is not a first use."""

    async def scenario() -> None:
        initialise(tmp_path, now=time.time())
        store = await SqliteStore.open(tmp_path)
        plane = ControlPlane(store, clock=time.time, flush_interval=3600)
        governance = Governance(plane, store, clock=time.time, authority=Authority.load(tmp_path))
        await governance.start(await plane.start())
        # The inventory knows its owner; the token pins its org on top.
        await plane.expect_agents([("laptop-1", {"owner": "employee-1", "org": "sales"})], IC)
        issued = await governance.create_enroll_token(
            IC, uses=1, ttl=3600, labels={"org": "finance"}
        )
        _, csr = new_key_and_csr()
        await governance.enroll(issued.text, "laptop-1", csr.decode(), source="10.0.0.1")
        await plane.create_hold(Scope.selector({"org": "finance"}), "leak", "", IC)
        plane.connect("laptop-1", {"org": "marketing", "owner": "employee-1"}, Session())
        view = plane.agent_view("laptop-1")
        assert view is not None
        assert dict(view.labels) == {"org": "finance", "owner": "employee-1"}
        assert view.desired.mode is Mode.PAUSED
        assert not plane.grant_lease("laptop-1").granted
        await plane.flush()
        assert await audit_of(store, "agent.relabel") == ["laptop-1: org: sales -> finance"]
        tokens = await audit_of(store, "enroll_token.create")
        assert tokens[0].endswith("pins org=finance")
        await plane.stop()
        await store.close()

    asyncio.run(scenario())


def test_token_labels_are_checked_like_any_label() -> None:
    from control.domain.identity import issue_enroll_token
    from control.errors import InvalidInput

    with pytest.raises(InvalidInput, match="invalid value"):
        issue_enroll_token(uses=1, ttl=60, created_by="ic-1", now=0, labels={"org": "a b"})


# ------------------------------------------------------------------ several replicas


def replication_of(plane: ControlPlane, store: Store) -> Replication:
    """The re-reads a server runs on a timer and on every NOTIFY, called by hand."""
    governance = Governance(plane, store, clock=time.time, authority=None)
    return Replication(store, plane, governance, RunbookRunner(plane, governance, clock=time.time))


@pytest.mark.parametrize("paused_on", ["a", "b"])
def test_an_import_on_one_replica_relabels_a_laptop_another_serves(
    pg_dsn: str, paused_on: str
) -> None:
    """A serves the laptop as org=marketing; an operator's import on B says finance.
    Once A re-reads, as it does on B's NOTIFY, the laptop is finance on A too: a pause by
    ``--selector org=finance``, created on either replica, covers it, and A tells it so."""

    async def body(plane_a: ControlPlane, plane_b: ControlPlane) -> None:
        # The re-reads only read: a store of their own on the same database will do.
        database = await PostgresStore.open(pg_dsn)
        try:
            await relabelled_elsewhere(plane_a, plane_b, database)
        finally:
            await database.close()

    async def relabelled_elsewhere(
        plane_a: ControlPlane, plane_b: ControlPlane, database: Store
    ) -> None:
        replication_a = replication_of(plane_a, database)
        replication_b = replication_of(plane_b, database)
        session = Session(plane_a, "laptop")
        plane_a.connect("laptop", MARKETING, session)  # first use: pinned as marketing
        await plane_a.flush()
        await database.beat("a")
        await replication_b.resync_agents()
        shown = plane_b.agent_view("laptop")
        assert shown is not None and shown.status.connected, "B shows it, served by A"

        tally = await plane_b.expect_agents([("laptop", FINANCE)], IC)
        assert (tally.added, tally.relabelled) == (0, 1), "relabelled wherever it is served"
        view_a = plane_a.agent_view("laptop")
        assert view_a is not None and dict(view_a.labels) == MARKETING, "A has not re-read"

        plane = plane_a if paused_on == "a" else plane_b
        await plane.create_hold(Scope.selector({"org": "finance"}), "leak", "INC-1", IC)
        notified = session.notified
        await replication_a.resync()

        view_a = plane_a.agent_view("laptop")
        assert view_a is not None and dict(view_a.labels) == FINANCE
        directive = plane_a.directive_for("laptop")
        assert directive.desired.mode is Mode.PAUSED
        assert session.notified > notified, "A sends the new directive at once"
        assert not plane_a.grant_lease("laptop").granted
        # The laptop still says marketing: A shows the contradiction.
        assert plane_a.census().label_mismatches == 1
        # Both replicas, and a restarted one, agree on the labels.
        view_b = plane_b.agent_view("laptop")
        assert view_b is not None and dict(view_b.labels) == FINANCE
        stored = await database.load_agent("laptop")
        assert stored is not None and stored.labels == FINANCE
        entries, _ = await database.read_audit(0, 1000)
        relabels = [e.record for e in entries if e.record.action == "agent.relabel"]
        assert [(r.actor, r.target, r.detail) for r in relabels] == [
            ("ic-1", "laptop", "org: marketing -> finance")
        ]

    two_replicas(pg_dsn, body)
