"""Signing in to the dashboard with the company's SSO (OpenID Connect).

A VP who must pause the fleet has no certificate directory, but has a company
account. ``serve --oidc-issuer URL --oidc-client-id ID --oidc-client-secret-file F
--oidc-role GROUP=ROLE...`` lets such people in: the authorization code flow with
PKCE, then an ID token whose signature (the issuer's JWKS), issuer, audience, expiry
and nonce are all checked before its ``groups`` claim is mapped to a role. Someone in
no mapped group is refused with a page that says so. The one-time link from
``killswitch dashboard`` keeps working beside it.

Where the flow's secrets live: ``state``, ``nonce`` and the PKCE verifier go in one
HttpOnly cookie scoped to the callback path, so any replica can finish a sign-in
another one started. It is SameSite=Lax (the provider's redirect back is a
cross-site navigation, which a Strict cookie would miss); it proves the callback
comes to the browser that started the sign-in, which is what stops login CSRF.

The session cookie is SameSite=Strict, and a browser does not send a Strict cookie
on a navigation that a cross-site page started: so the callback answers with a page
that moves on to ``/`` itself, rather than with a redirect.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Awaitable
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from control.domain.identity import Principal
from control.domain.identity import Role
from control.domain.identity import parse_role
from control.errors import InvalidInput
from control.errors import KillswitchError
from control.errors import PermissionDenied
from control.errors import StoreError
from control.errors import one_line
from control.web import pages
from control.web.headers import harden
from control.web.login import SESSION_COOKIE
from control.web.sessions import SESSION_SECONDS
from control.web.sessions import DashboardSessions

log = structlog.get_logger("killswitch.web.oidc")

FLOW_COOKIE = "killswitch_oidc"
CALLBACK_PATH = "/oidc/callback"
FLOW_SECONDS = 600
PROVIDER_TIMEOUT_SECONDS = 10.0
# Metadata and keys are re-read this often (a provider rotates its keys), and at once
# when a token names a key we do not have.
PROVIDER_CACHE_SECONDS = 3600.0
# Asymmetric signatures only: never "none", never a MAC keyed by the client secret.
SIGNING_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384"]
DASHBOARD_ROLES = frozenset({Role.INCIDENT_COMMANDER, Role.APPROVER, Role.SRE, Role.EMPLOYEE})
MAX_NAME_CHARS = 100
SIGN_IN_ACTION = "Dashboard.SignIn"


@dataclass(frozen=True, slots=True)
class OidcSettings:
    """The ``serve --oidc-*`` options once checked (``load_settings``): SSO is either
    wholly configured or off, never half."""

    issuer: str
    client_id: str
    client_secret: str
    # (group, role): the first group of the list that the person is in gives the role.
    roles: tuple[tuple[str, Role], ...]
    groups_claim: str = "groups"


def parse_role_mapping(text: str) -> tuple[str, Role]:
    """``GROUP=ROLE`` from ``--oidc-role``; only roles a person may hold in the dashboard."""
    group, equals, role_text = text.partition("=")
    if not (equals and group.strip() and role_text.strip()):
        raise InvalidInput(f"--oidc-role {text!r}: expected GROUP=ROLE")
    role = parse_role(role_text.strip())
    if role not in DASHBOARD_ROLES:
        allowed = ", ".join(sorted(r.value for r in DASHBOARD_ROLES))
        raise InvalidInput(f"--oidc-role {text!r}: a group maps to one of {allowed}")
    return group.strip(), role


def load_settings(
    issuer: str, client_id: str, secret_file: str, roles: list[str]
) -> OidcSettings | None:
    """The ``serve --oidc-*`` options, checked; ``None`` when SSO is not configured."""
    if not (issuer or client_id or secret_file or roles):
        return None
    if not (issuer and client_id and secret_file and roles):
        raise InvalidInput(
            "SSO needs --oidc-issuer, --oidc-client-id, --oidc-client-secret-file"
            " and at least one --oidc-role GROUP=ROLE"
        )
    if not issuer.startswith(("https://", "http://localhost", "http://127.0.0.1")):
        raise InvalidInput(f"--oidc-issuer {issuer!r}: must be https (http only on loopback)")
    mapping = tuple(parse_role_mapping(r) for r in roles)
    try:
        secret = Path(secret_file).read_text().strip()
    except OSError as exc:
        raise InvalidInput(f"cannot read --oidc-client-secret-file: {exc.strerror}") from None
    if not secret:
        raise InvalidInput(f"--oidc-client-secret-file {secret_file} is empty")
    return OidcSettings(issuer.rstrip("/"), client_id, secret, mapping)


class ProviderError(KillswitchError):
    """The OpenID provider did not answer, or answered nonsense."""


class OpenIdProvider:
    """The issuer's metadata and keys (cached), its token endpoint, and ID token checks."""

    def __init__(self, settings: OidcSettings) -> None:
        self._settings = settings
        self._metadata: dict[str, Any] = {}
        self._keys: KeySet | None = None
        self._read_at = 0.0

    async def _get_json(
        self, url: str, *, data: dict[str, str] | None = None, auth: aiohttp.BasicAuth | None = None
    ) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=PROVIDER_TIMEOUT_SECONDS)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as client:
                method = "POST" if data is not None else "GET"
                async with client.request(method, url, data=data, auth=auth) as response:
                    body = await response.json(content_type=None)
                    if not isinstance(body, dict) or response.status >= 500:
                        raise ProviderError(f"{url} answered {response.status}")
                    if response.status != 200:  # e.g. invalid_grant: a used or forged code
                        what = str(body.get("error", ""))[:100]
                        raise PermissionDenied(f"the provider refused the sign-in: {what}")
                    return body
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ProviderError(f"{url}: {type(exc).__name__} {exc}".strip()) from None

    async def metadata(self, *, refresh: bool = False) -> dict[str, Any]:
        if (
            refresh
            or not self._metadata
            or time.monotonic() - self._read_at > PROVIDER_CACHE_SECONDS
        ):
            found = await self._get_json(
                self._settings.issuer + "/.well-known/openid-configuration"
            )
            if found.get("issuer") != self._settings.issuer:
                raise ProviderError(
                    f"the provider calls itself {found.get('issuer')!r},"
                    f" not {self._settings.issuer!r}"
                )
            keys = KeySet.import_key_set(await self._get_json(str(found["jwks_uri"])))  # type: ignore[arg-type]
            self._metadata, self._keys, self._read_at = found, keys, time.monotonic()
        return self._metadata

    async def authorization_url(
        self, redirect_uri: str, state: str, nonce: str, verifier: str
    ) -> str:
        endpoint = str((await self.metadata())["authorization_endpoint"])
        return str(
            prepare_grant_uri(
                endpoint,
                self._settings.client_id,
                "code",
                redirect_uri=redirect_uri,
                scope=f"openid profile {self._settings.groups_claim}",
                state=state,
                nonce=nonce,
                code_challenge=create_s256_code_challenge(verifier),  # type: ignore[no-untyped-call]
                code_challenge_method="S256",
            )
        )

    async def redeem(
        self, code: str, redirect_uri: str, verifier: str, nonce: str
    ) -> dict[str, Any]:
        """Trade the code (with the PKCE verifier) for an ID token; its checked claims."""
        endpoint = str((await self.metadata())["token_endpoint"])
        tokens = await self._get_json(
            endpoint,
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": verifier,
            },
            auth=aiohttp.BasicAuth(self._settings.client_id, self._settings.client_secret),
        )
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str):
            raise PermissionDenied("the provider's answer has no ID token")
        return await self.verify(id_token, nonce)

    async def verify(self, id_token: str, nonce: str) -> dict[str, Any]:
        """Signature (by the issuer's keys), issuer, audience, expiry, nonce."""
        await self.metadata()
        try:
            try:
                token = jwt.decode(id_token, self._keys, algorithms=SIGNING_ALGORITHMS)  # type: ignore[arg-type]
            except JoseError:  # perhaps a rotated key: re-read them once
                await self.metadata(refresh=True)
                token = jwt.decode(id_token, self._keys, algorithms=SIGNING_ALGORITHMS)  # type: ignore[arg-type]
            jwt.JWTClaimsRegistry(
                iss={"essential": True, "value": self._settings.issuer},
                aud={"essential": True, "value": self._settings.client_id},
                sub={"essential": True},
                exp={"essential": True},
                nonce={"essential": True, "value": nonce},
            ).validate(token.claims)
        except (JoseError, ValueError) as exc:
            raise PermissionDenied(f"the ID token is not valid: {one_line(exc)}") from None
        claims = dict(token.claims)
        audience = claims["aud"]
        if (
            isinstance(audience, list)
            and len(audience) > 1
            and claims.get("azp") != self._settings.client_id
        ):
            raise PermissionDenied("the ID token was issued to another client (azp)")
        return claims


