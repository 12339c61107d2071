"""What the dashboard shows, as plain data: filtered, sorted pages of agents, the overview.

No HTTP here: handlers in ``dashboard.py`` turn request parameters into a ``Query``
and these dicts into JSON, CSV or HTML. Rows have exactly the shape of
``killswitch agents --json``, so an export and the CLI agree field for field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import Protocol

from control.domain import AgentStatus
from control.domain import Compliance
from control.domain import ComplianceState
from control.domain import Desired
from control.domain import Hold
from control.domain import HoldKind
from control.domain import Mode
from control.domain import ScopeKind
from control.domain import fleet_compliant
from control.domain import format_labels
from control.domain import is_settled
from control.domain import parse_selector
from control.domain.identity import Principal
from control.domain.identity import Role
from control.domain.labels import mismatch_json
from control.domain.rollout import Run
from control.domain.rollout import Runbook
from control.errors import InvalidInput
from control.errors import NotFound
from control.errors import shown
from control.plane import SEVERITY
from control.plane import AgentFilter
from control.plane import AgentView
from control.plane import ControlPlane
from control.rpc.runbook_service import run_to_pb
from control.runbook_json import run_json
from control.wire import iso_of_seconds as iso

VIEWER_ROLES = frozenset({Role.INCIDENT_COMMANDER, Role.APPROVER, Role.SRE})
PER_PAGE_DEFAULT = 50
PER_PAGE_MAX = 500
MAX_PREFIX = 128
MAX_SELECTOR = 1000
SEVERITY_RANK = {state: rank for rank, state in enumerate(SEVERITY)}
# Non-compliant states: what an incident commander must look at first.
PROBLEM_STATES = frozenset(
    {
        ComplianceState.VIOLATION,
        ComplianceState.FAILED,
        ComplianceState.OVERDUE,
        ComplianceState.OFFLINE_AT_RISK,
    }
)


def is_employee(principal: Principal) -> bool:
    return principal.role is Role.EMPLOYEE


def may_view(principal: Principal) -> bool:
    """Who the dashboard is for: operators see the whole fleet, employees their own
    laptops; automation and agent identities are refused."""
    return principal.role in VIEWER_ROLES or is_employee(principal)


# ------------------------------------------------------------------ rows


def row(view: AgentView) -> dict[str, Any]:
    """One agent, field for field as ``killswitch agents --json`` prints it."""
    status = view.status
    return {
        "agent_id": view.agent_id,
        "labels": dict(sorted(view.labels.items())),
        "mode": view.desired.mode.value,
        "state": view.compliance.state.value,
        "reason": view.compliance.reason,
        "since": iso(view.compliance.since),
        "connected": status.connected,
        "last_seen": iso(status.last_seen),
        "applied_epoch": status.acked_epoch,
        "desired_epoch": view.desired.epoch,
        "hold_ids": list(view.desired.hold_ids),
        "lease_expires_at": iso(status.lease_expires_at),
        "verified_at": iso(status.verified_at),
        "events_captured_total": status.report.events_total,
        "spool_events": status.report.spool_events,
        "uploads_refused": status.uploads_refused,
        "events_accepted_after_pause": status.events_accepted_after_pause,
        "last_accepted_event_at": iso(status.last_accepted_event_at),
        "reported_labels": dict(sorted((status.reported_labels or {}).items())),
        "label_mismatch": mismatch_json(view.labels, status.reported_labels),
    }


def detail(view: AgentView) -> dict[str, Any]:
    """Everything the plane knows about one agent: the row, and the facts behind its state."""
    status = view.status
    return {
        **row(view),
        "desired": {
            "mode": view.desired.mode.value,
            "epoch": view.desired.epoch,
            "reason": view.desired.reason,
            "since": iso(view.desired.since),
            "purge_spool": view.desired.purge_spool,
        },
        "first_seen": iso(status.first_seen),
        "connected_at": iso(status.connected_at),
        "disconnected_at": iso(status.disconnected_at),
        "directive_sent_at": iso(status.directive_sent_at),
        "directive_sent_epoch": status.directive_sent_epoch,
        "acked_at": iso(status.acked_at),
        "acked_mode": status.acked_mode.value if status.acked_mode else None,
        "acked_since_connect": status.acked_since_connect,
        "nack": {
            "epoch": status.nack_epoch,
            "reason": status.nack_reason,
            "at": iso(status.nack_at),
        }
        if status.nack_at is not None
        else None,
        "channels": dict(sorted(status.channels.items())),
        "last_event_at": iso(status.report.last_event_at),
        "ack_events_captured_total": status.ack_report.events_total,
        "ack_spool_events": status.ack_report.spool_events,
        "purged_events": status.purged_events,
        "quarantined_events": status.quarantined_events,
        "violation": {"evidence": status.violation, "at": iso(status.violation_at)}
        if status.violation
        else None,
    }


CSV_COLUMNS = (
    "agent_id",
    "labels",
    "mode",
    "state",
    "reason",
    "since",
    "connected",
    "last_seen",
    "applied_epoch",
    "desired_epoch",
    "hold_ids",
    "lease_expires_at",
    "verified_at",
    "events_captured_total",
    "spool_events",
    "uploads_refused",
    "events_accepted_after_pause",
    "last_accepted_event_at",
)
# A spreadsheet runs a cell starting with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cells(data: Mapping[str, Any]) -> list[str]:
    """One CSV record: labels as k=v,k=v, hold ids space-separated, null as empty."""
    cells = []
    for column in CSV_COLUMNS:
        value = data[column]
        if column == "labels":
            text = format_labels(value)
        elif column == "hold_ids":
            text = " ".join(value)
        elif value is None:
            text = ""
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        if text.startswith(_FORMULA_START):
            text = "'" + text
        cells.append(text)
    return cells


# ------------------------------------------------------------------ queries


# An AgentView's fields as a plain tuple (``FleetViews.snapshot``): cheap to build for
# 10,000 agents; a real AgentView is built only for the rows actually shown.
Snap = tuple[str, Mapping[str, str], Desired, AgentStatus, Compliance]

SORT_KEYS: dict[str, Callable[[Snap], Any]] = {
    "agent_id": lambda a: a[0],
    "labels": lambda a: format_labels(a[1]),
    "mode": lambda a: a[2].mode.value,
    "state": lambda a: SEVERITY_RANK[a[4].state],
    "reason": lambda a: a[4].reason,
    "since": lambda a: a[4].since,
    "connected": lambda a: a[3].connected,
    "last_seen": lambda a: a[3].last_seen,
    "applied_epoch": lambda a: a[3].acked_epoch,
    "desired_epoch": lambda a: a[2].epoch,
    "lease_expires_at": lambda a: a[3].lease_expires_at,
    "verified_at": lambda a: a[3].verified_at,
    "events_captured_total": lambda a: a[3].report.events_total,
    "spool_events": lambda a: a[3].report.spool_events,
    "uploads_refused": lambda a: a[3].uploads_refused,
    "events_accepted_after_pause": lambda a: a[3].events_accepted_after_pause,
}


@dataclass(frozen=True, slots=True)
class Query:
    state: ComplianceState | None = None
    selector: Mapping[str, str] = field(default_factory=dict)
    prefix: str = ""
    hold_id: str = ""
    sort: str = "state"
    descending: bool = False
    page: int = 1
    per_page: int = PER_PAGE_DEFAULT

    def params(self, **changes: Any) -> dict[str, str]:
        """The query string for this query with some fields changed (links, exports)."""
        values = {
            "state": self.state.value if self.state else "",
            "selector": format_labels(self.selector),
            "prefix": self.prefix,
            "hold": self.hold_id,
            "sort": self.sort,
            "order": "desc" if self.descending else "asc",
            "page": str(self.page),
            "per_page": str(self.per_page),
        }
        values.update({k: str(v) for k, v in changes.items()})
        defaults = {"sort": "state", "order": "asc", "page": "1", "per_page": str(PER_PAGE_DEFAULT)}
        return {k: v for k, v in values.items() if v and defaults.get(k) != v}


def _int(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = params.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise InvalidInput(f"{name} must be a whole number, got {shown(text)}") from None
    return max(low, min(high, value))


def parse_query(params: Mapping[str, str]) -> Query:
    """Query-string parameters -> Query; ``InvalidInput`` with one line for anything bad."""
    state = None
    if text := params.get("state", "").strip():
        try:
            state = ComplianceState(text.upper())
        except ValueError:
            known = ", ".join(s.value for s in ComplianceState)
            raise InvalidInput(f"unknown state {shown(text)}; one of: {known}") from None
    selector: dict[str, str] = {}
    if text := params.get("selector", "").strip():
        if len(text) > MAX_SELECTOR:
            raise InvalidInput("selector is too long")
        selector = parse_selector(text)
    prefix = params.get("prefix", "").strip()
    if len(prefix) > MAX_PREFIX:
        raise InvalidInput(f"id prefix is too long; at most {MAX_PREFIX} characters")
    sort = params.get("sort", "").strip() or "state"
    if sort not in SORT_KEYS:
        raise InvalidInput(f"cannot sort by {shown(sort)}; one of: {', '.join(SORT_KEYS)}")
    order = params.get("order", "").strip().lower() or "asc"
    if order not in ("asc", "desc"):
        raise InvalidInput("order must be asc or desc")
    hold_id = params.get("hold", "").strip()
    if len(hold_id) > MAX_PREFIX:
        raise InvalidInput("hold id is too long")
    return Query(
        state=state,
        selector=selector,
        prefix=prefix,
        hold_id=hold_id,
        sort=sort,
        descending=order == "desc",
        page=_int(params, "page", 1, 1, 10**9),
        per_page=_int(params, "per_page", PER_PAGE_DEFAULT, 1, PER_PAGE_MAX),
    )


def _agent_filter(
    principal: Principal, state: ComplianceState | None, selector: Mapping[str, str], hold: str
) -> AgentFilter | None:
    """The plane's filter for what this person may see; None when that is nothing."""
    labels = dict(selector)
    if is_employee(principal):
        # Employees see only their own laptops, whatever selector they type.
        if labels.get("owner", principal.name) != principal.name:
            return None
        labels["owner"] = principal.name
    return AgentFilter(state=state, match_labels=labels, hold_id=hold)


