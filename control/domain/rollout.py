"""Runbooks: gradual, gated re-enable of capture, as data and pure decisions.

A run keeps a *rollout hold* over the scope it re-enables and widens that hold's
release one wave at a time (Argo Rollouts' ``setWeight`` steps, applied to a
permission rather than a workload). Each tick the runner hands ``decide`` what the
control plane observes; ``decide`` answers what to do next. Everything here is a
function of its inputs, so a restarted server, or a test, reaches the same verdict
from the same stored progress.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from control.domain.compliance import ComplianceState
from control.domain.desired import Mode
from control.domain.holds import Hold, HoldKind
from control.domain.release import FULL_SHARE, Release, format_share, rank_key
from control.domain.scope import Scope, format_labels
from control.errors import InvalidInput

DEFAULT_SOAK_SECONDS = 300.0
DEFAULT_WAVE_TIMEOUT_SECONDS = 900.0
DEFAULT_PAUSE_TIMEOUT_SECONDS = 600.0


class OnFailure(StrEnum):
    # Re-pause every wave the run enabled, then halt (the default: fail closed).
    REPAUSE = "repause"
    # Halt where it is: enabled waves keep capturing, nothing more is enabled.
    HALT = "halt"


@dataclass(frozen=True, slots=True)
class PrometheusGate:
    """An instant query whose value must stay within bounds (no data fails unless allowed).

    ``source`` names a Prometheus the server was configured with, never an address: a
    runbook must not choose where the server sends requests."""

    query: str
    source: str
    max_value: float | None = None
    min_value: float | None = None
    allow_no_data: bool = False

    def limit(self) -> str:
        bounds = []
        if self.min_value is not None:
            bounds.append(f">= {self.min_value:g}")
        if self.max_value is not None:
            bounds.append(f"<= {self.max_value:g}")
        return " and ".join(bounds)


@dataclass(frozen=True, slots=True)
class Gates:
    # Share of the wave's connected agents confirmed CAPTURING before the wave passes.
    min_capturing: float = 1.0
    # Fleet-wide: any violation anywhere fails the wave at once.
    max_violations: int = 0
    # Among agents re-enabled so far: nacked (FAILED) and OVERDUE counts.
    max_nacks: int = 0
    max_overdue: int = 0
    prometheus: PrometheusGate | None = None


@dataclass(frozen=True, slots=True)
class Wave:
    """One step: a cumulative share of the hold's agents ranked by hash, or a label selector.

    A share wave takes at least ``max(1, min_agents)`` laptops not re-enabled before,
    while any remain; a selector wave takes exactly the laptops its labels match.
    """

    name: str
    share: int | None = None
    selector: Mapping[str, str] | None = None
    min_agents: int = 0
    soak: float = DEFAULT_SOAK_SECONDS
    timeout: float = DEFAULT_WAVE_TIMEOUT_SECONDS
    confirm: bool = False
    gates: Gates = Gates()

    def describe(self) -> str:
        if self.selector is not None:
            return f"selector {format_labels(self.selector)}"
        return f"{format_share(self.share or 0)} of agents"


@dataclass(frozen=True, slots=True)
class PauseStep:
    """A drill first pauses its scope itself and measures the time to a verified stop."""

    scope: Scope
    reason: str
    ticket: str = ""
    timeout: float = DEFAULT_PAUSE_TIMEOUT_SECONDS


# The hold a runbook lifts: named by the approved resume request it is started with.
FROM_APPROVAL = "from-approval"


@dataclass(frozen=True, slots=True)
class Runbook:
    name: str
    seed: str
    waves: tuple[Wave, ...]
    description: str = ""
    hold: str = FROM_APPROVAL
    pause: PauseStep | None = None
    on_failure: OnFailure = OnFailure.REPAUSE

    def __post_init__(self) -> None:
        check_waves(self.waves)

    def cutoffs(self, members: Iterable[tuple[str, Mapping[str, str]]]) -> tuple[str, ...]:
        """Per wave, the rank key of the last laptop re-enabled so far by share waves.

        ``members`` are the laptops of the scope being re-enabled. Ranked by
        ``rank_key``, share wave ``i`` re-enables the first ``ceil(share_i x N)`` of the
        N members (counting laptops an earlier selector wave took), extended until it
        holds at least ``max(1, min_agents)`` laptops not re-enabled before, while any
        remain. Exact counts, never an empty share wave over a non-empty scope, and
        membership is a prefix of one ranking, so a laptop never precedes one ranked
        before it (see README "Runbooks" for what stays sticky as the fleet changes).
        """
        ranked = sorted((rank_key(self.seed, agent_id), labels) for agent_id, labels in members)
        selectors: list[Mapping[str, str]] = []
        taken = 0
        cutoffs: list[str] = []
        for wave in self.waves:
            if wave.selector is not None:
                selectors.append(wave.selector)
            else:
                target = -(-(wave.share or 0) * len(ranked) // FULL_SHARE)
                wanted, fresh = max(1, wave.min_agents), 0
                while taken < len(ranked) and (taken < target or fresh < wanted):
                    labels = ranked[taken][1]
                    fresh += not any(_matches(labels, s) for s in selectors)
                    taken += 1
            cutoffs.append(ranked[taken - 1][0] if taken else "")
        return tuple(cutoffs)

    def release_through(self, wave_index: int, cutoff: str) -> Release:
        """What the rollout hold no longer covers once waves ``0..wave_index`` are enabled."""
        waves = self.waves[: wave_index + 1]
        share = max((w.share or 0 for w in waves), default=0)
        selectors = tuple(
            tuple(sorted(w.selector.items())) for w in waves if w.selector is not None
        )
        return Release(self.seed, share, selectors, cutoff)

    def wave_of(self, agent_id: str, labels: Mapping[str, str], cutoffs: Sequence[str]) -> int:
        """The first wave that re-enables this agent (every agent has one: the last is 100%).

        The same answer as the first ``release_through(i, cutoffs[i])`` that releases it,
        with one hash at most: runs ask this for every agent on every tick.
        """
        key: str | None = None
        for index, (wave, cutoff) in enumerate(zip(self.waves, cutoffs, strict=True)):
            if wave.selector is not None:
                if _matches(labels, wave.selector):
                    return index
                continue
            if key is None:
                key = rank_key(self.seed, agent_id)
            if cutoff and key <= cutoff:
                return index
        return len(self.waves) - 1

    def min_duration(self) -> float:
        return sum(w.soak for w in self.waves)


def _matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_waves(waves: Sequence[Wave]) -> None:
    """Shares only grow and the last wave re-enables everyone: a run always has an end."""
    if not waves:
        raise InvalidInput("a runbook needs at least one wave")
    previous = 0
    for number, wave in enumerate(waves, start=1):
        if (wave.share is None) == (wave.selector is None):
            raise InvalidInput(f"wave {number} needs exactly one of share or selector")
        if wave.share is not None:
            if not 0 < wave.share <= FULL_SHARE:
                raise InvalidInput(f"wave {number}: share must be more than 0% and at most 100%")
            if wave.share <= previous:
                raise InvalidInput(
                    f"wave {number}: shares are cumulative and must grow"
                    f" ({format_share(wave.share)} after {format_share(previous)})"
                )
            previous = wave.share
        elif wave.min_agents:
            raise InvalidInput(f"wave {number}: min_agents applies to share waves only")
        if wave.min_agents < 0:
            raise InvalidInput(f"wave {number}: min_agents must be 0 or more")
        if wave.soak < 0 or wave.timeout <= 0 or wave.timeout < wave.soak:
            raise InvalidInput(f"wave {number}: need 0 <= soak <= timeout and timeout > 0")
        if not 0 <= wave.gates.min_capturing <= 1:
            raise InvalidInput(f"wave {number}: capturing share must be within 0..100%")
    if waves[-1].share != FULL_SHARE:
        raise InvalidInput("the last wave must re-enable 100% of agents, so the run can finish")


# ---------------------------------------------------------------- runs


class RunState(StrEnum):
    PAUSING = "pausing"
    AWAITING_APPROVAL = "awaiting-approval"
    RUNNING = "running"
    AWAITING_CONFIRMATION = "awaiting-confirmation"
    COMPLETED = "completed"
    HALTED = "halted"
    ABORTED = "aborted"


ACTIVE_RUN_STATES = frozenset(
    {
        RunState.PAUSING,
        RunState.AWAITING_APPROVAL,
        RunState.RUNNING,
        RunState.AWAITING_CONFIRMATION,
    }
)


class WaveState(StrEnum):
    PENDING = "pending"
    SOAKING = "soaking"
    PASSED = "passed"
    FAILED = "failed"
    REPAUSED = "repaused"


@dataclass(frozen=True, slots=True)
class GateResult:
    name: str
    passed: bool
    observed: str
    limit: str


@dataclass(frozen=True, slots=True)
class WaveProgress:
    state: WaveState = WaveState.PENDING
    started_at: float | None = None
    # Agents the wave re-enabled (not held by another hold) and how many confirmed it.
    agents: int = 0
    capturing: int = 0
    # First time the capturing gate held: the wave's time to compliance.
    converged_at: float | None = None
    passed_at: float | None = None
    gates: tuple[GateResult, ...] = ()
    # Rank key of the last laptop re-enabled through this wave, frozen when it started.
    cutoff: str = ""


@dataclass(frozen=True, slots=True)
class Run:
    """A runbook's durable progress: what a restarted server resumes from."""

    id: str
    runbook: str
    file_name: str
    source: str
    state: RunState
    started_by: str
    started_at: float
    # The hold the run keeps: the drill's pause hold, then the rollout hold.
    hold_id: str = ""
    # The hold the approval named, lifted when the rollout hold took over.
    lifted_hold_id: str = ""
    approval_id: str = ""
    # Epoch at which the run took control: incident holds newer than this halt it.
    started_epoch: int = 0
    current_wave: int = -1
    waves: tuple[WaveProgress, ...] = ()
    pause_started_at: float | None = None
    pause_verified_at: float | None = None
    halt_reason: str = ""
    ended_at: float | None = None
    updated_at: float = 0.0
    # Bumped by every stored step: a step based on an older version is refused, so two
    # replicas (or a tick and an abort) never both move the run.
    version: int = 0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_RUN_STATES

    def wave(self, index: int) -> WaveProgress:
        return self.waves[index]

    @property
    def cutoffs(self) -> tuple[str, ...]:
        return tuple(w.cutoff for w in self.waves)

    def with_wave(self, index: int, progress: WaveProgress) -> Run:
        waves = list(self.waves)
        waves[index] = progress
        return dataclasses.replace(self, waves=tuple(waves))


