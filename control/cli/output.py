"""How the CLI shows the server's messages: tables for people, ``--json`` for machines.

Shared by every command that prints holds, agents or times, so each is shown one way.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from killswitch.v1 import killswitch_pb2 as pb

from control.domain.labels import label_mismatch
from control.domain.labels import mismatch_json
from control.wire import iso


def ago(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    delta = max(0.0, time.time() - (ts.seconds + ts.nanos / 1e9))
    if delta < 120:
        return f"{delta:.0f}s ago"
    if delta < 7200:
        return f"{delta / 60:.0f}m ago"
    return f"{delta / 3600:.1f}h ago"


def scope_json(scope: pb.Scope) -> dict[str, Any]:
    target = scope.WhichOneof("target")
    if target == "selector":
        return {"selector": dict(sorted(scope.selector.match_labels.items()))}
    if target == "agents":
        return {"agents": list(scope.agents.ids)}
    return {"all": True}


def scope_text(scope: pb.Scope) -> str:
    data = scope_json(scope)
    if "selector" in data:
        return ",".join(f"{k}={v}" for k, v in data["selector"].items())
    if "agents" in data:
        ids = data["agents"]
        return "agents " + ",".join(ids[:3]) + (f" (+{len(ids) - 3})" if len(ids) > 3 else "")
    return "all agents"


def hold_kind_name(kind: int) -> str:
    return pb.HoldKind.Name(kind).removeprefix("HOLD_KIND_").lower()  # type: ignore[arg-type]


def hold_json(hold: pb.Hold) -> dict[str, Any]:
    return {
        "id": hold.id,
        "kind": hold_kind_name(hold.kind),
        "scope": scope_json(hold.scope),
        "reason": hold.reason,
        "ticket": hold.ticket,
        "created_by": hold.created_by,
        "created_at": iso(hold.created_at),
        "created_epoch": hold.created_epoch,
        "keep_spool": hold.keep_spool,
    }


def mode_name(mode: int) -> str:
    return pb.Mode.Name(mode).removeprefix("MODE_")  # type: ignore[arg-type]


def agent_json(agent: pb.AgentRecord) -> dict[str, Any]:
    return {
        "agent_id": agent.agent_id,
        "labels": dict(sorted(agent.labels.items())),
        "mode": mode_name(agent.mode),
        "state": agent.state,
        "reason": agent.reason,
        "since": iso(agent.since),
        "connected": agent.connected,
        "last_seen": iso(agent.last_seen),
        "applied_epoch": agent.applied_epoch,
        "desired_epoch": agent.desired_epoch,
        "hold_ids": list(agent.hold_ids),
        "lease_expires_at": iso(agent.lease_expires_at),
        "verified_at": iso(agent.verified_at),
        "events_captured_total": agent.events_captured_total,
        "spool_events": agent.spool_events,
        "uploads_refused": agent.uploads_refused,
        "events_accepted_after_pause": agent.events_accepted_after_pause,
        "last_accepted_event_at": iso(agent.last_accepted_event_at),
        "reported_labels": dict(sorted(agent.reported_labels.items())),
        "label_mismatch": mismatch_json(agent.labels, agent.reported_labels),
    }


def mismatch_cell(agent: pb.AgentRecord) -> str:
    """``org=marketing (server: finance)``: what the agent claims that the server denies."""
    mismatch = label_mismatch(agent.labels, agent.reported_labels)
    return ",".join(
        f"{key}={reported} (server: {server or 'none'})"
        for key, (server, reported) in mismatch.items()
    )


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """To ``sys.stdout`` as it is now, not at import: ``pause -q --wait`` redirects it to stderr."""
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        sys.stdout.write(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        )
        sys.stdout.write("\n")


def agent_rows(agents: Sequence[pb.AgentRecord]) -> list[list[str]]:
    header = [
        "AGENT",
        "LABELS",
        "MODE",
        "STATE",
        "SINCE",
        "CONNECTED",
        "LAST SEEN",
        "EPOCH",
        "REFUSED",
        "AFTER PAUSE",
        "LAST ACCEPTED",
        "LABEL MISMATCH",
        "REASON",
    ]
    rows = [header]
    for a in agents:
        labels = ",".join(f"{k}={v}" for k, v in sorted(a.labels.items()))
        rows.append(
            [
                a.agent_id,
                labels,
                mode_name(a.mode),
                a.state,
                ago(a.since),
                "yes" if a.connected else "no",
                ago(a.last_seen),
                str(a.applied_epoch),
                str(a.uploads_refused),
                str(a.events_accepted_after_pause),
                ago(a.last_accepted_event_at),
                mismatch_cell(a) or "-",
                a.reason,
            ]
        )
    return rows


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")
