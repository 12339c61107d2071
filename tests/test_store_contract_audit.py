"""The ``Store`` contract, against both stores: the audit log is chained, exact and
append-only, and an entry is logged only once its transaction commits.
"""

from __future__ import annotations

import dataclasses

import pytest
import structlog

from control.domain.audit import ChainHead
from control.domain.audit import verify_chain
from control.domain.identity import EnrollToken
from control.domain.identity import hash_secret
from control.errors import InvalidInput
from control.errors import NotFound
from control.store import Store
from tests.store_contract import Backend
from tests.store_contract import SqlRefused
from tests.store_contract import agent_cert
from tests.store_contract import audit_actions
from tests.store_contract import certificate
from tests.store_contract import draft
from tests.store_contract import record
from tests.store_contract import resume_request
from tests.store_contract import run_with_store


def test_every_write_chains_its_audit_entries_and_moves_the_head(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.create_hold(draft("h1"), record("pause", target="h1"))
        await store.save_agents([], [record("agent_enrolled", "laptop-1")])
        await store.append_audit([record("denied", "eve"), record("audit_read", "sre-1")])
        await store.save_resume_request(resume_request("h1"), record("resume_requested"))
        await store.create_enroll_token(
            EnrollToken("t1", hash_secret("s"), 1, 9000.0, "sre-1", 1000.0),
            record("token_created", "sre-1"),
        )
        await store.record_certificate(certificate("01", "sre-1"), record("cert_issued"))
        await store.record_certificate(certificate("02", "sre-2"), None)
        await store.revoke_certificates("01", 1500.0, record("cert_revoked"))
        await store.execute_resume(resume_request("h1"), 2000.0, record("resume", "approver-1"))
        await store.enrol_agent("t1", "s", agent_cert("03", "laptop-1"), record("enrolled"))
        await store.append_audit([])

        assert await audit_actions(store) == [
            "pause",
            "agent_enrolled",
            "denied",
            "audit_read",
            "resume_requested",
            "token_created",
            "cert_issued",
            "cert_revoked",
            "resume",
            "enrolled",
        ]
        entries, head = await store.read_audit(0, 1000)
        assert head == ChainHead(10, entries[-1].hash)
        assert entries[0].record == record("pause", target="h1")

    run_with_store(backend, body)


def test_timestamps_come_back_exact_and_hash_the_same(backend: Backend) -> None:
    awkward = [0.1 + 0.2, 1e-300, 1.7976931348623157e308, 1_700_000_000.123456789, 2**53 + 1]

    async def body(store: Store) -> None:
        await store.append_audit([record("tick", at=at) for at in awkward])
        hold = dataclasses.replace(draft("h1"), created_at=0.1 + 0.2)
        await store.create_hold(hold, record("pause"))
        entries, head = await store.read_audit(0, 100)
        assert verify_chain(entries, head) is None
        assert [e.record.at for e in entries[:-1]] == [float(at) for at in awkward]
        assert (await store.load()).shared.holds[0].created_at == 0.1 + 0.2

    run_with_store(backend, body)


def test_read_audit_pages_by_seq(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.append_audit([record(f"action-{n}") for n in range(1, 6)])
        page, head = await store.read_audit(after_seq=2, limit=2)
        assert [e.seq for e in page] == [3, 4]
        assert head.seq == 5
        assert (await store.read_audit(after_seq=5, limit=2))[0] == []
        with pytest.raises(InvalidInput, match="limit must be at least 1"):
            await store.read_audit(0, 0)

    run_with_store(backend, body)


def test_triggers_keep_the_audit_log_append_only(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.append_audit([record("one"), record("two")])

    run_with_store(backend, body)
    with pytest.raises(SqlRefused, match="entries cannot be changed"):
        backend.sql("UPDATE audit_log SET actor = 'someone-else' WHERE seq = 1")
    with pytest.raises(SqlRefused, match="entries cannot be deleted"):
        backend.sql("DELETE FROM audit_log WHERE seq = 2")
    with pytest.raises(SqlRefused, match="only moves forward"):
        backend.sql("UPDATE audit_head SET seq = 1")
    assert backend.sql("SELECT count(*), max(seq) FROM audit_log") == [(2, 2)]
    assert backend.sql("SELECT seq FROM audit_head") == [(2,)]


def test_appended_entries_are_logged_after_commit_only(backend: Backend) -> None:
    async def body(store: Store) -> None:
        with structlog.testing.capture_logs() as logs:
            await store.create_hold(draft("h1"), record("pause", "ic-7"))
            with pytest.raises(NotFound):
                await store.lift_hold("nope", "ic-7", 2000.0, record("resume", "ic-7"))
        _, head = await store.read_audit(0, 10)
        appended = [line for line in logs if line["event"] == "audit_appended"]
        assert appended == [
            {
                "event": "audit_appended",
                "log_level": "info",
                "seq": 1,
                "hash": head.hash,
                "action": "pause",
                "actor": "ic-7",
            }
        ]

    run_with_store(backend, body)