def new_run_id() -> str:
    return f"run-{secrets.token_hex(5)}"


def new_run(
    book: Runbook, *, file_name: str, source: str, started_by: str, now: float, epoch: int
) -> Run:
    state = RunState.PAUSING if book.pause is not None else RunState.RUNNING
    return Run(
        id=new_run_id(),
        runbook=book.name,
        file_name=file_name,
        source=source,
        state=state,
        started_by=started_by,
        started_at=now,
        started_epoch=epoch,
        waves=tuple(WaveProgress() for _ in book.waves),
        pause_started_at=now if book.pause is not None else None,
        updated_at=now,
    )


def start_wave(run: Run, index: int, *, now: float, cutoff: str) -> Run:
    """The wave's agents are re-enabled now; its soak and gates count from ``now``.

    ``cutoff`` is this wave's entry of ``Runbook.cutoffs`` over the fleet now; it never
    falls below an earlier wave's, so a laptop re-enabled stays re-enabled whatever
    joins or leaves the fleet during the run.
    """
    cutoff = max(cutoff, *(w.cutoff for w in run.waves[:index]), "")
    return dataclasses.replace(
        run.with_wave(index, WaveProgress(WaveState.SOAKING, now, cutoff=cutoff)),
        state=RunState.RUNNING,
        current_wave=index,
        updated_at=now,
    )


