"""One runbook run as JSON: what ``killswitch runbook status --json`` prints and what the
dashboard's runbook panel serves, made from the one wire form (``pb.RunbookRun``, built
by ``run_to_pb``) so that the two cannot drift apart field by field.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message
from killswitch.v1 import killswitch_pb2 as pb

from control.wire import iso


def wave_json(wave: pb.WaveProgress) -> dict[str, Any]:
    return {
        **_as_on_the_wire(wave, "index", "name", "target", "state", "agents", "capturing"),
        "started_at": iso(wave.started_at),
        "passed_at": iso(wave.passed_at),
        "time_to_compliance_seconds": wave.time_to_compliance_seconds or None,
        **_as_on_the_wire(wave, "soak_seconds", "confirm"),
        "gates": [_as_on_the_wire(g, "name", "passed", "observed", "limit") for g in wave.gates],
    }


def run_json(run: pb.RunbookRun) -> dict[str, Any]:
    return {
        **_as_on_the_wire(
            run,
            "id",
            "runbook",
            "file_name",
            "state",
            "hold_id",
            "lifted_hold_id",
            "approval_id",
            "started_by",
        ),
        "started_at": iso(run.started_at),
        "ended_at": iso(run.ended_at),
        "current_wave": run.current_wave,
        "pause_time_to_compliance_seconds": run.pause_time_to_compliance_seconds or None,
        **_as_on_the_wire(run, "halt_reason", "next_step"),
        "waves": [wave_json(w) for w in run.waves],
    }


def _as_on_the_wire(message: Message, *fields: str) -> dict[str, Any]:
    """These fields, in this order, with their wire values: each JSON key is its field's
    wire name by construction, not a second spelling of it that could drift."""
    return {field: getattr(message, field) for field in fields}
