"""The compliance dashboard: a read-only web view of the fleet, for people.

Routes (all on the server's ``--http`` address):

- ``GET /login?token=T``: a one-time link from ``killswitch dashboard`` shows who it
  signs in as; its form (``POST /login``, with a CSRF token) trades the link for a
  session cookie (HttpOnly, SameSite=Strict, Secure behind an https ``--public-url``),
  then redirects to ``/`` (``login.py``). ``GET|POST /logout`` ends the session.
- ``GET /``: overview (epoch, holds, agents by state, time since the pause, time to
  verified stop) and the laptop table (filter, sort, pages; works without JS).
- ``GET /agents/{id}``: one laptop: its state, the facts behind it, violation
  evidence, and its timeline.
- ``GET /api/summary``, ``/api/agents?...``, ``/api/agents/{id}``: the same as JSON.
- ``GET /api/runs`` (newest first) and ``/api/runs/{id}``: runbook runs, each as
  ``killswitch runbook status --json`` prints it; the overview shows the newest.
- ``GET /api/events``: Server-Sent Events, one message a second: the overview and
  which agents changed (by version), so a page re-reads only its own rows. One
  stream per session; slots are shared out per person (``live.py``, ``streams.py``).
- ``GET /export/agents.csv?...`` and ``/export/agents.json?...``: every row of the
  filtered view, streamed (``exports.py``).
- ``GET /static/{name}``: the page's CSS and scripts (public, no data in them).

Every page and API needs a session. Incident commanders, approvers and SREs see
everything; employees see only laptops labelled ``owner=<their name>`` (anyone
else's laptop is "not found", like one that does not exist) and no runbook runs;
automation and agent identities are refused. Changes go through ``/actions`` only
(``actions.py``: POSTs with a CSRF token, checked against the gRPC role table);
``GET /oidc/login`` signs in with the company's SSO when configured (``oidc.py``).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Awaitable
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from control.domain.identity import Principal
from control.errors import InvalidInput
from control.errors import StoreError
from control.governance import Governance
from control.plane import ControlPlane
from control.readiness import Readiness
from control.web import api
from control.web import pages
from control.web.actions import Actions
from control.web.exports import Exports
from control.web.headers import harden
from control.web.live import LiveUpdates
from control.web.login import SESSION_COOKIE
from control.web.login import Login
from control.web.oidc import OidcSettings
from control.web.oidc import OidcSignIn
from control.web.readiness_panel import READINESS_ROLES
from control.web.readiness_panel import readiness_data
from control.web.readiness_panel import readiness_panel
from control.web.sessions import DashboardSessions
from control.web.timeline import Timeline

# The overview is computed at most this often per audience, however many viewers.
SUMMARY_TTL = 0.5
OPERATORS_ONLY = "runbook runs are for incident commanders, approvers and SREs"
STATIC_DIR = Path(__file__).parent / "static"
STATIC_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
SSO_HELP = (
    '<p><a id="sso-sign-in" class="button" href="/oidc/login">Sign in with your company'
    " account</a></p><p>Or:</p>"
)

Handler = Callable[[web.Request, Principal], Awaitable[web.StreamResponse]]


def _load_static() -> dict[str, tuple[bytes, str]]:
    files: dict[str, tuple[bytes, str]] = {}
    if STATIC_DIR.is_dir():
        for path in STATIC_DIR.iterdir():
            if path.is_file() and path.suffix in STATIC_TYPES:
                files[path.name] = (path.read_bytes(), STATIC_TYPES[path.suffix])
    return files


def _viewer(principal: Principal) -> dict[str, str]:
    return {"name": principal.name, "role": principal.role.value}


class Dashboard:
    def __init__(
        self,
        plane: ControlPlane,
        sessions: DashboardSessions,
        runbooks: api.RunSource | None = None,
        *,
        secure_cookies: bool = False,
        readiness: Readiness | None = None,
        governance: Governance | None = None,
        sso: OidcSettings | None = None,
        base_url: Callable[[], str] = lambda: "",
    ) -> None:
        """``governance``: with it, the dashboard takes actions (``actions.py``) and, with
        ``sso`` too, signs people in with the company's SSO at ``base_url()`` (``oidc.py``)."""
        self._plane = plane
        self._sessions = sessions
        self._runbooks = runbooks
        self._readiness = readiness
        self.timeline = Timeline()
        self._static = _load_static()
        self._login = Login(
            sessions,
            secure_cookies=secure_cookies,
            unavailable=lambda: self._unavailable(as_json=False),
            refusal=lambda: self._refusal(403, as_json=False),
        )
        self._more_routes: list[web.RouteDef] = []
        if governance is not None:
            actions = Actions(plane, governance, principal_of=sessions.principal)
            self._more_routes += actions.routes()
            if sso is not None:
                sign_in = OidcSignIn(
                    sso,
                    sessions,
                    base_url=base_url,
                    secure_cookies=secure_cookies,
                    record_denial=functools.partial(_record_sign_in_refusal, governance),
                )
                self._more_routes += sign_in.routes()
        self._sso_help = SSO_HELP if governance is not None and sso is not None else ""
        # audience -> (computed at, monotonic; the overview; the same as JSON)
        self._summaries: dict[str, tuple[float, dict[str, Any], str]] = {}
        self._live = LiveUpdates(plane, sessions, self.timeline, summary=self.summary)
        self._exports = Exports(plane)

    def routes(self) -> list[web.RouteDef]:
        return [
            *self._login.routes(),
            *self._more_routes,
            web.get("/static/{name}", self._static_file),
            web.get("/", self._guard(self._home)),
            web.get("/agents/{agent_id}", self._guard(self._agent_page)),
            web.get("/api/summary", self._guard(self._api_summary, as_json=True)),
            web.get("/api/agents", self._guard(self._api_agents, as_json=True)),
            web.get("/api/agents/{agent_id}", self._guard(self._api_agent, as_json=True)),
            web.get("/api/runs", self._guard(self._api_runs, as_json=True, operators=True)),
            web.get("/api/runs/{run_id}", self._guard(self._api_run, as_json=True, operators=True)),
            web.get("/api/events", self._guard(self._live.events, as_json=True)),
            web.get("/api/readiness", self._guard(self._api_readiness, as_json=True)),
            web.get("/export/agents.csv", self._guard(self._exports.as_csv, as_json=True)),
            web.get("/export/agents.json", self._guard(self._exports.as_json, as_json=True)),
        ]

    async def close(self) -> None:
        """End live streams now (the server is stopping) instead of at the HTTP grace period."""
        self._live.close()

    # ------------------------------------------------------------ access

    async def _principal(self, request: web.Request) -> Principal | None:
        session_id = request.cookies.get(SESSION_COOKIE, "")
        if not session_id or len(session_id) > 100:
            return None
        return await self._sessions.principal(session_id)

    def _guard(
        self, handler: Handler, *, as_json: bool = False, operators: bool = False
    ) -> Callable[..., Any]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            response: web.StreamResponse
            try:
                principal = await self._principal(request)
            except StoreError:
                return harden(self._unavailable(as_json))
            if principal is None:
                response = self._refusal(401, as_json)
            elif not api.may_view(principal):
                response = self._refusal(403, as_json)
            elif operators and api.is_employee(principal):
                response = self._error(403, OPERATORS_ONLY, as_json, principal)
            else:
                try:
                    response = await handler(request, principal)
                except InvalidInput as exc:
                    response = self._error(400, str(exc), as_json, principal)
            return harden(response)

        return guarded

    @staticmethod
    def _unavailable(as_json: bool) -> web.Response:
        text = "the control plane's database is not answering: try again in a moment"
        if as_json:
            return web.json_response({"error": text}, status=503)
        page = pages.message_page("Try again", f"<p>{pages.e(text)}.</p>")
        return web.Response(status=503, text=page, content_type="text/html")

    def _refusal(self, status: int, as_json: bool) -> web.Response:
        if status == 401:
            text = "not logged in, or the session expired: run `killswitch dashboard`"
            page = pages.message_page(
                "Log in to the dashboard",
                "<p>You are not logged in, or your session has expired.</p>"
                + self._sso_help
                + pages.LOGIN_HELP,
            )
        else:
            text = "the dashboard is for people: automation and agent identities cannot use it"
            page = pages.message_page(
                "Not for this identity",
                "<p>The dashboard is for incident commanders, approvers, SREs and employees."
                " Automation and agent identities cannot use it.</p>",
            )
        if as_json:
            return web.json_response({"error": text}, status=status)
        return web.Response(status=status, text=page, content_type="text/html")

    def _error(self, status: int, text: str, as_json: bool, principal: Principal) -> web.Response:
        if as_json:
            return web.json_response({"error": text}, status=status)
        page = pages.message_page(
            "Bad request",
            f'<p class="error">{pages.e(text)}</p><p><a href="/">Back to the fleet</a></p>',
            viewer=_viewer(principal),
        )
        return web.Response(status=status, text=page, content_type="text/html")

    async def _static_file(self, request: web.Request) -> web.StreamResponse:
        found = self._static.get(request.match_info["name"])
        if found is None:
            return harden(web.Response(status=404, text="not found\n"))
        body, content_type = found
        response = web.Response(body=body, headers={"Content-Type": content_type})
        response.headers["Cache-Control"] = "no-cache"
        return harden(response, cache=True)

    # ------------------------------------------------------------ data

    def summary(self, principal: Principal) -> tuple[dict[str, Any], str]:
        """The overview for this person's audience (everyone, or one employee), cached briefly."""
        audience = f"employee:{principal.name}" if api.is_employee(principal) else ""
        now = time.monotonic()
        cached = self._summaries.get(audience)
        if cached is not None and now - cached[0] < SUMMARY_TTL:
            data, text = cached[1], cached[2]
        else:
            data = api.summary(self._plane, principal)
            if not api.is_employee(principal):
                newest = self.runs(limit=1)
                data["runbook"] = newest[0] if newest else None
            text = json.dumps(data)
            if len(self._summaries) > 256:
                self._summaries.clear()
            self._summaries[audience] = (now, data, text)
        return data, text

    def runs(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Runbook runs, newest first (only one is ever active, so it is the newest)."""
        if self._runbooks is None:
            return []
        newest = self._runbooks.runs()[::-1][:limit]
        return [api.run_data(run, self._runbooks.book(run.id)) for run in newest]

    # ------------------------------------------------------------ pages

    async def _home(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        query = api.parse_query(request.query)
        version = self.timeline.version
        data, _ = self.summary(principal)
        page = api.paginate(api.select(self._plane, query, principal), query)
        rows = [api.row(v) for v in page.views]
        readiness = await self._readiness_data(principal)
        text = pages.home(
            data,
            viewer=_viewer(principal),
            rows=rows,
            page=page,
            query=query,
            version=version,
            panels="" if readiness is None else readiness_panel(readiness),
        )
        return web.Response(text=text, content_type="text/html")

    async def _readiness_data(self, principal: Principal) -> dict[str, Any] | None:
        """For the roles ``GetReadiness`` allows; None for anyone else."""
        if self._readiness is None or principal.role not in READINESS_ROLES:
            return None
        return readiness_data(await self._readiness.assess())

    async def _agent_page(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        version = self.timeline.version
        view = api.visible_agent(self._plane, request.match_info["agent_id"], principal)
        if view is None:
            page = pages.not_found_page(_viewer(principal))
            return web.Response(status=404, text=page, content_type="text/html")
        events = pages.timeline_data(
            self.timeline.events(view.agent_id, view.labels), api.is_employee(principal)
        )
        text = pages.agent_detail(api.detail(view), events, _viewer(principal), version)
        return web.Response(text=text, content_type="text/html")

    # ------------------------------------------------------------ JSON API

    async def _api_readiness(
        self, request: web.Request, principal: Principal
    ) -> web.StreamResponse:
        data = await self._readiness_data(principal)
        if data is None:
            return self._error(
                403, "readiness is for incident commanders and SREs", True, principal
            )
        return web.json_response(data)

    async def _api_summary(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        version = self.timeline.version
        _, text = self.summary(principal)
        body = f'{{"version": {version}, "summary": {text}}}'
        return web.Response(text=body, content_type="application/json")

    async def _api_agents(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        query = api.parse_query(request.query)
        version = self.timeline.version
        page = api.paginate(api.select(self._plane, query, principal), query)
        return web.json_response(
            {
                "version": version,
                "now": self._plane.now(),
                "total": page.total,
                "page": page.page,
                "pages": page.pages,
                "per_page": page.per_page,
                "sort": query.sort,
                "order": "desc" if query.descending else "asc",
                "rows": [api.row(v) for v in page.views],
            }
        )

    async def _api_agent(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        version = self.timeline.version
        view = api.visible_agent(self._plane, request.match_info["agent_id"], principal)
        if view is None:
            return web.json_response({"error": "no such laptop"}, status=404)
        events = self.timeline.events(view.agent_id, view.labels)
        return web.json_response(
            {
                "version": version,
                "now": self._plane.now(),
                "agent": api.detail(view),
                "timeline": pages.timeline_data(events, api.is_employee(principal)),
            }
        )

    async def _api_runs(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        return web.json_response({"now": self._plane.now(), "runs": self.runs()})

    async def _api_run(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        run_id = request.match_info["run_id"]
        found = [run for run in self.runs() if run["id"] == run_id]
        if not found:
            return web.json_response({"error": "no such run"}, status=404)
        return web.json_response({"now": self._plane.now(), "run": found[0]})


async def _record_sign_in_refusal(
    governance: Governance, by: Principal | None, action: str, why: str
) -> None:
    """Nobody signed in yet: counted with the other refusals before authentication."""
    if by is None:
        governance.count_unauthenticated(None, "dashboard sign-in", action, why)
    else:
        await governance.record_denial(by, action, why)