def role_for(settings: OidcSettings, claims: dict[str, Any]) -> tuple[Role | None, list[str]]:
    """The role the person's groups give, by the first matching ``--oidc-role``."""
    found = claims.get(settings.groups_claim, [])
    groups = [found] if isinstance(found, str) else found if isinstance(found, list) else []
    groups = [g for g in groups if isinstance(g, str)]
    return next((role for group, role in settings.roles if group in groups), None), groups


def name_of(claims: dict[str, Any]) -> str:
    """The person's name as the rest of killswitch knows it (an ``owner`` label, for
    an employee): the username, else the e-mail, else the subject."""
    for claim in ("preferred_username", "email", "sub"):
        value = claims.get(claim)
        if isinstance(value, str) and value.strip() and len(value) <= MAX_NAME_CHARS:
            return value.strip()
    raise PermissionDenied("the ID token names nobody (no usable username, e-mail or subject)")


def _page(status: int, title: str, text: str) -> web.Response:
    page = pages.message_page(title, text)
    return web.Response(status=status, text=page, content_type="text/html")


class OidcSignIn:
    def __init__(
        self,
        settings: OidcSettings,
        sessions: DashboardSessions,
        *,
        base_url: Callable[[], str],
        secure_cookies: bool,
        record_denial: Callable[[Principal | None, str, str], Awaitable[None]],
    ) -> None:
        self._settings = settings
        self._provider = OpenIdProvider(settings)
        self._sessions = sessions
        # The dashboard as browsers reach it: the redirect URI registered at the provider.
        self._base_url = base_url
        self._secure_cookies = secure_cookies
        self._record_denial = record_denial

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/oidc/login", self._start), web.get(CALLBACK_PATH, self._callback)]

    def _redirect_uri(self) -> str:
        return self._base_url().rstrip("/") + CALLBACK_PATH

    async def _start(self, request: web.Request) -> web.StreamResponse:
        """GET /oidc/login: off to the provider, with fresh state, nonce and PKCE verifier."""
        state, nonce, verifier = (secrets.token_urlsafe(32) for _ in range(3))
        try:
            url = await self._provider.authorization_url(
                self._redirect_uri(), state, nonce, verifier
            )
        except ProviderError as exc:
            return harden(self._provider_down(exc))
        response = web.Response(status=303, headers={"Location": url})
        response.set_cookie(
            FLOW_COOKIE,
            f"{state}.{nonce}.{verifier}",
            max_age=FLOW_SECONDS,
            path=CALLBACK_PATH,
            httponly=True,
            samesite="Lax",
            secure=self._secure_cookies,
        )
        return harden(response)

    async def _callback(self, request: web.Request) -> web.StreamResponse:
        try:
            response = await self._finish(request)
        except StoreError:
            response = _page(
                503, "Try again", "<p>The control plane's database is not answering.</p>"
            )
        response.del_cookie(FLOW_COOKIE, path=CALLBACK_PATH)  # one use, whatever happened
        return harden(response)

    async def _finish(self, request: web.Request) -> web.StreamResponse:
        """GET /oidc/callback?code&state: check everything, then open a session."""
        query = request.query
        if error := query.get("error", ""):
            return _page(
                403,
                "Sign-in refused",
                f"<p>Your company's sign-in answered: {pages.e(error[:200])}.</p>"
                '<p><a href="/oidc/login">Try again</a></p>',
            )
        state, nonce, verifier = [*request.cookies.get(FLOW_COOKIE, "").split("."), "", ""][:3]
        sent_state = query.get("state", "")
        if not (state and nonce and verifier and hmac.compare_digest(state, sent_state)):
            return _page(
                403,
                "Sign-in not started here",
                "<p>This sign-in was not started from this browser, or took too long."
                ' <a href="/oidc/login">Sign in again</a>.</p>',
            )
        if "iss" in query and query["iss"] != self._settings.issuer:  # RFC 9207: mix-up
            return _page(403, "Sign-in refused", "<p>The answer came from another provider.</p>")
        try:
            claims = await self._provider.redeem(
                query.get("code", ""), self._redirect_uri(), verifier, nonce
            )
            name = name_of(claims)
        except ProviderError as exc:
            return self._provider_down(exc)
        except PermissionDenied as exc:
            log.warning("oidc_sign_in_refused", error=one_line(exc))
            await self._record_denial(None, SIGN_IN_ACTION, one_line(exc))
            return _page(403, "Sign-in refused", f"<p>{pages.e(one_line(exc))}</p>")
        role, groups = role_for(self._settings, claims)
        if role is None:
            return await self._unmapped(name, groups)
        principal = Principal(name, role, serial=f"oidc:{str(claims['sub'])[:80]}")
        if old := request.cookies.get(SESSION_COOKIE, ""):
            await self._sessions.end(old[:100])  # a new sign-in replaces this browser's session
        session_id = await self._sessions.open(principal)
        log.info("oidc_sign_in", name=name, role=role.value)
        page = pages.message_page(
            "Signed in",
            f'<p id="signed-in">Signed in as <strong>{pages.e(name)}</strong>,'
            f" role {pages.e(role.value)}.</p>"
            '<p><a href="/" id="continue">Continue to the dashboard</a></p>',
        )
        # A page that moves on by itself: see the module's docstring on SameSite=Strict.
        page = page.replace("<head>", '<head><meta http-equiv="refresh" content="0;url=/">', 1)
        response = web.Response(text=page, content_type="text/html")
        response.set_cookie(
            SESSION_COOKIE,
            session_id,
            max_age=int(SESSION_SECONDS),
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self._secure_cookies,
        )
        return response

    async def _unmapped(self, name: str, groups: list[str]) -> web.Response:
        why = f"no role for the groups of {name}: {', '.join(groups) or 'none'}"
        await self._record_denial(None, SIGN_IN_ACTION, why)
        mapped = ", ".join(group for group, _ in self._settings.roles)
        return _page(
            403,
            "No role for your account",
            f'<p id="unmapped">You signed in as <strong>{pages.e(name)}</strong>, but none of'
            f" your groups ({pages.e(', '.join(groups) or 'none')}) gives a role in"
            f" killswitch. The groups that do: {pages.e(mapped)}.</p>"
            "<p>Ask whoever runs killswitch to add you to one of them.</p>",
        )

    @staticmethod
    def _provider_down(exc: ProviderError) -> web.Response:
        log.warning("oidc_provider_error", error=one_line(exc))
        return _page(
            502,
            "Sign-in unavailable",
            "<p>Your company's sign-in did not answer as expected; try again in a moment,"
            " or use <code>killswitch dashboard</code>.</p>",
        )
