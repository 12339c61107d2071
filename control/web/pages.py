"""HTML for the dashboard, rendered on the server so the basic views work without JS.

Every value that reaches the page goes through ``e()`` (labels, reasons, evidence and
ids are all someone's input). The page scripts only ever set ``textContent``.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from datetime import UTC
from datetime import datetime
from typing import Any
from urllib.parse import quote
from urllib.parse import urlencode

from control.plane import SEVERITY
from control.web.api import PROBLEM_STATES
from control.web.api import SORT_KEYS
from control.web.api import Page
from control.web.api import Query
from control.web.timeline import HoldEvent
from control.web.timeline import TimelineEvent

TITLE = "killswitch"
# Table columns: (sort key, header, what it shows).
COLUMNS: list[tuple[str, str]] = [
    ("agent_id", "Agent"),
    ("state", "State"),
    ("reason", "Reason"),
    ("since", "Since"),
    ("mode", "Mode"),
    ("labels", "Labels"),
    ("connected", "Conn."),
    ("last_seen", "Last seen"),
    ("applied_epoch", "Epoch"),
    ("events_captured_total", "Events"),
    ("spool_events", "Spool"),
    ("uploads_refused", "Refused"),
    ("events_accepted_after_pause", "After pause"),
]
assert all(key in SORT_KEYS for key, _ in COLUMNS)
TTC_HELP = (
    "Time to compliance, for the pause that applies to each paused agent now: from the"
    " moment its desired state became PAUSED to the moment the server verified the stop"
    " (a heartbeat after the ack showed counters and spool frozen). Agents not verified"
    " yet (pending, overdue, failed, in violation, offline, including offline with an"
    " expired lease, whose stop is presumed rather than proven) count as slower than every"
    " verified agent, with the time waited so far as a lower bound: a figure marked"
    " '\u2265 \u2026 not yet' is still growing. p50 and p99 are nearest-rank percentiles"
    " over all paused agents."
)


def e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds // 60:.0f}m {seconds % 60:02.0f}s"
    return f"{seconds / 3600:.1f}h"


def ago(seconds: float | None, now: float) -> str:
    return "-" if seconds is None else f"{duration(now - seconds)} ago"


def _iso_seconds(text: str | None) -> float | None:
    return None if text is None else datetime.fromisoformat(text).timestamp()


def layout(title: str, body: str, *, viewer: Mapping[str, str] | None, script: str = "") -> str:
    who = ""
    if viewer is not None:
        who = (
            '<a href="/actions" id="actions-link">Actions</a>'
            f'<span class="who">{e(viewer["name"])} <small>({e(viewer["role"])})</small></span>'
            '<form method="post" action="/logout" class="logout">'
            '<button type="submit">Log out</button></form>'
        )
    scripts = (
        '<script src="/static/common.js" defer></script>'
        f'<script src="/static/{e(script)}" defer></script>'
        if script
        else ""
    )
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)} \u00b7 {TITLE}</title>"
        '<link rel="stylesheet" href="/static/dashboard.css">'
        '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">'
        f"{scripts}</head><body>"
        f'<header><a class="brand" href="/">{TITLE}</a>'
        '<span class="sub">capture kill switch \u00b7 dashboard</span>'
        f"{who}</header>\n<main>{body}</main>\n"
        '<footer><span id="live-status" class="live off">live updates need JavaScript;'
        " reload for fresh data</span></footer></body></html>\n"
    )


def message_page(title: str, text: str, *, viewer: Mapping[str, str] | None = None) -> str:
    return layout(
        title, f'<section class="message"><h1>{e(title)}</h1>{text}</section>', viewer=viewer
    )


LOGIN_HELP = (
    "<p>Run <code>killswitch dashboard</code> with your identity"
    " (<code>--identity DIR</code> or <code>KILLSWITCH_IDENTITY</code>) and open the"
    " link it prints. A link works once, within two minutes.</p>"
)


def agent_href(agent_id: str) -> str:
    return "/agents/" + quote(agent_id, safe="")


def badge(state: str) -> str:
    return f'<span class="badge st-{e(state)}">{e(state)}</span>'


# ------------------------------------------------------------------ overview


def _bar(by_state: Mapping[str, int], total: int, query: Query) -> str:
    segments, legend = [], []
    for state in SEVERITY:
        n = by_state.get(state.value, 0)
        percent = round(100 * n / total) if total else 0
        href = "/?" + urlencode(query.params(state=state.value, page=1))
        hidden = "" if n else " empty"
        segments.append(
            f'<a class="seg st-{state.value} p{percent}{hidden}" data-state="{state.value}"'
            f' href="{e(href)}" title="{state.value}: {n}"></a>'
        )
        problem = " problem" if state in PROBLEM_STATES else ""
        legend.append(
            f'<li class="{hidden.strip()}{problem}"><a href="{e(href)}">'
            f'<span class="swatch st-{state.value}"></span>{state.value}'
            f' <b id="count-{state.value}">{n}</b></a></li>'
        )
    return (
        f'<div id="state-bar" class="bar" role="img" aria-label="agents by state">'
        f"{''.join(segments)}</div>"
        f'<ul id="state-legend" class="legend">{"".join(legend)}</ul>'
    )


def _ttc_figure(figure: Mapping[str, Any] | None) -> str:
    if figure is None:
        return "-"
    text = duration(figure["seconds"])
    return text if figure["verified"] else f"\u2265 {text} not yet"


def _holds_table(holds: Sequence[Mapping[str, Any]], now: float, employee: bool) -> str:
    if not holds:
        return '<p id="holds-empty">No active holds: capture is allowed.</p>'
    if employee:
        head = "<tr><th>Kind</th><th>Reason</th><th>Since</th></tr>"
    else:
        head = (
            "<tr><th>Hold</th><th>Kind</th><th>Scope</th><th>Reason</th><th>Ticket</th>"
            "<th>By</th><th>Since</th><th>Epoch</th></tr>"
        )
    rows = []
    for h in holds:
        since = f'<span title="{e(h["created_at"])}">{e(ago(h["created_at_s"], now))}</span>'
        if employee:
            rows.append(
                f"<tr><td>{e(h['kind'])}</td><td>{e(h['reason'])}</td><td>{since}</td></tr>"
            )
            continue
        rows.append(
            f'<tr><td class="id">{e(h["id"])}</td><td>{e(h["kind"])}</td>'
            f"<td>{e(h['scope_text'])}</td><td>{e(h['reason'])}</td>"
            f"<td>{e(h['ticket'] or '-')}</td><td>{e(h['created_by'])}</td><td>{since}</td>"
            f"<td>{e(h['created_epoch'])}</td></tr>"
        )
    body = "".join(rows)
    return f'<table id="holds-table"><thead>{head}</thead><tbody>{body}</tbody></table>'


def _wave_cell(wave: Mapping[str, Any], current: bool) -> str:
    status = wave["state"]
    if status != "pending":
        status += f" \u00b7 {wave['capturing']}/{wave['agents']} capturing"
    return (
        f'<li class="ws-{e(wave["state"])}{" current" if current else ""}"'
        f' data-state="{e(wave["state"])}"><b>{wave["index"] + 1}. {e(wave["name"])}</b>'
        f"<small>{e(wave['target'])}</small><small>{e(status)}</small></li>"
    )


def _gates_table(wave: Mapping[str, Any]) -> str:
    if not wave["gates"]:
        return ""
    rows = "".join(
        f'<tr class="{"pass" if g["passed"] else "fail"}"><td>{e(g["name"])}</td>'
        f"<td>{'pass' if g['passed'] else 'FAIL'}</td><td>{e(g['observed'])}</td>"
        f"<td>{e(g['limit'])}</td></tr>"
        for g in wave["gates"]
    )
    return (
        f'<table id="run-gates" class="gates"><caption>Gates of wave {wave["index"] + 1}</caption>'
        "<thead><tr><th>Gate</th><th>Result</th><th>Observed</th><th>Limit</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def runbook_panel(run: Mapping[str, Any] | None) -> str:
    """The newest runbook run: its state, a cell per wave, the current wave's gates, what next."""
    if run is None:
        return (
            '<section id="runbook"><h2>Runbook</h2>'
            '<p id="run-empty">No runbook has run yet.</p></section>'
        )
    index = run["current_wave"]
    info = f"{run['id']} \u00b7 started {run['started_at']} by {run['started_by']}"
    if run["ended_at"]:
        info += f" \u00b7 ended {run['ended_at']}"
    cells = "".join(_wave_cell(w, w["index"] == index) for w in run["waves"])
    gates = _gates_table(run["waves"][index]) if index >= 0 else ""
    reason, step = run["halt_reason"], run["next_step"]
    halt = f'<p id="run-halt" class="error">{e(reason)}</p>' if reason else ""
    then = f'<p id="run-next">Next step: <code>{e(step)}</code></p>' if step else ""
    return (
        f'<section id="runbook"><h2>Runbook <span id="run-name">'
        f'{e(run["runbook"])}</span> <span id="run-state" class="badge rs-{e(run["state"])}">'
        f'{e(run["state"])}</span> <small id="run-info">{e(info)}</small></h2>'
        f'<ol id="run-waves" class="waves">{cells}</ol>{gates}{halt}{then}</section>'
    )


