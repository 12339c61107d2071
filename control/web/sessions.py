"""Browser sessions for the dashboard, handed out through an authenticated gRPC call.

Browsers have no client certificate, so an operator (or employee) with an identity
asks the API for a one-time login link; redeeming it sets a session cookie that
carries that identity's name and role. Both live in memory only: a restarted
server asks everyone to log in again, which is the safe failure.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

from control.domain.identity import Principal

LOGIN_TOKEN_SECONDS = 120.0
SESSION_SECONDS = 12 * 3600.0


@dataclass(frozen=True, slots=True)
class Session:
    principal: Principal
    expires_at: float


class DashboardSessions:
    def __init__(
        self, clock: Callable[[], float], is_revoked: Callable[[str], bool] = lambda _: False
    ) -> None:
        self._clock = clock
        # A revoked certificate ends the browser sessions it opened, not just its gRPC calls.
        self._is_revoked = is_revoked
        self._login_tokens: dict[str, Session] = {}
        self._sessions: dict[str, Session] = {}

    def issue_login(self, principal: Principal) -> tuple[str, float]:
        """A single-use token, short-lived because it travels in a URL."""
        self._forget_expired()
        token = secrets.token_urlsafe(24)
        expires_at = self._clock() + LOGIN_TOKEN_SECONDS
        self._login_tokens[token] = Session(principal, expires_at)
        return token, expires_at

    def redeem(self, token: str) -> tuple[str, Session] | None:
        """Trade a login token for a session id (the cookie); ``None`` if unknown or stale."""
        login = self._login_tokens.pop(token, None)
        if login is None or not self._valid(login):
            return None
        session_id = secrets.token_urlsafe(32)
        session = Session(login.principal, self._clock() + SESSION_SECONDS)
        self._sessions[session_id] = session
        return session_id, session

    def principal(self, session_id: str) -> Principal | None:
        session = self._sessions.get(session_id)
        if session is None or not self._valid(session):
            self._sessions.pop(session_id, None)
            return None
        return session.principal

    def _valid(self, session: Session) -> bool:
        serial = session.principal.serial
        return session.expires_at > self._clock() and not (serial and self._is_revoked(serial))

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def _forget_expired(self) -> None:
        now = self._clock()
        for table in (self._login_tokens, self._sessions):
            for key in [k for k, s in table.items() if s.expires_at <= now]:
                del table[key]