def end_run(run: Run, state: RunState, *, now: float, reason: str = "", repaused: bool) -> Run:
    """Halt, abort or complete; re-paused waves are marked so the record says what happened."""
    waves = run.waves
    if repaused:
        waves = tuple(
            dataclasses.replace(w, state=WaveState.REPAUSED)
            if w.state in (WaveState.SOAKING, WaveState.PASSED)
            else w
            for w in waves
        )
    return dataclasses.replace(
        run, state=state, halt_reason=reason, ended_at=now, updated_at=now, waves=waves
    )


# ---------------------------------------------------------------- observing


@dataclass(frozen=True, slots=True)
class AgentVerdict:
    agent_id: str
    labels: Mapping[str, str]
    mode: Mode
    hold_ids: tuple[str, ...]
    state: ComplianceState


@dataclass(frozen=True, slots=True)
class PrometheusReading:
    value: float | None = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Observation:
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


# ---------------------------------------------------------------- gates


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


# ---------------------------------------------------------------- decisions


class Action(StrEnum):
    WAIT = "wait"
    NEXT_WAVE = "next-wave"
    AWAIT_CONFIRMATION = "await-confirmation"
    COMPLETE = "complete"
    FAIL = "fail"
    AWAIT_APPROVAL = "await-approval"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    # The run with this tick's observations recorded (gate results, convergence).
    run: Run
    reason: str = ""