def overview(data: Mapping[str, Any], viewer: Mapping[str, str], query: Query) -> str:
    now = data["now"]
    employee = bool(data["employee_view"])
    pause = data["pause"]
    pause_age = (
        f'<b id="pause-age" data-since="{e(pause["since_s"])}">'
        f"{e(duration(now - pause['since_s']))}</b>"
        f' <small id="pause-at">since {e(pause["since"])}</small>'
        if pause
        else '<b id="pause-age">-</b> <small id="pause-at">no incident hold</small>'
    )
    ttc = data["time_to_compliance"]
    slowest = ttc["slowest"]
    slowest_id = (
        f' <a id="ttc-slowest-agent" class="id" href="{e(agent_href(slowest["agent_id"]))}">'
        f"{e(slowest['agent_id'])}</a>"
        if slowest
        else ' <a id="ttc-slowest-agent" class="id"></a>'
    )
    compliant = "yes" if data["compliant"] else "NO"
    compliant_class = "ok" if data["compliant"] else "bad"
    scope_note = (
        f'<p class="note">You see only laptops labelled <code>owner={e(viewer["name"])}</code>.</p>'
        if employee
        else ""
    )
    return (
        f'<section id="overview" data-now="{e(now)}">{scope_note}'
        '<div class="cards">'
        f'<div class="card"><span>Epoch</span><b id="epoch">{e(data["epoch"])}</b></div>'
        f'<div class="card"><span>Pause issued</span>{pause_age}</div>'
        f'<div class="card"><span>Compliant</span><b id="compliant" class="{compliant_class}">'
        f"{compliant}</b></div>"
        f'<div class="card"><span>Agents</span><b id="total">{e(data["total"])}</b>'
        f' <small><span id="settled">{e(data["settled"])}</span> settled,'
        f' <span id="problems">{e(data["problems"])}</span> need attention</small></div>'
        "</div>"
        f"{_bar(data['by_state'], data['total'], query)}"
        '<div id="ttc" class="ttc"><span class="label">Time to verified stop, current pause</span>'
        f' p50 <b id="ttc-p50">{_ttc_figure(ttc["p50"])}</b>'
        f' \u00b7 p99 <b id="ttc-p99">{_ttc_figure(ttc["p99"])}</b>'
        f' \u00b7 slowest <b id="ttc-slowest">{_ttc_figure(slowest)}</b>{slowest_id}'
        f' \u00b7 <span id="ttc-counts">{e(ttc["verified"])} of {e(ttc["paused"])}'
        " paused verified</span>"
        f"<details><summary>how this is measured</summary><p>{e(TTC_HELP)}</p></details></div>"
        f"{'' if employee else runbook_panel(data['runbook'])}"
        f'<h2>Active holds</h2><div id="holds">{_holds_table(data["holds"], now, employee)}</div>'
        "</section>"
    )


