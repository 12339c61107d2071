"""Dashboard sessions: single-use links, expiry, and revocation reaching the browser."""

from __future__ import annotations

from control.domain.identity import Principal, Role
from control.web.sessions import LOGIN_TOKEN_SECONDS, SESSION_SECONDS, DashboardSessions

SRE = Principal("sre-1", Role.SRE, serial="5e")


def test_a_login_link_works_once_and_a_session_ends_on_time() -> None:
    now = [1000.0]
    sessions = DashboardSessions(lambda: now[0])
    token, expires_at = sessions.issue_login(SRE)
    assert expires_at == 1000.0 + LOGIN_TOKEN_SECONDS
    redeemed = sessions.redeem(token)
    assert redeemed is not None
    session_id, session = redeemed
    assert session.principal == SRE and sessions.principal(session_id) == SRE
    assert sessions.redeem(token) is None, "single use"
    now[0] += SESSION_SECONDS
    assert sessions.principal(session_id) is None


def test_a_stale_link_is_refused() -> None:
    now = [1000.0]
    sessions = DashboardSessions(lambda: now[0])
    token, _ = sessions.issue_login(SRE)
    now[0] += LOGIN_TOKEN_SECONDS
    assert sessions.redeem(token) is None


def test_revoking_the_certificate_ends_its_browser_sessions() -> None:
    revoked: set[str] = set()
    sessions = DashboardSessions(lambda: 1000.0, revoked.__contains__)
    pending, _ = sessions.issue_login(SRE)
    token, _ = sessions.issue_login(SRE)
    redeemed = sessions.redeem(token)
    assert redeemed is not None
    revoked.add(SRE.serial)
    assert sessions.principal(redeemed[0]) is None
    assert sessions.redeem(pending) is None
