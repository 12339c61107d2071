"""What the plane observes, counted for a run's gates: one pass over the verdicts."""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass

from control.domain.compliance import ComplianceState
from control.domain.desired import Mode
from control.domain.holds import Hold
from control.domain.rollout.run import Run
from control.domain.rollout.runbook import Runbook


@dataclass(frozen=True, slots=True)
class AgentVerdict:
    agent_id: str
    labels: Mapping[str, str]
    mode: Mode
    hold_ids: tuple[str, ...]
    state: ComplianceState


@dataclass(frozen=True, slots=True)
class PrometheusReading:
    """One query's answer, or why there is none: an unreachable Prometheus is a reading
    the gate judges (the wave waits for it to come back), never an error in the tick."""

    value: float | None = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Observation:
    """The counts a wave's gates are judged on, taken in one pass over the verdicts so
    every gate of a tick sees the same moment."""

    # The current wave: agents it re-enabled, how many are connected, how many capture.
    wave_agents: int = 0
    wave_online: int = 0
    wave_capturing: int = 0
    # Agents of this wave still paused by another hold (an opt-out, another incident).
    wave_held_back: int = 0
    violations: int = 0
    nacks: int = 0
    overdue: int = 0
    prometheus: PrometheusReading | None = None


_OFFLINE = frozenset(
    {
        ComplianceState.OFFLINE,
        ComplianceState.NEVER_SEEN,
        ComplianceState.OFFLINE_AT_RISK,
        ComplianceState.OFFLINE_LEASE_EXPIRED,
    }
)
_STOPPED = frozenset({ComplianceState.VERIFIED_STOPPED, ComplianceState.OFFLINE_LEASE_EXPIRED})


def observe_wave(
    book: Runbook,
    run: Run,
    hold: Hold,
    wave_index: int,
    verdicts: Iterable[AgentVerdict],
    *,
    prometheus: PrometheusReading | None = None,
) -> Observation:
    """Count, from the plane's own verdicts, what the gates of wave ``wave_index`` judge."""
    cutoffs = run.cutoffs
    counts: dict[str, int] = dict.fromkeys(
        ("agents", "online", "capturing", "held", "violations", "nacks", "overdue"), 0
    )
    for v in verdicts:
        if v.state is ComplianceState.VIOLATION:
            counts["violations"] += 1
        if not hold.scope.covers(v.agent_id, v.labels):
            continue
        wave = book.wave_of(v.agent_id, v.labels, cutoffs)
        if wave > wave_index:
            continue
        if v.mode is Mode.PAUSED:
            counts["held"] += wave == wave_index
            continue
        counts["nacks"] += v.state is ComplianceState.FAILED
        counts["overdue"] += v.state is ComplianceState.OVERDUE
        if wave == wave_index:
            counts["agents"] += 1
            counts["online"] += v.state not in _OFFLINE
            counts["capturing"] += v.state is ComplianceState.CAPTURING
    return Observation(
        wave_agents=counts["agents"],
        wave_online=counts["online"],
        wave_capturing=counts["capturing"],
        wave_held_back=counts["held"],
        violations=counts["violations"],
        nacks=counts["nacks"],
        overdue=counts["overdue"],
        prometheus=prometheus,
    )


@dataclass(frozen=True, slots=True)
class PauseObservation:
    agents: int
    stopped: int
    violations: int


def observe_pause(hold_id: str, verdicts: Iterable[AgentVerdict]) -> PauseObservation:
    agents = stopped = violations = 0
    for v in verdicts:
        violations += v.state is ComplianceState.VIOLATION
        if hold_id in v.hold_ids:
            agents += 1
            stopped += v.state in _STOPPED
    return PauseObservation(agents, stopped, violations)