# ------------------------------------------------------------------ agents table


def _filters(query: Query) -> str:
    options = ['<option value="">any state</option>']
    for state in SEVERITY:
        selected = " selected" if query.state is state else ""
        options.append(f'<option value="{state.value}"{selected}>{state.value}</option>')
    selector = ",".join(f"{k}={v}" for k, v in sorted(query.selector.items()))
    sizes = "".join(
        f'<option value="{n}"{" selected" if n == query.per_page else ""}>{n}</option>'
        for n in (25, 50, 100, 200, 500)
    )
    export = urlencode(query.params(page="", per_page=""))
    return (
        '<form id="filters" method="get" action="/" class="filters">'
        f'<label>State <select id="filter-state" name="state">{"".join(options)}</select></label>'
        f'<label>Labels <input id="filter-selector" name="selector" value="{e(selector)}"'
        ' placeholder="k=v,k=v" size="24" autocomplete="off"></label>'
        f'<label>Id prefix <input id="filter-prefix" name="prefix" value="{e(query.prefix)}"'
        ' placeholder="laptop-00" size="14" autocomplete="off"></label>'
        f'<input type="hidden" name="hold" value="{e(query.hold_id)}">'
        f'<input type="hidden" name="sort" value="{e(query.sort)}">'
        f'<input type="hidden" name="order" value="{"desc" if query.descending else "asc"}">'
        f'<label>Per page <select id="filter-per-page" name="per_page">{sizes}</select></label>'
        '<button type="submit">Apply</button> <a href="/" id="filter-clear">clear</a>'
        '<span class="exports">Export this view:'
        f' <a id="export-csv" href="/export/agents.csv?{e(export)}">CSV</a>'
        f' <a id="export-json" href="/export/agents.json?{e(export)}">JSON</a></span>'
        '<p id="filter-error" class="error" hidden></p>'
        "</form>"
    )


