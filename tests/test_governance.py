"""Governance with a real store and a real CA: enrolment rules that depend on time."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent_stub.identity import new_key_and_csr
from control.domain.audit import AuditRecord
from control.domain.identity import issue_enroll_token
from control.errors import Conflict
from control.errors import StoreError
from control.governance import Governance
from control.pki import AGENT_DAYS
from control.pki import Authority
from control.pki import initialise
from control.plane import ControlPlane
from control.store.sqlite import SqliteStore

DAY = 24 * 3600.0


def test_an_expired_agent_certificate_does_not_block_re_enrolment(tmp_path: Path) -> None:
    """A laptop whose 90-day certificate ran out enrols again; a live one may not be taken."""

    async def scenario() -> None:
        now = [1_800_000_000.0]
        initialise(tmp_path, now=now[0])
        store = await SqliteStore.open(tmp_path)
        plane = ControlPlane(store, clock=lambda: now[0], flush_interval=3600)
        governance = Governance(
            plane, store, clock=lambda: now[0], authority=Authority.load(tmp_path)
        )
        await governance.start(await plane.start())

        async def token() -> str:
            issued = issue_enroll_token(uses=2, ttl=DAY, created_by="ic-1", now=now[0])
            record = AuditRecord(now[0], "test", "system", "enroll_token.create")
            await store.create_enroll_token(issued.token, record)
            return issued.text

        _, csr = new_key_and_csr()
        first = await token()
        await governance.enroll(first, "laptop-1", csr.decode(), source="10.0.0.1")
        with pytest.raises(Conflict, match="already has a valid certificate"):
            await governance.enroll(first, "laptop-1", csr.decode(), source="10.0.0.1")
        now[0] += AGENT_DAYS * DAY + 1
        await governance.enroll(await token(), "laptop-1", csr.decode(), source="10.0.0.1")
        await plane.stop()
        await store.close()

    asyncio.run(scenario())


def test_a_certificate_whose_labels_cannot_be_pinned_is_revoked_and_blocks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The certificate is recorded before the token's labels are pinned; if pinning fails
    the agent never gets it, so it must not count as the agent's valid certificate."""

    async def scenario() -> None:
        now = 1_800_000_000.0
        initialise(tmp_path, now=now)
        store = await SqliteStore.open(tmp_path)
        plane = ControlPlane(store, clock=lambda: now, flush_interval=3600)
        governance = Governance(plane, store, clock=lambda: now, authority=Authority.load(tmp_path))
        await governance.start(await plane.start())
        issued = issue_enroll_token(
            uses=2, ttl=DAY, created_by="ic-1", now=now, labels={"org": "finance"}
        )
        await store.create_enroll_token(issued.token, AuditRecord(now, "t", "system", "token"))
        _, csr = new_key_and_csr()

        async def store_down(*args: object, **kwargs: object) -> None:
            raise StoreError("database is locked")

        with monkeypatch.context() as patched:
            patched.setattr(plane, "expect_agents", store_down)
            with pytest.raises(StoreError, match="database is locked"):
                await governance.enroll(issued.text, "laptop-1", csr.decode(), source="10.0.0.1")
        (undelivered,) = await store.list_certificates()
        assert undelivered.subject == "laptop-1" and undelivered.revoked
        await governance.enroll(issued.text, "laptop-1", csr.decode(), source="10.0.0.1")
        view = plane.agent_view("laptop-1")
        assert view is not None and view.labels == {"org": "finance"}
        await plane.stop()
        await store.close()

    asyncio.run(scenario())
