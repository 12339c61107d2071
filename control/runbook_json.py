"""One runbook run as JSON: what ``killswitch runbook status --json`` prints and what the
dashboard's runbook panel serves, made from the one wire form (``pb.RunbookRun``, built
by ``run_to_pb``) so that the two cannot drift apart field by field.
"""

from __future__ import annotations

from typing import Any

from killswitch.v1 import killswitch_pb2 as pb

from control.wire import iso


def wave_json(wave: pb.WaveProgress) -> dict[str, Any]:
    return {
        "index": wave.index,
        "name": wave.name,
        "target": wave.target,
        "state": wave.state,
        "agents": wave.agents,
        "capturing": wave.capturing,
        "started_at": iso(wave.started_at),
        "passed_at": iso(wave.passed_at),
        "time_to_compliance_seconds": wave.time_to_compliance_seconds or None,
        "soak_seconds": wave.soak_seconds,
        "confirm": wave.confirm,
        "gates": [
            {"name": g.name, "passed": g.passed, "observed": g.observed, "limit": g.limit}
            for g in wave.gates
        ],
    }


def run_json(run: pb.RunbookRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "runbook": run.runbook,
        "file_name": run.file_name,
        "state": run.state,
        "hold_id": run.hold_id,
        "lifted_hold_id": run.lifted_hold_id,
        "approval_id": run.approval_id,
        "started_by": run.started_by,
        "started_at": iso(run.started_at),
        "ended_at": iso(run.ended_at),
        "current_wave": run.current_wave,
        "pause_time_to_compliance_seconds": run.pause_time_to_compliance_seconds or None,
        "halt_reason": run.halt_reason,
        "next_step": run.next_step,
        "waves": [wave_json(w) for w in run.waves],
    }