def _header(query: Query) -> str:
    cells = []
    for key, title in COLUMNS:
        active = query.sort == key
        # Clicking the sorted column flips it; another column starts ascending.
        order = ("asc" if query.descending else "desc") if active else "asc"
        arrow = ("\u25bc" if query.descending else "\u25b2") if active else ""
        href = "/?" + urlencode(query.params(sort=key, order=order, page=1))
        aria = f' aria-sort="{"descending" if query.descending else "ascending"}"' if active else ""
        cells.append(
            f'<th data-sort="{key}"{aria}><a href="{e(href)}">{e(title)}</a>'
            f'<span class="arrow">{arrow}</span></th>'
        )
    return f"<thead><tr>{''.join(cells)}</tr></thead>"


def mismatch_marker(data: Mapping[str, Any]) -> str:
    """After the server's labels: what the agent claims instead (never obeyed)."""
    mismatch = data["label_mismatch"]
    if not mismatch:
        return ""
    claims = ",".join(f"{k}={m['reported']}" for k, m in mismatch.items())
    why = "the agent reports other labels; the server's labels decide its holds"
    return f' <span class="mismatch" title="{e(why)}">\u26a0 reports {e(claims)}</span>'


def agent_row(data: Mapping[str, Any], now: float) -> str:
    labels = ",".join(f"{k}={v}" for k, v in data["labels"].items())
    agent_id = data["agent_id"]
    since = _iso_seconds(data["since"])
    last_seen = _iso_seconds(data["last_seen"])
    problem = " problem" if data["state"] in {s.value for s in PROBLEM_STATES} else ""
    return (
        f'<tr data-agent-id="{e(agent_id)}" class="st-row-{e(data["state"])}{problem}">'
        f'<td class="id"><a href="{e(agent_href(agent_id))}">{e(agent_id)}</a></td>'
        f"<td>{badge(data['state'])}</td>"
        f'<td class="reason">{e(data["reason"])}</td>'
        f'<td title="{e(data["since"])}">{e(ago(since, now))}</td>'
        f"<td>{e(data['mode'])}</td>"
        f'<td class="labels">{e(labels)}{mismatch_marker(data)}</td>'
        f"<td>{'yes' if data['connected'] else 'no'}</td>"
        f'<td title="{e(data["last_seen"])}">{e(ago(last_seen, now))}</td>'
        f"<td>{e(data['applied_epoch'])}/{e(data['desired_epoch'])}</td>"
        f'<td class="num">{e(data["events_captured_total"])}</td>'
        f'<td class="num">{e(data["spool_events"])}</td>'
        f'<td class="num">{e(data["uploads_refused"])}</td>'
        f'<td class="num">{e(data["events_accepted_after_pause"])}</td></tr>'
    )