def select(plane: ControlPlane, query: Query, principal: Principal) -> list[Snap]:
    """Every agent matching the query that this person may see, in the query's order.

    Ties (and empty values, always last) fall back to the agent id, so paging is stable.
    """
    agent_filter = _agent_filter(principal, query.state, query.selector, query.hold_id)
    if agent_filter is None:
        return []
    try:
        views = plane.snapshot(agent_filter)
    except NotFound:
        raise InvalidInput(f"unknown hold {shown(query.hold_id)}") from None
    if query.prefix:
        prefix = query.prefix
        views = [v for v in views if v[0].startswith(prefix)]
    key = SORT_KEYS[query.sort]
    if query.sort == "agent_id":
        views.sort(key=key, reverse=query.descending)
        return views
    views.sort(key=SORT_KEYS["agent_id"])
    present = [v for v in views if key(v) is not None]
    missing = [v for v in views if key(v) is None] if len(present) != len(views) else []
    # Stable sorts: equal keys keep the id order, in either direction.
    present.sort(key=key, reverse=query.descending)
    return present + missing


@dataclass(frozen=True, slots=True)
class Page:
    total: int
    page: int
    pages: int
    per_page: int
    views: Sequence[AgentView]


def paginate(views: Sequence[Snap], query: Query) -> Page:
    pages = max(1, math.ceil(len(views) / query.per_page))
    page = min(query.page, pages)
    start = (page - 1) * query.per_page
    shown = [AgentView(*v) for v in views[start : start + query.per_page]]
    return Page(len(views), page, pages, query.per_page, shown)


