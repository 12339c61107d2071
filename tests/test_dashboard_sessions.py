"""Dashboard sessions: single-use links, expiry, revocation reaching the browser, and
sessions any replica can check (they live in the store)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable
from collections.abc import Callable

from control.domain.identity import Principal
from control.domain.identity import Role
from control.store import Store
from control.web.sessions import LOGIN_TOKEN_SECONDS
from control.web.sessions import SESSION_SECONDS
from control.web.sessions import DashboardSessions
from tests.fake_clock import FakeClock
from tests.store_contract import Backend
from tests.store_contract import run_with_store

SRE = Principal("sre-1", Role.SRE, serial="5e")


def with_sessions(
    backend: Backend,
    body: Callable[[DashboardSessions, FakeClock, set[str]], Awaitable[None]],
) -> None:
    async def main(store: Store) -> None:
        clock, revoked = FakeClock(), set[str]()
        await body(DashboardSessions(store, clock, revoked.__contains__), clock, revoked)

    run_with_store(backend, main)


async def log_in(sessions: DashboardSessions, on: DashboardSessions | None = None) -> str:
    """A login link issued by ``sessions`` and redeemed (``on`` another replica, if
    given): the id of the session it opened."""
    token, _ = await sessions.issue_login(SRE)
    redeemed = await (on or sessions).redeem(token)
    assert redeemed is not None
    return redeemed[0]


def test_a_login_link_works_once_and_a_session_ends_on_time(backend: Backend) -> None:
    async def body(sessions: DashboardSessions, clock: FakeClock, revoked: set[str]) -> None:
        token, expires_at = await sessions.issue_login(SRE)
        assert expires_at == 1000.0 + LOGIN_TOKEN_SECONDS
        redeemed = await sessions.redeem(token)
        assert redeemed is not None
        session_id, session = redeemed
        assert session.principal == SRE and await sessions.principal(session_id) == SRE
        assert await sessions.redeem(token) is None, "single use"
        clock.now += SESSION_SECONDS
        assert await sessions.principal(session_id) is None

    with_sessions(backend, body)


def test_a_stale_link_is_refused(backend: Backend) -> None:
    async def body(sessions: DashboardSessions, clock: FakeClock, revoked: set[str]) -> None:
        token, _ = await sessions.issue_login(SRE)
        clock.now += LOGIN_TOKEN_SECONDS
        assert await sessions.redeem(token) is None

    with_sessions(backend, body)


def test_revoking_the_certificate_ends_its_browser_sessions(backend: Backend) -> None:
    async def body(sessions: DashboardSessions, clock: FakeClock, revoked: set[str]) -> None:
        pending, _ = await sessions.issue_login(SRE)
        session_id = await log_in(sessions)
        revoked.add(SRE.serial)
        assert await sessions.principal(session_id) is None
        assert await sessions.redeem(pending) is None

    with_sessions(backend, body)


def test_logout_ends_the_session_and_the_store_keeps_only_hashes(backend: Backend) -> None:
    async def body(sessions: DashboardSessions, clock: FakeClock, revoked: set[str]) -> None:
        session_id = await log_in(sessions)
        await sessions.end(session_id)
        assert await sessions.principal(session_id) is None

        # The login link is used up, the session ended: nothing is left to steal.
        assert backend.sql("SELECT key FROM dashboard_sessions") == []
        live, _ = await sessions.issue_login(SRE)
        ((key,),) = backend.sql("SELECT key FROM dashboard_sessions")
        assert key == hashlib.sha256(live.encode()).hexdigest() and live not in key

    with_sessions(backend, body)


def with_two_replicas(
    backend: Backend, body: Callable[[DashboardSessions, DashboardSessions], Awaitable[None]]
) -> None:
    """Two stores on one database: what two replicas see."""

    async def main(first: Store) -> None:
        second = await backend.open()
        try:
            clock = FakeClock()
            await body(DashboardSessions(first, clock), DashboardSessions(second, clock))
        finally:
            await second.close()

    run_with_store(backend, main)


def test_a_session_made_on_one_replica_works_on_another(backend: Backend) -> None:
    """A link issued by one replica is redeemed on the other, the session works on
    both, and a logout on either ends it."""

    async def body(one: DashboardSessions, two: DashboardSessions) -> None:
        token, _ = await one.issue_login(SRE)
        redeemed = await two.redeem(token)
        assert redeemed is not None
        assert await one.principal(redeemed[0]) == SRE
        assert await one.redeem(token) is None, "used up on the other replica"
        await two.end(redeemed[0])
        assert await one.principal(redeemed[0]) is None

    with_two_replicas(backend, body)


def test_two_replicas_redeeming_one_link_at_once_log_in_once(backend: Backend) -> None:
    async def body(one: DashboardSessions, two: DashboardSessions) -> None:
        token, _ = await one.issue_login(SRE)
        results = await asyncio.gather(one.redeem(token), two.redeem(token))
        assert sum(result is not None for result in results) == 1

    with_two_replicas(backend, body)