def _pager(page: Page, query: Query) -> str:
    def link(number: int, text: str, rel: str) -> str:
        if number < 1 or number > page.pages or number == page.page:
            return f'<span class="disabled" data-rel="{rel}">{e(text)}</span>'
        href = "/?" + urlencode(query.params(page=number))
        return f'<a href="{e(href)}" data-rel="{rel}" data-page="{number}">{e(text)}</a>'

    first, prev = link(1, "\u00ab first", "first"), link(page.page - 1, "\u2039 prev", "prev")
    after, last = (
        link(page.page + 1, "next \u203a", "next"),
        link(page.pages, "last \u00bb", "last"),
    )
    return (
        f'<nav id="pager" class="pager">{first} {prev}'
        f' <span id="page-info">page {page.page} of {page.pages}</span> {after} {last}</nav>'
    )


def agents_table(rows: Sequence[Mapping[str, Any]], page: Page, query: Query, now: float) -> str:
    body = "".join(agent_row(r, now) for r in rows)
    hidden = " hidden" if rows else ""
    empty = f'<p id="no-rows"{hidden}>No agents match.</p>'
    return (
        '<section id="agents"><h2>Laptops'
        f' <small id="table-info">{page.total} matching</small></h2>'
        f"{_filters(query)}"
        f'<table id="agents-table" class="agents">{_header(query)}<tbody>{body}</tbody></table>'
        f"{empty}{_pager(page, query)}</section>"
    )


def home(
    summary: Mapping[str, Any],
    *,
    viewer: Mapping[str, str],
    rows: Sequence[Mapping[str, Any]],
    page: Page,
    query: Query,
    version: int,
    panels: str = "",
) -> str:
    """``panels``: sections shown between the overview and the table (readiness)."""
    state = json.dumps({"version": version, "employee": summary["employee_view"]})
    body = (
        f'<div id="boot" data-boot="{e(state)}" hidden></div>'
        f"{overview(summary, viewer, query)}{panels}"
        f"{agents_table(rows, page, query, summary['now'])}"
    )
    return layout("Fleet", body, viewer=viewer, script="dashboard.js")


# ------------------------------------------------------------------ one agent


FACTS: list[tuple[str, str]] = [
    ("mode", "Mode"),
    ("since", "In this state since"),
    ("desired_epoch", "Desired epoch"),
    ("applied_epoch", "Acked epoch"),
    ("connected", "Connected"),
    ("last_seen", "Last seen"),
    ("first_seen", "First seen"),
    ("connected_at", "Stream opened"),
    ("disconnected_at", "Stream closed"),
    ("directive_sent_at", "Directive sent"),
    ("acked_at", "Acked"),
    ("verified_at", "Stop verified"),
    ("lease_expires_at", "Lease expires"),
    ("events_captured_total", "Events captured (total)"),
    ("ack_events_captured_total", "Events captured at the ack"),
    ("spool_events", "Spool (events)"),
    ("purged_events", "Purged at the ack"),
    ("quarantined_events", "Quarantined at the ack"),
    ("uploads_refused", "Uploads refused"),
    ("events_accepted_after_pause", "Events accepted after the pause"),
    ("last_accepted_event_at", "Last accepted capture"),
    ("last_event_at", "Last event captured"),
]


def _fact_value(data: Mapping[str, Any], key: str) -> str:
    value = data[key]
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _describe_event(event: TimelineEvent | HoldEvent, employee: bool) -> dict[str, Any]:
    if isinstance(event, HoldEvent):
        hold = event.hold
        verb = "lifted" if event.lifted else "created"
        text = f"{hold.kind.value} hold {verb}: {hold.reason}"
        if not employee:
            who = hold.lifted_by if event.lifted else hold.created_by
            text = f"{hold.kind.value} hold {hold.id} {verb} by {who}: {hold.reason}"
            if hold.ticket:
                text += f" [{hold.ticket}]"
        return {
            "at": event.at,
            "kind": f"hold_{verb}",
            "epoch": event.epoch,
            "state": "",
            "text": text,
            "count": 1,
            "last_at": event.at,
        }
    text = event.text
    if event.kind == "heartbeat":
        text = f"{event.count} heartbeat{'s' if event.count != 1 else ''}"
    return {
        "at": event.at,
        "kind": event.kind.value,
        "epoch": event.epoch,
        "state": event.state,
        "text": text,
        "count": event.count,
        "last_at": event.last_at,
    }


