"""Gates judged against an observation: which pass, and which failures will not heal."""

from __future__ import annotations

from collections.abc import Iterable

from control.domain.rollout.observe import Observation
from control.domain.rollout.observe import PrometheusReading
from control.domain.rollout.run import GateResult
from control.domain.rollout.runbook import Gates
from control.domain.rollout.runbook import PrometheusGate


def capturing_share(obs: Observation) -> float:
    """Of the wave's connected agents; a wave with none connected has nothing to disprove."""
    return obs.wave_capturing / obs.wave_online if obs.wave_online else 1.0


def evaluate_gates(gates: Gates, obs: Observation) -> tuple[GateResult, ...]:
    share = capturing_share(obs)
    results = [
        GateResult(
            "capturing",
            share >= gates.min_capturing,
            f"{share:.1%} ({obs.wave_capturing} of {obs.wave_online} connected,"
            f" {obs.wave_agents} in wave)",
            f">= {gates.min_capturing:.0%}",
        ),
        GateResult(
            "violations",
            obs.violations <= gates.max_violations,
            str(obs.violations),
            f"<= {gates.max_violations}",
        ),
        GateResult("nacks", obs.nacks <= gates.max_nacks, str(obs.nacks), f"<= {gates.max_nacks}"),
        GateResult(
            "overdue", obs.overdue <= gates.max_overdue, str(obs.overdue), f"<= {gates.max_overdue}"
        ),
    ]
    if gates.prometheus is not None:
        results.append(_prometheus_result(gates.prometheus, obs.prometheus))
    return tuple(results)


def _prometheus_result(gate: PrometheusGate, reading: PrometheusReading | None) -> GateResult:
    if reading is None or reading.error:
        error = reading.error if reading is not None else "not queried yet"
        return GateResult("prometheus", False, f"error: {error}", gate.limit())
    if reading.value is None:
        return GateResult("prometheus", gate.allow_no_data, "no data", gate.limit())
    value = reading.value
    ok = (gate.max_value is None or value <= gate.max_value) and (
        gate.min_value is None or value >= gate.min_value
    )
    return GateResult("prometheus", ok, f"{value:g}", gate.limit())


def breached(results: Iterable[GateResult]) -> list[GateResult]:
    """Gates whose failure is trouble at once, not merely "not there yet".

    The capturing share grows as agents ack; an unreachable Prometheus, or a series not
    scraped yet, may come back.
    A violation, a nack or an overdue agent, or a query out of bounds, will not heal
    by waiting.
    """
    return [
        r
        for r in results
        if not r.passed
        and r.name != "capturing"
        and not (r.name == "prometheus" and not _is_number(r.observed))
    ]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def describe_failures(results: Iterable[GateResult]) -> str:
    return "; ".join(f"{r.name} {r.observed} (needs {r.limit})" for r in results if not r.passed)
