"""Actions in the dashboard: pause, ask to resume, approve or deny, acknowledge a
violation, opt out and back in; the same operations as the CLI, for people who sign
in with a browser.

Each one is a POST with a CSRF token, re-checked here against the gRPC role table
(``control.rpc.authz.POLICY``, the method the CLI would call), and carried out by
the same plane and governance methods the gRPC servicers call, under the session's
principal: the audit log names the same actor and action as for the CLI, and a
refusal is audited the same way.

The CSRF token is a hash of the session id, under its own prefix: only a browser
that holds the (HttpOnly, SameSite=Strict) session cookie can know it, and every
replica can check it without sharing a key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable
from collections.abc import Callable
from typing import Any

from aiohttp import web

from control.domain.holds import HoldKind
from control.domain.identity import Principal
from control.domain.scope import Scope
from control.domain.scope import parse_selector
from control.errors import Conflict
from control.errors import InvalidInput
from control.errors import KillswitchError
from control.errors import NotFound
from control.errors import PermissionDenied
from control.errors import StoreError
from control.errors import one_line
from control.governance import Governance
from control.plane import ControlPlane
from control.rpc.authz import POLICY
from control.rpc.authz import action_name
from control.web import action_pages
from control.web.headers import harden
from control.web.login import SESSION_COOKIE

CREATE_HOLD = "/killswitch.v1.Operator/CreateHold"
REQUEST_RESUME = "/killswitch.v1.Operator/RequestResume"
APPROVE = "/killswitch.v1.Operator/ApproveResume"
DENY = "/killswitch.v1.Operator/DenyResume"
ACKNOWLEDGE = "/killswitch.v1.Operator/AcknowledgeViolation"
OPT_OUT = "/killswitch.v1.SelfService/OptOut"
OPT_IN = "/killswitch.v1.SelfService/OptIn"
MAX_FIELD_CHARS = 2000
HTTP_STATUS = [
    (InvalidInput, 400),
    (NotFound, 404),
    (Conflict, 409),
    (PermissionDenied, 403),
    (StoreError, 503),
    (KillswitchError, 500),
]

Form = dict[str, str]
Action = Callable[[Principal, Form], Awaitable[str]]


def csrf_token(session_id: str) -> str:
    return hashlib.sha256(b"killswitch-csrf\0" + session_id.encode()).hexdigest()


def may(principal: Principal, method: str) -> bool:
    rule = POLICY.get(method)
    return rule is not None and principal.role in rule.roles


def _field(form: Form, name: str, what: str = "") -> str:
    """A form field, stripped; required when ``what`` names it."""
    value = form.get(name, "").strip()
    if what and not value:
        raise InvalidInput(f"{what} is required")
    return value


def _count(text: str) -> int | None:
    digits = text.replace(",", "").replace(" ", "")
    return int(digits) if digits.isdigit() and len(digits) < 10 else None


class Actions:
    def __init__(
        self,
        plane: ControlPlane,
        governance: Governance,
        *,
        principal_of: Callable[[str], Awaitable[Principal | None]],
    ) -> None:
        self._plane = plane
        self._governance = governance
        self._principal_of = principal_of

    def routes(self) -> list[web.RouteDef]:
        post = self._post
        return [
            web.get("/actions", self._show),
            web.post("/actions/pause/preview", post(CREATE_HOLD, self._preview, mutates=False)),
            web.post("/actions/pause", post(CREATE_HOLD, self._pause)),
            web.post("/actions/resume", post(REQUEST_RESUME, self._resume)),
            web.post("/actions/approve", post(APPROVE, self._approve)),
            web.post("/actions/deny", post(DENY, self._deny)),
            web.post("/actions/acknowledge", post(ACKNOWLEDGE, self._acknowledge)),
            web.post("/actions/opt-out", post(OPT_OUT, self._opt_out)),
            web.post("/actions/opt-in", post(OPT_IN, self._opt_in)),
        ]

    # ------------------------------------------------------------ the guard

    async def _session(self, request: web.Request) -> tuple[str, Principal | None]:
        session_id = request.cookies.get(SESSION_COOKIE, "")
        if not session_id or len(session_id) > 100:
            return "", None
        return session_id, await self._principal_of(session_id)

    async def _show(self, request: web.Request) -> web.StreamResponse:
        """GET /actions: what this person may do now, as forms."""
        try:
            session_id, principal = await self._session(request)
            if principal is None:
                return harden(action_pages.not_signed_in())
            text = action_pages.actions_page(
                principal, csrf_token(session_id), self._choices(principal)
            )
        except StoreError:
            return harden(action_pages.outcome(None, 503, "the database is not answering"))
        return harden(web.Response(text=text, content_type="text/html"))

    def _post(
        self, method: str, action: Action, *, mutates: bool = True
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                return harden(await self._guarded(request, method, action, mutates))
            except StoreError:
                return harden(action_pages.outcome(None, 503, "the database is not answering"))

        return handle

    async def _guarded(
        self, request: web.Request, method: str, action: Action, mutates: bool
    ) -> web.Response:
        session_id, principal = await self._session(request)
        if principal is None:
            return action_pages.not_signed_in()
        raw = await request.post()
        form = {k: str(v)[:MAX_FIELD_CHARS] for k, v in raw.items() if isinstance(v, str)}
        try:
            if not hmac.compare_digest(form.get("csrf", ""), csrf_token(session_id)):
                raise PermissionDenied("this form is stale or came from another site (CSRF)")
            if not may(principal, method):
                raise PermissionDenied(
                    f"role {principal.role.value} may not call {action_name(method)}"
                )
            page = await self._governance.found(lambda: action(principal, form))
            return web.Response(text=page, content_type="text/html")
        except KillswitchError as exc:
            if isinstance(exc, PermissionDenied) or mutates:
                await self._governance.record_failure(principal, action_name(method), exc)
            status = next(code for kind, code in HTTP_STATUS if isinstance(exc, kind))
            return action_pages.outcome(principal, status, one_line(exc))

    # ------------------------------------------------------------ what to offer

    def _choices(self, principal: Principal) -> dict[str, Any]:
        """Only what this role may do: the forms shown are the POLICY's rows."""
        choices: dict[str, Any] = {}
        if may(principal, CREATE_HOLD):
            choices["pause"] = True
        if may(principal, REQUEST_RESUME):
            choices["holds"] = [
                h for h in self._plane.active_holds() if h.kind is HoldKind.INCIDENT
            ]
        if may(principal, ACKNOWLEDGE):
            choices["violations"] = [v for v in self._plane.views() if v.status.violation]
        if may(principal, APPROVE):
            choices["requests"] = (self._governance.requests(), self._plane.now())
        if may(principal, OPT_OUT):
            opted = {
                agent_id
                for h in self._plane.active_holds()
                if h.kind is HoldKind.OPT_OUT
                for agent_id in h.scope.agent_ids
            }
            choices["laptops"] = [(v, v.agent_id in opted) for v in self._plane.owned_by(principal)]
        return choices

    # ------------------------------------------------------------ the actions

    @staticmethod
    def _scope(form: Form) -> Scope:
        kind = form.get("scope", "")
        if kind == "all":
            return Scope.fleet()
        if kind == "selector":
            return Scope.selector(parse_selector(_field(form, "selector", "a selector")))
        if kind == "agents":
            ids = _field(form, "agents", "laptop ids").replace(",", " ").split()
            return Scope.agents(ids)
        raise InvalidInput("choose a scope: all, a selector, or laptop ids")

    def _covered(self, scope: Scope) -> int:
        return sum(1 for v in self._plane.views() if scope.covers(v.agent_id, v.labels))

    async def _preview(self, principal: Principal, form: Form) -> str:
        """The pause, before it happens: how many laptops, and a box to type that number."""
        scope = self._scope(form)
        _field(form, "reason", "a reason")
        return action_pages.pause_preview(principal, form, scope, self._covered(scope))

    async def _pause(self, principal: Principal, form: Form) -> str:
        scope = self._scope(form)
        covered = self._covered(scope)
        if _count(form.get("confirm", "")) != covered:
            # Mistyped, or the fleet changed since the preview: show the new number.
            return action_pages.pause_preview(
                principal, form, scope, covered, retyped=bool(form.get("confirm"))
            )
        hold, paused = await self._plane.create_hold(
            scope, _field(form, "reason", "a reason"), _field(form, "ticket"), principal
        )
        return action_pages.done(
            principal,
            f"Hold {hold.id} created at epoch {hold.created_epoch}:"
            f" it pauses {paused:,} laptop{'s' if paused != 1 else ''}.",
        )

    async def _resume(self, principal: Principal, form: Form) -> str:
        opened = await self._governance.request_resume(
            principal,
            _field(form, "hold_id", "a hold id"),
            _field(form, "reason"),
            _field(form, "ticket"),
        )
        return action_pages.done(
            principal,
            f"Resume request {opened.id} (revision {opened.revision}) for hold"
            f" {opened.hold_id} is waiting for an approver.",
        )

    def _revision(self, form: Form) -> int:
        revision = _count(form.get("revision", ""))
        if revision is None:
            raise InvalidInput("the request's revision is required")
        return revision

    async def _approve(self, principal: Principal, form: Form) -> str:
        approved = await self._governance.approve(
            principal,
            _field(form, "request_id", "a request id"),
            self._revision(form),
            _field(form, "note"),
        )
        if approved.lifted_epoch:
            text = f"Request {approved.id} approved: hold lifted at epoch {approved.lifted_epoch}."
        else:
            text = f"Request {approved.id} approved: its runbook may start."
        return action_pages.done(principal, text)

    async def _deny(self, principal: Principal, form: Form) -> str:
        denied = await self._governance.deny(
            principal,
            _field(form, "request_id", "a request id"),
            self._revision(form),
            _field(form, "note", "a note (why the resume is denied)"),
        )
        return action_pages.done(principal, f"Request {denied.id} is denied.")

    async def _acknowledge(self, principal: Principal, form: Form) -> str:
        agent_id = _field(form, "agent_id", "a laptop id")
        await self._plane.acknowledge_violation(
            agent_id, principal, _field(form, "note", "a note (what was found and done about it)")
        )
        return action_pages.done(principal, f"The violation on {agent_id} is acknowledged.")

    async def _opt_out(self, principal: Principal, form: Form) -> str:
        agent_id = _field(form, "agent_id", "a laptop id")
        await self._plane.opt_out(agent_id, principal, _field(form, "reason"))
        return action_pages.done(principal, f"{agent_id} is opted out: capture stops on it.")

    async def _opt_in(self, principal: Principal, form: Form) -> str:
        agent_id = _field(form, "agent_id", "a laptop id")
        await self._plane.opt_in(agent_id, principal)
        return action_pages.done(principal, f"{agent_id} is opted back in.")
