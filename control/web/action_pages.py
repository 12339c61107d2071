"""The HTML of the dashboard's actions (``actions.py``): plain forms, no script needed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from control.domain.approvals import ResumeRequest
from control.domain.holds import Hold
from control.domain.identity import Principal
from control.domain.scope import Scope
from control.plane import AgentView
from control.web.pages import agent_href
from control.web.pages import e
from control.web.pages import layout
from control.web.pages import message_page

BACK = '<p><a href="/actions">Back to actions</a> \u00b7 <a href="/">the fleet</a></p>'
NO_ACTIONS = (
    '<p id="no-actions">Your role watches the incident; it has no actions here.'
    " Incident commanders pause and ask to resume, approvers decide, employees opt"
    " their own laptops out.</p>"
)


def _viewer(principal: Principal) -> dict[str, str]:
    return {"name": principal.name, "role": principal.role.value}


def _csrf(token: str) -> str:
    return f'<input type="hidden" name="csrf" value="{e(token)}">'


def _hidden(fields: Mapping[str, str]) -> str:
    return "".join(f'<input type="hidden" name="{e(k)}" value="{e(v)}">' for k, v in fields.items())


def _form(action: str, csrf: str, inner: str, *, form_id: str = "") -> str:
    ident = f' id="{e(form_id)}"' if form_id else ""
    return (
        f'<form method="post" action="{e(action)}"{ident} class="action">'
        f"{_csrf(csrf)}{inner}</form>"
    )


def not_signed_in() -> web.Response:
    page = message_page(
        "Log in to the dashboard", '<p>You are not logged in. <a href="/">Sign in</a>.</p>'
    )
    return web.Response(status=401, text=page, content_type="text/html")


def outcome(principal: Principal | None, status: int, text: str) -> web.Response:
    """A refused or failed action, with why in one line."""
    title = "Not allowed" if status == 403 else "Not done"
    viewer = _viewer(principal) if principal is not None else None
    page = message_page(
        title, f'<p class="error" id="action-error">{e(text)}</p>{BACK}', viewer=viewer
    )
    return web.Response(status=status, text=page, content_type="text/html")


def done(principal: Principal, text: str) -> str:
    return message_page(
        "Done", f'<p id="action-result">{e(text)}</p>{BACK}', viewer=_viewer(principal)
    )


def _pause_form(csrf: str) -> str:
    return (
        "<section><h2>Pause capture</h2>"
        + _form(
            "/actions/pause/preview",
            csrf,
            "<fieldset><legend>Which laptops</legend>"
            '<label><input type="radio" name="scope" value="all" id="scope-all" checked>'
            " the whole fleet</label>"
            '<label><input type="radio" name="scope" value="selector" id="scope-selector">'
            ' laptops labelled <input name="selector" id="pause-selector"'
            ' placeholder="team=payments,site=ams"></label>'
            '<label><input type="radio" name="scope" value="agents" id="scope-agents">'
            ' these laptops <input name="agents" id="pause-agents" placeholder="laptop-1 laptop-2">'
            "</label></fieldset>"
            '<label>Reason <input name="reason" id="pause-reason" required></label>'
            '<label>Ticket <input name="ticket" id="pause-ticket"></label>'
            '<button type="submit" id="pause-preview">Preview the pause</button>',
            form_id="pause-form",
        )
        + "</section>"
    )


def _holds(holds: list[Hold], csrf: str) -> str:
    rows = "".join(
        f'<tr data-hold-id="{e(h.id)}"><td><code>{e(h.id)}</code></td>'
        f"<td>{e(h.scope.describe())}</td>"
        f"<td>{e(h.reason)}</td><td>{e(h.ticket)}</td><td>"
        + _form(
            "/actions/resume",
            csrf,
            _hidden({"hold_id": h.id}) + '<input name="reason" placeholder="why resume" required>'
            '<input name="ticket" placeholder="ticket">'
            '<button type="submit">Ask to resume</button>',
        )
        + "</td></tr>"
        for h in holds
    )
    body = (
        f'<table id="resume-holds"><thead><tr><th>Hold</th><th>Scope</th><th>Reason</th>'
        f"<th>Ticket</th><th></th></tr></thead><tbody>{rows}</tbody></table>"
        if holds
        else "<p>No incident hold is active.</p>"
    )
    return f"<section><h2>Ask to resume</h2>{body}</section>"


def _violations(views: list[AgentView], csrf: str) -> str:
    if not views:
        return ""
    rows = "".join(
        f'<tr data-agent-id="{e(v.agent_id)}"><td><a href="{agent_href(v.agent_id)}">'
        f"{e(v.agent_id)}</a></td><td>{e(v.status.violation)}</td><td>"
        + _form(
            "/actions/acknowledge",
            csrf,
            _hidden({"agent_id": v.agent_id})
            + '<input name="note" placeholder="what was found and done" required>'
            '<button type="submit">Acknowledge</button>',
        )
        + "</td></tr>"
        for v in views
    )
    return (
        '<section><h2>Violations</h2><table id="violations"><thead><tr><th>Laptop</th>'
        f"<th>Evidence</th><th></th></tr></thead><tbody>{rows}</tbody></table></section>"
    )


def _requests(found: tuple[list[ResumeRequest], float], csrf: str) -> str:
    requests, now = found
    rows = []
    for r in requests:
        ids = _hidden({"request_id": r.id, "revision": str(r.revision)})
        rows.append(
            f'<tr data-request-id="{e(r.id)}"><td><code>{e(r.id)}</code></td>'
            f"<td>{e(r.hold_id or r.drill_runbook)}</td><td>{e(r.requested_by)}</td>"
            f"<td>{e(r.reason)}</td><td>{e(r.ticket)}</td>"
            f'<td class="revision">{r.revision}</td><td>{e(r.current_state(now).value)}</td><td>'
            + _form(
                "/actions/approve",
                csrf,
                ids + '<input name="note" placeholder="note">'
                f'<button type="submit">Approve revision {r.revision}</button>',
            )
            + _form(
                "/actions/deny",
                csrf,
                ids + '<input name="note" placeholder="why not" required>'
                '<button type="submit">Deny</button>',
            )
            + "</td></tr>"
        )
    body = (
        '<table id="requests"><thead><tr><th>Request</th><th>Hold</th><th>Asked by</th>'
        "<th>Reason</th><th>Ticket</th><th>Revision</th><th>State</th><th></th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        if rows
        else "<p>No resume request is waiting.</p>"
    )
    return f"<section><h2>Resume requests</h2>{body}</section>"


def _laptops(laptops: list[tuple[AgentView, bool]], csrf: str) -> str:
    rows = []
    for view, opted_out in laptops:
        fields = _hidden({"agent_id": view.agent_id})
        form = (
            _form("/actions/opt-in", csrf, fields + '<button type="submit">Opt back in</button>')
            if opted_out
            else _form(
                "/actions/opt-out",
                csrf,
                fields + '<input name="reason" placeholder="why (optional)">'
                '<button type="submit">Opt out</button>',
            )
        )
        state = "opted out" if opted_out else "capturing allowed"
        rows.append(
            f'<tr data-agent-id="{e(view.agent_id)}"><td>{e(view.agent_id)}</td>'
            f"<td>{state}</td><td>{form}</td></tr>"
        )
    body = (
        '<table id="my-laptops"><thead><tr><th>Laptop</th><th>Opt-out</th><th></th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        if rows
        else "<p>No laptop is labelled as yours.</p>"
    )
    return f"<section><h2>Your laptops</h2>{body}</section>"


def actions_page(principal: Principal, csrf: str, choices: Mapping[str, Any]) -> str:
    parts = []
    if choices.get("pause"):
        parts.append(_pause_form(csrf))
    if "holds" in choices:
        parts.append(_holds(choices["holds"], csrf))
    if "violations" in choices:
        parts.append(_violations(choices["violations"], csrf))
    if "requests" in choices:
        parts.append(_requests(choices["requests"], csrf))
    if "laptops" in choices:
        parts.append(_laptops(choices["laptops"], csrf))
    body = (
        '<section class="actions"><h1>Actions</h1>' + ("".join(parts) or NO_ACTIONS) + "</section>"
    )
    return layout("Actions", body, viewer=_viewer(principal))


def pause_preview(
    principal: Principal,
    form: Mapping[str, str],
    scope: Scope,
    covered: int,
    *,
    retyped: bool = False,
) -> str:
    """The pause dialog: what it covers, and the number to type to go ahead."""
    laptops = f"{covered:,} laptop{'s' if covered != 1 else ''}"
    fields = {k: form.get(k, "") for k in ("scope", "selector", "agents", "reason", "ticket")}
    warning = (
        '<p class="error" id="pause-retype">That was not the number: the scope now covers'
        f" {e(laptops)}. Check and type it again.</p>"
        if retyped
        else ""
    )
    body = (
        '<section class="message pause-dialog"><h1>Pause capture?</h1>'
        f'<p id="pause-count" class="big">This pauses <strong>{e(laptops)}</strong>.</p>'
        f"<dl><dt>Scope</dt><dd>{e(scope.describe())}</dd>"
        f"<dt>Reason</dt><dd>{e(fields['reason'])}</dd>"
        f"<dt>Ticket</dt><dd>{e(fields['ticket'] or '(none)')}</dd></dl>{warning}"
        + _form(
            "/actions/pause",
            form.get("csrf", ""),
            _hidden(fields) + f"<label>Type <strong>{covered}</strong> to confirm"
            ' <input name="confirm" id="pause-confirm" autocomplete="off" required></label>'
            f'<button type="submit" id="pause-go" class="danger">Pause {e(laptops)}</button>',
            form_id="pause-confirm-form",
        )
        + BACK
        + "</section>"
    )
    return layout("Pause capture?", body, viewer=_viewer(principal))
