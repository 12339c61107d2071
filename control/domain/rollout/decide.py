"""One tick's verdict: wait, move to the next wave, ask a human, complete, or fail."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from control.domain.holds import Hold
from control.domain.holds import HoldKind
from control.domain.rollout.gates import breached
from control.domain.rollout.gates import describe_failures
from control.domain.rollout.gates import evaluate_gates
from control.domain.rollout.observe import Observation
from control.domain.rollout.observe import PauseObservation
from control.domain.rollout.run import Run
from control.domain.rollout.run import RunState
from control.domain.rollout.run import WaveState
from control.domain.rollout.runbook import Runbook

# How often the runner ticks each active run unless `serve --runbook-tick` says otherwise:
# a gate's change or a soak's end is acted on within this long.
DEFAULT_TICK_SECONDS = 1.0


class Action(StrEnum):
    """What a tick asks the runner to do; deciding is pure, and the runner alone commits
    the change and audits it."""

    WAIT = "wait"
    NEXT_WAVE = "next-wave"
    AWAIT_CONFIRMATION = "await-confirmation"
    COMPLETE = "complete"
    FAIL = "fail"
    AWAIT_APPROVAL = "await-approval"


@dataclass(frozen=True, slots=True)
class Decision:
    """A tick's verdict with the run it applies to, so the runner stores exactly the run
    the verdict was reached on."""

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
