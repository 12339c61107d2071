"""Browser sessions for the dashboard, handed out through an authenticated gRPC call.

Browsers have no client certificate, so an operator (or employee) with an identity
asks the API for a one-time login link; redeeming it sets a session cookie that
carries that identity's name and role. Both are kept in the store, so that every
replica behind a load balancer knows them; the store keeps a SHA-256 of each secret,
never the secret, so reading the database does not log anyone in.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable

from control.domain.identity import Principal
from control.store import DashboardSession
from control.store import Store

LOGIN_TOKEN_SECONDS = 120.0
SESSION_SECONDS = 12 * 3600.0
LOGIN, SESSION = "login", "session"
# A login link shown on its confirmation page: bound to that browser and that link.
CONFIRM = "confirm"


def _key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class DashboardSessions:
    def __init__(
        self,
        store: Store,
        clock: Callable[[], float],
        is_revoked: Callable[[str], bool] = lambda _: False,
    ) -> None:
        self._store = store
        self._clock = clock
        # A revoked certificate ends the browser sessions it opened, not just its gRPC calls.
        self._is_revoked = is_revoked

    async def _issue(
        self, kind: str, principal: Principal, lifetime: float
    ) -> tuple[str, DashboardSession]:
        secret = secrets.token_urlsafe(32 if kind == SESSION else 24)
        now = self._clock()
        session = DashboardSession(_key(secret), kind, principal, now + lifetime)
        await self._store.save_dashboard_session(session, now)
        return secret, session

    async def issue_login(self, principal: Principal) -> tuple[str, float]:
        """A single-use token, short-lived because it travels in a URL."""
        token, login = await self._issue(LOGIN, principal, LOGIN_TOKEN_SECONDS)
        return token, login.expires_at

    async def pending_login(self, token: str) -> DashboardSession | None:
        """Who a login link would sign in as, without using it up (the confirmation page)."""
        login = await self._store.dashboard_session(_key(token), LOGIN)
        return login if login is not None and self._valid(login) else None

    async def offer_confirmation(self, login: DashboardSession, browser: str, token: str) -> str:
        """A CSRF token for the confirmation form, bound server-side to this browser's
        pre-session (``browser``, a cookie) and to this link: a form posted from
        another site, or with another link, names no record and is refused."""
        csrf = secrets.token_urlsafe(24)
        record = DashboardSession(
            _key(f"{browser}:{csrf}:{token}"), CONFIRM, login.principal, login.expires_at
        )
        await self._store.save_dashboard_session(record, self._clock())
        return csrf

    async def confirm(
        self, browser: str, csrf: str, token: str
    ) -> tuple[str, DashboardSession] | None:
        """The confirmation form was posted: redeem the link if this browser was shown it."""
        offer = await self._store.delete_dashboard_session(
            _key(f"{browser}:{csrf}:{token}"), CONFIRM
        )
        if offer is None or offer.expires_at <= self._clock():
            return None
        return await self.redeem(token)

    async def redeem(self, token: str) -> tuple[str, DashboardSession] | None:
        """Trade a login token for a session id (the cookie); ``None`` if unknown or stale."""
        login = await self._store.delete_dashboard_session(_key(token), LOGIN)
        if login is None or not self._valid(login):
            return None
        return await self._issue(SESSION, login.principal, SESSION_SECONDS)

    async def open(self, principal: Principal) -> str:
        """A session for someone the company's SSO vouched for (``oidc.py``): the id."""
        session_id, _ = await self._issue(SESSION, principal, SESSION_SECONDS)
        return session_id

    async def principal(self, session_id: str) -> Principal | None:
        session = await self._store.dashboard_session(_key(session_id), SESSION)
        if session is None:
            return None
        if not self._valid(session):
            await self.end(session_id)
            return None
        return session.principal

    def _valid(self, session: DashboardSession) -> bool:
        serial = session.principal.serial
        return session.expires_at > self._clock() and not (serial and self._is_revoked(serial))

    async def end(self, session_id: str) -> None:
        await self._store.delete_dashboard_session(_key(session_id), SESSION)