def decide_wave(book: Runbook, run: Run, obs: Observation, *, now: float) -> Decision:
    """One tick of a RUNNING run: record gates, then wait, fail, or move on."""
    index = run.current_wave
    wave, progress = book.waves[index], run.wave(index)
    results = evaluate_gates(wave.gates, obs)
    capturing_ok = results[0].passed
    converged_at = progress.converged_at
    if capturing_ok and converged_at is None:
        converged_at = now
    recorded = run.with_wave(
        index,
        dataclasses.replace(
            progress,
            agents=obs.wave_agents,
            capturing=obs.wave_capturing,
            converged_at=converged_at,
            gates=results,
        ),
    )
    started = progress.started_at if progress.started_at is not None else now
    trouble = breached(results)
    if trouble:
        return Decision(
            Action.FAIL,
            recorded,
            f"wave {index + 1} ({wave.name}) failed its gates: {describe_failures(trouble)}",
        )
    all_passed = all(r.passed for r in results)
    if all_passed and now - started >= wave.soak:
        passed = recorded.with_wave(
            index,
            dataclasses.replace(recorded.wave(index), state=WaveState.PASSED, passed_at=now),
        )
        if index == len(book.waves) - 1:
            return Decision(Action.COMPLETE, passed)
        if book.waves[index + 1].confirm:
            return Decision(
                Action.AWAIT_CONFIRMATION,
                dataclasses.replace(passed, state=RunState.AWAITING_CONFIRMATION, updated_at=now),
            )
        return Decision(Action.NEXT_WAVE, passed)
    if now - started >= wave.timeout:
        return Decision(
            Action.FAIL,
            recorded,
            f"wave {index + 1} ({wave.name}) did not pass its gates within"
            f" {wave.timeout:g}s: {describe_failures(results)}",
        )
    return Decision(Action.WAIT, recorded)


def decide_pause(book: Runbook, run: Run, obs: PauseObservation, *, now: float) -> Decision:
    """One tick of a drill's pause: verified stop everywhere, or fail after the timeout."""
    assert book.pause is not None
    started = run.pause_started_at if run.pause_started_at is not None else now
    if obs.violations:
        return Decision(
            Action.FAIL, run, f"{obs.violations} violations while pausing: investigate first"
        )
    if obs.stopped == obs.agents:
        return Decision(
            Action.AWAIT_APPROVAL,
            dataclasses.replace(
                run, state=RunState.AWAITING_APPROVAL, pause_verified_at=now, updated_at=now
            ),
        )
    if now - started >= book.pause.timeout:
        return Decision(
            Action.FAIL,
            run,
            f"only {obs.stopped} of {obs.agents} agents verified stopped within"
            f" {book.pause.timeout:g}s; the pause stays in force",
        )
    return Decision(Action.WAIT, run)


def halting_hold(run: Run, holds: Iterable[Hold]) -> Hold | None:
    """A new incident hold wins over a run: the first one created after the run took over."""
    for hold in holds:
        if (
            hold.active
            and hold.kind is HoldKind.INCIDENT
            and hold.created_epoch > run.started_epoch
            and hold.id != run.hold_id
        ):
            return hold
    return None


# ---------------------------------------------------------------- planning


@dataclass(frozen=True, slots=True)
class WavePlan:
    index: int
    name: str
    target: str
    agent_ids: list[str] = field(default_factory=list)
    # Agents of this wave that another hold keeps paused whatever the run does.
    held_back: list[str] = field(default_factory=list)
    soak: float = 0.0
    starts_after: float = 0.0
    confirm: bool = False


def plan_waves(
    book: Runbook,
    scope: Scope,
    agents: Iterable[tuple[str, Mapping[str, str], bool]],
) -> list[WavePlan]:
    """Which agents each wave re-enables; ``agents`` yields (id, labels, held by another hold)."""
    members = sorted(
        (agent for agent in agents if scope.covers(agent[0], agent[1])), key=lambda a: a[0]
    )
    cutoffs = book.cutoffs((agent_id, labels) for agent_id, labels, _ in members)
    plans: list[WavePlan] = []
    offset = 0.0
    for index, wave in enumerate(book.waves):
        plans.append(
            WavePlan(
                index,
                wave.name,
                wave.describe(),
                soak=wave.soak,
                starts_after=offset,
                confirm=wave.confirm,
            )
        )
        offset += wave.soak
    for agent_id, labels, held in members:
        plan = plans[book.wave_of(agent_id, labels, cutoffs)]
        (plan.held_back if held else plan.agent_ids).append(agent_id)
    return plans