def visible_agent(plane: ControlPlane, agent_id: str, principal: Principal) -> AgentView | None:
    """The agent if it exists and this person may see it (the same None either way)."""
    view = plane.agent_view(agent_id)
    if view is None:
        return None
    if is_employee(principal) and view.labels.get("owner") != principal.name:
        return None
    return view


# ------------------------------------------------------------------ overview


def hold_data(hold: Hold, principal: Principal) -> dict[str, Any]:
    """A hold as the viewer may see it: employees get its kind, reason and time only."""
    data: dict[str, Any] = {
        "id": hold.id,
        "kind": hold.kind.value,
        "reason": hold.reason,
        "created_at": iso(hold.created_at),
        "created_at_s": hold.created_at,
        "created_epoch": hold.created_epoch,
    }
    if is_employee(principal):
        return data
    scope: dict[str, Any]
    if hold.scope.kind is ScopeKind.SELECTOR:
        scope = {"selector": dict(sorted(hold.scope.match_labels.items()))}
    elif hold.scope.kind is ScopeKind.AGENTS:
        scope = {"agents": sorted(hold.scope.agent_ids)}
    else:
        scope = {"all": True}
    data.update(
        scope=scope,
        scope_text=hold.scope.describe(),
        ticket=hold.ticket,
        created_by=hold.created_by,
        keep_spool=hold.keep_spool,
    )
    return data


