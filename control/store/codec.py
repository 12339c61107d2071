"""JSON shapes of runbook runs and releases, shared by every store.

A run is stored as one document: it is read and written whole, by one runner, and
its shape grows with the runbook features rather than with queries.
"""

from __future__ import annotations

import json
from typing import Any

from control.domain.release import Release
from control.domain.rollout import GateResult, Run, RunState, WaveProgress, WaveState


def release_to_json(release: Release | None) -> str | None:
    if release is None:
        return None
    return json.dumps(
        {
            "seed": release.seed,
            "share": release.share,
            "selectors": [dict(selector) for selector in release.selectors],
        }
    )


def release_from_json(text: str | None) -> Release | None:
    if text is None:
        return None
    data = json.loads(text)
    selectors = tuple(tuple(sorted(s.items())) for s in data["selectors"])
    return Release(data["seed"], data["share"], selectors)


def _wave_to_dict(wave: WaveProgress) -> dict[str, Any]:
    return {
        "state": wave.state.value,
        "started_at": wave.started_at,
        "agents": wave.agents,
        "capturing": wave.capturing,
        "converged_at": wave.converged_at,
        "passed_at": wave.passed_at,
        "gates": [[g.name, g.passed, g.observed, g.limit] for g in wave.gates],
    }


def _wave_from_dict(data: dict[str, Any]) -> WaveProgress:
    return WaveProgress(
        state=WaveState(data["state"]),
        started_at=data["started_at"],
        agents=data["agents"],
        capturing=data["capturing"],
        converged_at=data["converged_at"],
        passed_at=data["passed_at"],
        gates=tuple(GateResult(*g) for g in data["gates"]),
    )


_RUN_SCALARS = (
    "id",
    "runbook",
    "file_name",
    "source",
    "started_by",
    "started_at",
    "hold_id",
    "lifted_hold_id",
    "approval_id",
    "started_epoch",
    "current_wave",
    "pause_started_at",
    "pause_verified_at",
    "halt_reason",
    "ended_at",
    "updated_at",
)


def run_to_json(run: Run) -> str:
    data: dict[str, Any] = {name: getattr(run, name) for name in _RUN_SCALARS}
    data["state"] = run.state.value
    data["waves"] = [_wave_to_dict(w) for w in run.waves]
    return json.dumps(data)


def run_from_json(text: str) -> Run:
    data = json.loads(text)
    return Run(
        state=RunState(data["state"]),
        waves=tuple(_wave_from_dict(w) for w in data["waves"]),
        **{name: data[name] for name in _RUN_SCALARS},
    )
