"""A run: a runbook's durable progress, and the steps that move it.

What a restarted server resumes from: every field here is stored (``control.store``),
and each step returns a new ``Run`` rather than changing one.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from enum import StrEnum

from control.domain.rollout.runbook import Runbook


class RunState(StrEnum):
    """Where a run stands. The first four are active (``ACTIVE_RUN_STATES``): a restarted
    server resumes ticking those runs, and the others are finished records."""

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
    """One wave's outcome, kept per wave so a run's record says how far re-enabling got
    and which waves a halt paused again."""

    PENDING = "pending"
    SOAKING = "soaking"
    PASSED = "passed"
    FAILED = "failed"
    REPAUSED = "repaused"


@dataclass(frozen=True, slots=True)
class GateResult:
    """One gate as judged at the last tick, stored with the wave so ``status`` shows why a
    wave is waiting or failed without judging the gates again."""

    name: str
    passed: bool
    observed: str
    limit: str


@dataclass(frozen=True, slots=True)
class WaveProgress:
    """What a wave has done so far, stored with the run: a restarted server resumes its
    soak and keeps its cutoff rather than starting the wave again."""

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