def _percentile(ordered: Sequence[tuple[float, bool, str]], q: float) -> dict[str, Any] | None:
    """Nearest rank: the smallest figure at least ``q`` of the agents are at or under."""
    if not ordered:
        return None
    seconds, verified, agent_id = ordered[max(0, math.ceil(q * len(ordered)) - 1)]
    return {"seconds": round(seconds, 3), "verified": verified, "agent_id": agent_id}


def time_to_compliance(views: Iterable[Snap], now: float) -> dict[str, Any]:
    """How long paused agents took to be *verified* stopped, for their current pause.

    Each paused agent's figure runs from its desired state's ``since`` (the pause that
    applies to it now) to ``verified_at``. An agent not verified yet (pending, overdue,
    failed, in violation, offline — lease-expired ones too, whose stop is presumed,
    not proven) has no figure: it ranks after every verified agent, with the time it
    has waited so far as a lower bound. So a percentile that lands on one reads
    "at least N s, not reached yet", and the slowest agent is the longest-waiting
    unverified one if there is any.
    """
    done: list[tuple[float, bool, str]] = []
    waiting: list[tuple[float, bool, str]] = []
    verified_state = ComplianceState.VERIFIED_STOPPED
    for agent_id, _, desired, status, verdict in views:
        if desired.mode is not Mode.PAUSED:
            continue
        verified_at = status.verified_at
        if verdict.state is verified_state and verified_at is not None:
            done.append((max(0.0, verified_at - desired.since), True, agent_id))
        else:
            waiting.append((max(0.0, now - desired.since), False, agent_id))
    done.sort()
    waiting.sort()
    ordered = done + waiting
    return {
        "paused": len(ordered),
        "verified": len(done),
        "waiting": len(waiting),
        "p50": _percentile(ordered, 0.50),
        "p99": _percentile(ordered, 0.99),
        "slowest": _percentile(ordered, 1.0),
    }


def summary(plane: ControlPlane, principal: Principal) -> dict[str, Any]:
    """The overview, in one pass over the agents this person may see."""
    agent_filter = _agent_filter(principal, None, {}, "")
    views = plane.snapshot(agent_filter) if agent_filter is not None else []
    now = plane.now()
    by_state = dict.fromkeys(SEVERITY, 0)
    verdicts = []
    for _, _, desired, _, verdict in views:
        by_state[verdict.state] += 1
        verdicts.append((desired.mode, verdict.state))
    holds = plane.active_holds()
    if is_employee(principal):
        mine = {h for v in views for h in v[2].hold_ids}
        holds = [h for h in holds if h.id in mine]
    incidents = [h for h in holds if h.kind is HoldKind.INCIDENT]
    pause = max(incidents, key=lambda h: h.created_at) if incidents else None
    return {
        "now": now,
        "epoch": plane.epoch,
        "employee_view": is_employee(principal),
        "holds": [hold_data(h, principal) for h in holds],
        "total": len(views),
        "by_state": {s.value: n for s, n in by_state.items()},
        "problems": sum(by_state[s] for s in PROBLEM_STATES),
        "settled": sum(1 for mode, state in verdicts if is_settled(mode, state)),
        "compliant": fleet_compliant(verdicts),
        "pause": None
        if pause is None
        else {"hold_id": pause.id, "since": iso(pause.created_at), "since_s": pause.created_at},
        "time_to_compliance": time_to_compliance(views, now),
    }


# ------------------------------------------------------------------ runbook runs


class RunSource(Protocol):
    """What the dashboard reads of the runbook runner: its runs, oldest first, and their books."""

    def runs(self) -> list[Run]: ...

    def book(self, run_id: str) -> Runbook: ...


def run_data(run: Run, book: Runbook) -> dict[str, Any]:
    """One run, field for field as ``killswitch runbook status --json`` prints it: the
    same function, over the same wire form."""
    return run_json(run_to_pb(run, book))
