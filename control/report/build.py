"""The proof report of one hold, from the server's state: pure, no I/O.

Per-laptop facts are the server's newest (the ``agents`` view as of ``generated_at``):
the report proves a pause while the hold stands. After a resume the agents' stop
evidence is replaced by their new state; the audit excerpt keeps what happened.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC
from datetime import datetime
from typing import TYPE_CHECKING
from typing import Any

from control.domain import Hold
from control.domain import Mode
from control.domain.audit import AuditEntry
from control.domain.audit import ChainHead

if TYPE_CHECKING:
    # The plane (and its store drivers) for a type only: `killswitch report` renders
    # with this module, and every CLI command imports that one.
    from control.plane import AgentView

KIND = "killswitch-proof-report/1"
# Audit actions about one laptop that belong in its hold's excerpt once the hold began.
_LAPTOP_ACTIONS = frozenset(
    {"agent.violation", "agent.acknowledge_violation", "agent.relabel", "agent.label_mismatch"}
)


def when(at: float | None) -> str | None:
    """ISO 8601 UTC to the millisecond: exact enough to order events, stable in JSON."""
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")


def _seconds(value: float) -> float:
    return round(value, 3)


def hold_facts(hold: Hold) -> dict[str, Any]:
    return {
        "id": hold.id,
        "kind": hold.kind.value,
        "scope": hold.scope.describe(),
        "reason": hold.reason,
        "ticket": hold.ticket,
        "created_by": hold.created_by,
        "created_at": when(hold.created_at),
        "created_epoch": hold.created_epoch,
        "keep_spool": hold.keep_spool,
        "active": hold.active,
        "lifted_at": when(hold.lifted_at),
        "lifted_by": hold.lifted_by or None,
        "lifted_epoch": hold.lifted_epoch or None,
    }


def _opt_out(hold: Hold | None, since: float) -> dict[str, Any] | None:
    """The laptop's opt-out, if it stood at any time since the hold began."""
    if hold is None or (hold.lifted_at is not None and hold.lifted_at < since):
        return None
    return {
        "hold_id": hold.id,
        "reason": hold.reason,
        "since": when(hold.created_at),
        "until": when(hold.lifted_at),
    }


def laptop_row(
    view: AgentView, hold: Hold, opt_out: Hold | None, violations: int
) -> dict[str, Any]:
    status = view.status
    acked_pause = status.acked_mode is Mode.PAUSED and status.acked_epoch >= hold.created_epoch
    verified = view.desired.mode is Mode.PAUSED and status.verified_at is not None
    to_verified = (
        _seconds(max(0.0, status.verified_at - hold.created_at))
        if verified and status.verified_at is not None
        else None
    )
    return {
        "agent_id": view.agent_id,
        "labels": dict(sorted(view.labels.items())),
        "state": view.compliance.state.value,
        "state_reason": view.compliance.reason,
        "desired_mode": view.desired.mode.value,
        "desired_epoch": view.desired.epoch,
        "directive_sent_at": when(status.directive_sent_at),
        "acked_pause": acked_pause,
        "acked_epoch": status.acked_epoch,
        "acked_at": when(status.acked_at),
        "verified_at": when(status.verified_at) if verified else None,
        "seconds_to_verified": to_verified,
        "lease_expires_at": when(status.lease_expires_at),
        "last_seen": when(status.last_seen),
        "violation": (
            {"evidence": status.violation, "at": when(status.violation_at)}
            if status.violation
            else None
        ),
        "violations_audited": violations,
        "uploads_refused": status.uploads_refused,
        "events_accepted_after_pause": status.events_accepted_after_pause,
        "last_accepted_event_at": when(status.last_accepted_event_at),
        "opt_out": _opt_out(opt_out, hold.created_at),
    }


def nearest_rank(values: Sequence[float], share: float) -> float | None:
    """The smallest value at least ``share`` of ``values`` are at or below."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def fleet_figures(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    times = [r["seconds_to_verified"] for r in rows if r["seconds_to_verified"] is not None]
    unreached = [r for r in rows if r["seconds_to_verified"] is None]
    return {
        "laptops": len(rows),
        "verified": len(times),
        "verified_percent": round(100.0 * len(times) / len(rows), 2) if rows else 100.0,
        # Null until every laptop is verified: the fleet has not reached 100%.
        "seconds_to_all_verified": max(times) if rows and not unreached else None,
        "p50_seconds_to_verified": nearest_rank(times, 0.50),
        "p99_seconds_to_verified": nearest_rank(times, 0.99),
        "never_reached": [
            {"agent_id": r["agent_id"], "state": r["state"], "why": r["state_reason"]}
            for r in unreached
        ],
        "violations": sum(1 for r in rows if r["violation"] or r["violations_audited"]),
        "uploads_refused": sum(r["uploads_refused"] for r in rows),
        "events_accepted_after_pause": sum(r["events_accepted_after_pause"] for r in rows),
        "opted_out": sum(1 for r in rows if r["opt_out"]),
    }


def concerns(entry: AuditEntry, hold: Hold, laptops: frozenset[str]) -> bool:
    """Is this audit entry part of the hold's story: the hold itself, its resume
    requests, or, since it began, a covered laptop's violations, labels and opt-outs."""
    record = entry.record
    if hold.id in record.target.split() or hold.id in record.detail.split():
        return True
    if record.at < hold.created_at:
        return False
    first = record.target.split(" ", 1)[0]
    if record.action in _LAPTOP_ACTIONS:
        return first in laptops
    return first.startswith("opt-out-") and first.removeprefix("opt-out-") in laptops


def audit_row(entry: AuditEntry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        **asdict(entry.record),
        "prev_hash": entry.prev_hash,
        "hash": entry.hash,
    }


def build(
    hold: Hold,
    views: Iterable[AgentView],
    *,
    opt_outs: Mapping[str, Hold],
    audit: Iterable[AuditEntry],
    head: ChainHead,
    checkpoint: str | None,
    now: float,
    epoch: int,
) -> dict[str, Any]:
    """The report's body, ready to sign: laptops by id, audit entries by seq."""
    covered = sorted(views, key=lambda v: v.agent_id)
    laptops = frozenset(v.agent_id for v in covered)
    excerpt = [e for e in audit if concerns(e, hold, laptops)]
    violations: dict[str, int] = {}
    for entry in excerpt:
        if entry.record.action == "agent.violation":
            violations[entry.record.target] = violations.get(entry.record.target, 0) + 1
    rows = [
        laptop_row(v, hold, opt_outs.get(v.agent_id), violations.get(v.agent_id, 0))
        for v in covered
    ]
    return {
        "kind": KIND,
        "generated_at": when(now),
        "generated_at_seconds": now,
        "epoch": epoch,
        "hold": hold_facts(hold),
        "figures": fleet_figures(rows),
        "laptops": rows,
        "audit": {
            "entries": [audit_row(e) for e in excerpt],
            "head": {"seq": head.seq, "hash": head.hash},
            "checkpoint": checkpoint,
        },
    }
