"""Signing in to the dashboard and out of it: login links, their confirmation, logout.

A login link does not sign in by being opened: anyone can make a browser open a
URL, so a GET that signed in would let someone replace your session with theirs
(login CSRF) and watch what you look at. Opening the link shows who it signs in as;
signing in is a POST of that page's form, whose CSRF token is bound server-side to
this browser's pre-session cookie and to the link. Opening the page does not use
the link up; the POST does, once.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Awaitable
from collections.abc import Callable

from aiohttp import web

from control.domain.identity import Principal
from control.errors import StoreError
from control.web import pages
from control.web.api import may_view
from control.web.headers import harden
from control.web.sessions import LOGIN_TOKEN_SECONDS
from control.web.sessions import SESSION_SECONDS
from control.web.sessions import DashboardSessions

SESSION_COOKIE = "killswitch_session"
# The pre-session: which browser was shown a confirmation page (only sent to /login).
LOGIN_COOKIE = "killswitch_login"
MAX_SECRET_CHARS = 100


def _secret(text: str | None) -> str:
    """A token, session id or CSRF token as sent, or "" when absent or absurdly long."""
    return text if text and len(text) <= MAX_SECRET_CHARS else ""


class Login:
    def __init__(
        self,
        sessions: DashboardSessions,
        *,
        secure_cookies: bool,
        unavailable: Callable[[], web.Response],
        refusal: Callable[[], web.Response],
    ) -> None:
        self._sessions = sessions
        # True when browsers reach the dashboard over https (``serve --public-url``):
        # TLS ends at a proxy, so the request itself looks like plain http.
        self._secure_cookies = secure_cookies
        self._unavailable = unavailable
        self._refusal = refusal

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/login", self._guarded(self._show)),
            web.post("/login", self._guarded(self._sign_in)),
            web.get("/logout", self._guarded(self._logout)),
            web.post("/logout", self._guarded(self._logout)),
        ]

    def _guarded(
        self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                return harden(await handler(request))
            except StoreError:
                return harden(self._unavailable())

        return guarded

    def _set_cookie(
        self, response: web.StreamResponse, name: str, value: str, seconds: float, path: str
    ) -> None:
        response.set_cookie(
            name,
            value,
            max_age=int(seconds),
            path=path,
            httponly=True,
            samesite="Strict",
            secure=self._secure_cookies,
        )

    @staticmethod
    def _link_not_valid() -> web.Response:
        page = pages.message_page(
            "Login link not valid",
            "<p>This login link is unknown, expired or already used.</p>" + pages.LOGIN_HELP,
        )
        return web.Response(status=401, text=page, content_type="text/html")

    async def _show(self, request: web.Request) -> web.StreamResponse:
        """GET /login?token=T: "Sign in as X, role Y?", and the form that does it."""
        token = _secret(request.query.get("token"))
        login = await self._sessions.pending_login(token) if token else None
        if login is None:
            return self._link_not_valid()
        if not may_view(login.principal):
            return self._refusal()
        browser = _secret(request.cookies.get(LOGIN_COOKIE)) or secrets.token_urlsafe(24)
        csrf = await self._sessions.offer_confirmation(login, browser, token)
        current = None
        if session_id := _secret(request.cookies.get(SESSION_COOKIE)):
            current = await self._sessions.principal(session_id)
        page = confirmation_page(login.principal, token, csrf, current)
        response = web.Response(text=page, content_type="text/html")
        self._set_cookie(response, LOGIN_COOKIE, browser, LOGIN_TOKEN_SECONDS, "/login")
        return response

    async def _sign_in(self, request: web.Request) -> web.StreamResponse:
        """POST /login: the confirmation form; trades the link for a session cookie."""
        form = await request.post()
        token, csrf = _secret(str(form.get("token", ""))), _secret(str(form.get("csrf", "")))
        browser = _secret(request.cookies.get(LOGIN_COOKIE))
        redeemed = None
        if token and csrf and browser:
            redeemed = await self._sessions.confirm(browser, csrf, token)
        if redeemed is None:
            page = pages.message_page(
                "Sign-in not confirmed",
                "<p>This sign-in was not confirmed from this browser, or its link expired"
                " or was already used. Open your login link again.</p>" + pages.LOGIN_HELP,
            )
            return web.Response(status=403, text=page, content_type="text/html")
        if old := _secret(request.cookies.get(SESSION_COOKIE)):
            await self._sessions.end(old)  # a new sign-in replaces this browser's session
        session_id, session = redeemed
        if not may_view(session.principal):  # changed role between page and POST
            with contextlib.suppress(StoreError):  # it expires by itself anyway
                await self._sessions.end(session_id)
            return self._refusal()
        response = web.Response(status=303, headers={"Location": "/"})
        self._set_cookie(response, SESSION_COOKIE, session_id, SESSION_SECONDS, "/")
        response.del_cookie(LOGIN_COOKIE, path="/login")
        return response

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        # If the store fails the cookie stays, and so would the session: say so (503).
        if session_id := _secret(request.cookies.get(SESSION_COOKIE)):
            await self._sessions.end(session_id)
        page = pages.message_page(
            "Logged out", "<p>Your dashboard session has ended.</p>" + pages.LOGIN_HELP
        )
        response = web.Response(text=page, content_type="text/html")
        response.del_cookie(SESSION_COOKIE, path="/")
        return response


def confirmation_page(
    principal: Principal, token: str, csrf: str, current: Principal | None
) -> str:
    """A plain form (no script needed): what the link signs in as, and one button."""
    who = f"{pages.e(principal.name)}, role {pages.e(principal.role.value)}"
    replaces = ""
    if current is not None:
        replaces = (
            f"<p>This browser is signed in as {pages.e(current.name)}"
            f" ({pages.e(current.role.value)}); signing in ends that session.</p>"
        )
    return pages.message_page(
        "Sign in to the dashboard",
        f'<p id="login-as">Sign in as <strong>{who}</strong>?</p>{replaces}'
        "<p>If you did not open this link from <code>killswitch dashboard</code> yourself,"
        " close this page.</p>"
        '<form method="post" action="/login" id="login-form">'
        f'<input type="hidden" name="token" value="{pages.e(token)}">'
        f'<input type="hidden" name="csrf" value="{pages.e(csrf)}">'
        f'<button type="submit" id="login-confirm">Sign in as {pages.e(principal.name)}</button>'
        "</form>",
    )