def timeline_data(
    events: Iterable[TimelineEvent | HoldEvent], employee: bool
) -> list[dict[str, Any]]:
    """Newest first."""
    return [_describe_event(ev, employee) for ev in reversed(list(events))]


def _clock(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%H:%M:%S.%f")[:-3]


def timeline_rows(events: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for ev in events:
        when = _clock(ev["at"])
        if ev["count"] > 1:
            when += f" \u2013 {_clock(ev['last_at'])}"
        state = badge(ev["state"]) if ev["state"] else ""
        rows.append(
            f'<tr class="ev-{e(ev["kind"])}"><td class="time">{e(when)}</td>'
            f"<td>{e(ev['kind'])}</td><td>{e(ev['epoch'] or '')}</td>"
            f'<td>{state}</td><td class="text">{e(ev["text"])}</td></tr>'
        )
    if not rows:
        return '<tr><td colspan="5">Nothing recorded since the server started.</td></tr>'
    return "".join(rows)


def agent_detail(
    data: Mapping[str, Any],
    events: Sequence[Mapping[str, Any]],
    viewer: Mapping[str, str],
    version: int,
) -> str:
    agent_id = data["agent_id"]
    facts = "".join(
        f'<dt>{e(title)}</dt><dd id="fact-{key}">{e(_fact_value(data, key))}</dd>'
        for key, title in FACTS
    )
    labels = ",".join(f"{k}={v}" for k, v in data["labels"].items()) or "-"
    channels = (
        ", ".join(f"{k}: {'ACTIVE' if on else 'stopped'}" for k, on in data["channels"].items())
        or "-"
    )
    violation = data["violation"]
    evidence = (
        '<section id="violation" class="evidence"><h2>Violation evidence</h2>'
        f'<p id="violation-evidence">{e(violation["evidence"])}</p>'
        f'<p><small>flagged at <span id="violation-at">{e(violation["at"])}</span>; sticky until an'
        " incident commander runs <code>killswitch ack-violation</code></small></p></section>"
        if violation
        else '<section id="violation" hidden></section>'
    )
    nack = data["nack"]
    nack_html = (
        f'<p id="nack">Last nack: epoch {e(nack["epoch"])} at {e(nack["at"])}:'
        f" {e(nack['reason'])}</p>"
        if nack
        else ""
    )
    desired = data["desired"]
    holds = " ".join(data["hold_ids"]) or "-"
    boot = json.dumps({"version": version, "agent_id": agent_id})
    body = (
        f'<div id="boot" data-boot="{e(boot)}" hidden></div>'
        f'<p class="crumbs"><a href="/">\u2190 fleet</a></p>'
        f'<section id="agent"><h1><span class="id" id="agent-id">{e(agent_id)}</span>'
        f' <span id="agent-state">{badge(data["state"])}</span></h1>'
        f'<p id="agent-reason" class="reason">{e(data["reason"])}</p>'
        f"{evidence}"
        f'<p>Desired: <b id="desired-mode">{e(desired["mode"])}</b> at epoch'
        f' <span id="desired-epoch">{e(desired["epoch"])}</span> since'
        f' <span id="desired-since">{e(desired["since"])}</span> \u2014'
        f' <span id="desired-reason">{e(desired["reason"])}</span>'
        f' (holds: <span id="hold-ids" class="id">{e(holds)}</span>)</p>'
        f'<p>Labels: <span id="agent-labels" class="labels">{e(labels)}</span></p>'
        f'<p>Channels: <span id="agent-channels">{e(channels)}</span></p>'
        f"{nack_html}"
        f'<dl id="agent-facts" class="facts">{facts}</dl></section>'
        "<section><h2>Timeline <small>newest first; times UTC; kept in memory since the server"
        " started (the newest entries per laptop only)</small></h2>"
        '<table id="timeline" class="timeline"><thead><tr><th>Time</th><th>Event</th><th>Epoch</th>'
        f"<th>State</th><th>Detail</th></tr></thead><tbody>{timeline_rows(events)}</tbody></table></section>"
    )
    return layout(agent_id, body, viewer=viewer, script="agent.js")


def not_found_page(viewer: Mapping[str, str]) -> str:
    return message_page(
        "No such laptop",
        "<p>There is no laptop with that id that you can see."
        ' <a href="/">Back to the fleet</a>.</p>',
        viewer=viewer,
    )
