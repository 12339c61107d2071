"""The ``Store`` contract, against both stores: enrolment tokens, one valid certificate
per agent id, and revocation.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from control.domain.identity import EnrollToken
from control.domain.identity import hash_secret
from control.errors import Conflict
from control.errors import NotFound
from control.errors import PermissionDenied
from control.store import Store
from control.store import enrolment
from control.store.postgres import MIGRATIONS as PG_MIGRATIONS
from control.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from tests.store_contract import Backend
from tests.store_contract import PostgresBackend
from tests.store_contract import agent_cert
from tests.store_contract import audit_actions
from tests.store_contract import certificate
from tests.store_contract import draft
from tests.store_contract import record
from tests.store_contract import resume_request
from tests.store_contract import run_with_store


def test_requests_and_revocations_survive_reopen(backend: Backend) -> None:
    edited = dataclasses.replace(resume_request("h1"), revision=3, approvals=())

    async def write(store: Store) -> None:
        await store.create_hold(draft("h1"), record("pause"))
        await store.save_resume_request(resume_request("h1"), record("resume_requested"))
        await store.save_resume_request(edited, record("resume_edited"))
        await store.record_certificate(certificate("01", "sre-1"), record("cert_issued"))
        await store.record_certificate(certificate("02", "sre-2"), record("cert_issued"))
        await store.revoke_certificates("02", 1500.0, record("cert_revoked"))

    async def read(store: Store) -> None:
        state = await store.load()
        assert state.shared.resume_requests == [edited]
        assert state.shared.revoked == {"02": "sre-2"}
        assert [c.revoked_at for c in await store.list_certificates()] == [None, 1500.0]

    run_with_store(backend, write)
    run_with_store(backend, read)


def test_enroll_token_uses_are_taken_one_at_a_time(backend: Backend) -> None:
    token = EnrollToken("t1", hash_secret("right"), 2, 5000.0, "sre-1", 1000.0)

    async def uses_left() -> int:
        rows = await asyncio.to_thread(backend.sql, "SELECT uses_left FROM enroll_tokens")
        return int(rows[0][0])

    async def body(store: Store) -> None:
        await store.create_enroll_token(token, record("token_created"))
        with pytest.raises(Conflict, match="enrolment token 't1' already exists"):
            await store.create_enroll_token(token, record("token_created"))
        await store.enrol_agent("t1", "right", agent_cert("01", "a"), record("enrolled"))
        assert await uses_left() == 1

        async def refusal(token_id: str, secret: str, now: float) -> str:
            with pytest.raises(PermissionDenied) as refused:
                await store.enrol_agent(token_id, secret, agent_cert("02", "b", now), record("x"))
            return str(refused.value)

        assert await refusal("t1", "wrong", 1000.0) == "unknown enrolment token"
        assert await refusal("t9", "right", 1000.0) == "unknown enrolment token"
        assert await refusal("t1", "right", 5000.0) == "enrolment token expired"
        assert await uses_left() == 1, "refusals take no use"
        await store.enrol_agent("t1", "right", agent_cert("03", "c"), record("enrolled"))
        assert await refusal("t1", "right", 1000.0) == "enrolment token has no uses left"
        assert await uses_left() == 0
        assert [c.serial for c in await store.list_certificates()] == ["01", "03"]
        assert await audit_actions(store) == ["token_created", "enrolled", "enrolled"]

    run_with_store(backend, body)


def test_an_agent_id_holds_one_valid_certificate(backend: Backend) -> None:
    """A second enrolment is refused while the first certificate is valid, and takes
    no token use; a revoked or an expired one no longer counts."""
    token = EnrollToken("t1", hash_secret("s"), 9, 99_000.0, "ic-1", 1000.0)

    async def body(store: Store) -> None:
        await store.create_enroll_token(token, record("token_created"))
        await store.enrol_agent("t1", "s", agent_cert("01", "laptop-1"), record("enrolled"))
        with pytest.raises(Conflict, match=r"laptop-1 already has a valid certificate \(serial 01"):
            await store.enrol_agent("t1", "s", agent_cert("02", "laptop-1", 1500.0), record("x"))
        await store.revoke_certificates("01", 1600.0, record("cert_revoked"))
        await store.enrol_agent("t1", "s", agent_cert("03", "laptop-1", 1700.0), record("enrolled"))
        # 03 expires at 2700.
        with pytest.raises(Conflict, match=r"\(serial 03\)"):
            await store.enrol_agent("t1", "s", agent_cert("04", "laptop-1", 2699.0), record("x"))
        await store.enrol_agent("t1", "s", agent_cert("05", "laptop-1", 2700.0), record("enrolled"))
        assert [c.serial for c in await store.list_certificates()] == ["01", "03", "05"]
        rows = await asyncio.to_thread(backend.sql, "SELECT uses_left FROM enroll_tokens")
        assert rows == [(6,)], "refused enrolments take no use"

    run_with_store(backend, body)


def test_concurrent_enrolments_of_one_agent_id_issue_one_certificate(backend: Backend) -> None:
    """Two stores on one database (replicas, on PostgreSQL) or one store, enrolling one
    id with two tokens at once, ten times over: each time exactly one wins."""
    rounds = 10

    async def body(store: Store) -> None:
        other = await backend.open() if isinstance(backend, PostgresBackend) else store
        try:
            for n in range(rounds):
                for token_id in (f"a{n}", f"b{n}"):
                    await store.create_enroll_token(
                        EnrollToken(token_id, hash_secret("s"), 1, 9000.0, "ic-1", 1000.0),
                        record("token_created"),
                    )
                outcomes = await asyncio.gather(
                    store.enrol_agent(f"a{n}", "s", agent_cert(f"a{n}", f"l{n}"), record("e")),
                    other.enrol_agent(f"b{n}", "s", agent_cert(f"b{n}", f"l{n}"), record("e")),
                    return_exceptions=True,
                )
                refused = [o for o in outcomes if isinstance(o, BaseException)]
                assert len(refused) == 1, outcomes
                assert isinstance(refused[0], Conflict), refused
                assert "already has a valid certificate" in str(refused[0])
        finally:
            if other is not store:
                await other.close()
        subjects = [c.subject for c in await store.list_certificates()]
        assert sorted(subjects) == sorted(f"l{n}" for n in range(rounds))

    run_with_store(backend, body)


def test_migration_gives_the_claim_to_each_agents_newest_certificate(backend: Backend) -> None:
    """A database from before the constraint, holding two live certificates of one agent
    (the bug), migrates: the newest holds the claim, and both still refuse enrolment."""

    async def before(store: Store) -> None:
        for serial, issued_at in (("01", 1000.0), ("02", 1100.0)):
            await store.record_certificate(agent_cert(serial, "laptop-1", issued_at), None)
        await store.create_enroll_token(
            EnrollToken("t1", hash_secret("s"), 1, 9000.0, "ic-1", 1000.0), record("t")
        )

    async def after(store: Store) -> None:
        with pytest.raises(Conflict, match=r"\(serial 01\)"):
            await store.enrol_agent("t1", "s", agent_cert("03", "laptop-1", 1200.0), record("x"))

    run_with_store(backend, before)
    backend.sql("DROP INDEX certificates_one_enrolment_claim")
    backend.sql("ALTER TABLE certificates DROP COLUMN enrolment_claim")
    if isinstance(backend, PostgresBackend):
        before_claims = PG_MIGRATIONS.index(enrolment.CLAIM_MIGRATION)
        backend.sql(f"DELETE FROM schema_version WHERE version > {before_claims}")
    else:
        backend.set_schema_version(SQLITE_MIGRATIONS.index(enrolment.CLAIM_MIGRATION))
    run_with_store(backend, after)
    claims = backend.sql("SELECT serial FROM certificates WHERE enrolment_claim = 'laptop-1'")
    assert claims == [("02",)]


def test_revocation_by_serial_and_by_subject(backend: Backend) -> None:
    async def body(store: Store) -> None:
        for cert in (
            certificate("01", "alice", issued_at=1000.0),
            certificate("02", "alice", issued_at=1100.0),
            certificate("03", "alice", issued_at=1200.0),
            certificate("04", "bob"),
        ):
            await store.record_certificate(cert, None)
        with pytest.raises(Conflict, match="certificate with serial 04 already exists"):
            await store.record_certificate(certificate("04", "bob"), None)

        by_serial = await store.revoke_certificates("02", 1500.0, record("cert_revoked"))
        assert [(c.serial, c.revoked_at) for c in by_serial] == [("02", 1500.0)]
        by_subject = await store.revoke_certificates("alice", 1600.0, record("cert_revoked"))
        assert [(c.serial, c.revoked_at) for c in by_subject] == [("01", 1600.0), ("03", 1600.0)]
        with pytest.raises(Conflict, match="every certificate matching 'alice' is already"):
            await store.revoke_certificates("alice", 1700.0, record("cert_revoked"))
        with pytest.raises(NotFound, match="no certificate with subject or serial 'carol'"):
            await store.revoke_certificates("carol", 1700.0, record("cert_revoked"))

        revoked_at = {c.serial: c.revoked_at for c in await store.list_certificates()}
        assert revoked_at == {"01": 1600.0, "02": 1500.0, "03": 1600.0, "04": None}
        assert set((await store.load()).shared.revoked) == {"01", "02", "03"}
        assert await audit_actions(store) == ["cert_revoked", "cert_revoked"]

    run_with_store(backend, body)


def test_a_join_token_keeps_the_labels_it_pins(backend: Backend) -> None:
    pinned = EnrollToken(
        "t1", hash_secret("s"), 1, 5000.0, "ic-1", 1000.0, {"org": "finance", "ring": "canary"}
    )
    plain = EnrollToken("t2", hash_secret("s"), 1, 5000.0, "ic-1", 1000.0)

    async def body(store: Store) -> None:
        await store.create_enroll_token(pinned, record("token_created"))
        await store.create_enroll_token(plain, record("token_created"))
        # The token as it was before this use: what the enrolment pins.
        enrolled = await store.enrol_agent("t1", "s", agent_cert("01", "a"), record("enrolled"))
        assert enrolled == pinned
        assert (await store.enrol_agent("t2", "s", agent_cert("02", "b"), record("e"))).labels == {}

    run_with_store(backend, body)
