"""What moves a run: one tick's step, and the transitions ticks and commands share.

A tick reads the run's stored progress and the plane's current verdicts, asks
``control.domain.rollout`` what to do, and stores the answer (``RunLedger.commit``)
with its hold changes and audit entries. The runner calls these under its one lock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import structlog

from control.domain import Hold
from control.domain import HoldKind
from control.domain import draft_hold
from control.domain.approvals import ResumeRequest
from control.domain.audit import AuditRecord
from control.domain.holds import MAX_REASON_CHARS
from control.domain.identity import Principal
from control.domain.release import Release
from control.domain.rollout import Action
from control.domain.rollout import AgentVerdict
from control.domain.rollout import OnFailure
from control.domain.rollout import PrometheusGate
from control.domain.rollout import PrometheusReading
from control.domain.rollout import Run
from control.domain.rollout import Runbook
from control.domain.rollout import RunState
from control.domain.rollout import WaveState
from control.domain.rollout import breached
from control.domain.rollout import decide_pause
from control.domain.rollout import decide_wave
from control.domain.rollout import describe_failures
from control.domain.rollout import end_run
from control.domain.rollout import evaluate_gates
from control.domain.rollout import halting_hold
from control.domain.rollout import observe_pause
from control.domain.rollout import observe_wave
from control.domain.rollout import start_wave
from control.domain.scope import Scope
from control.errors import Conflict
from control.evidence import SYSTEM_ACTOR
from control.governance import Governance
from control.plane import ControlPlane
from control.plane import new_hold_id
from control.prometheus_sources import PrometheusSources
from control.runbooks.ledger import RunLedger
from control.store import RunChange

log = structlog.get_logger("killswitch.runbooks")


@dataclasses.dataclass(eq=False)
class RunSteps:
    """The steps of every run, built once by ``RunbookRunner`` with what they act on."""

    plane: ControlPlane
    governance: Governance
    ledger: RunLedger
    _: dataclasses.KW_ONLY
    clock: Callable[[], float]
    sources: PrometheusSources
    # An ended run ticks no more.
    unschedule: Callable[[str], None]

    # ------------------------------------------------------------ ticks

    async def step(self, run: Run, book: Runbook) -> None:
        halting = halting_hold(run, self.plane.active_holds())
        if halting is not None:
            await self._halt(
                run,
                f"new incident hold {halting.id} ({halting.reason}) created at epoch"
                f" {halting.created_epoch} takes precedence; the run stops here",
                repause=False,
            )
            return
        if run.state is RunState.PAUSING:
            await self._step_pause(run, book)
        elif run.state in (RunState.RUNNING, RunState.AWAITING_CONFIRMATION):
            hold = self.plane.hold(run.hold_id)
            if not hold.active:
                await self._halt(
                    run, f"rollout hold {hold.id} was lifted outside the run", repause=False
                )
                return
            await self._step_wave(run, book, hold)

    def _cutoffs(self, book: Runbook, scope: Scope) -> tuple[str, ...]:
        """Each wave's cutoff over the laptops the scope covers now (``Runbook.cutoffs``)."""
        return book.cutoffs(
            (agent_id, labels)
            for agent_id, labels, *_ in self.plane.snapshot()
            if scope.covers(agent_id, labels)
        )

    def _verdicts(self) -> list[AgentVerdict]:
        return [
            AgentVerdict(agent_id, labels, desired.mode, desired.hold_ids, compliance.state)
            for agent_id, labels, desired, _, compliance in self.plane.snapshot()
        ]

    async def _step_pause(self, run: Run, book: Runbook) -> None:
        decision = decide_pause(
            book, run, observe_pause(run.hold_id, self._verdicts()), now=self.clock()
        )
        if decision.action is Action.FAIL:
            await self._halt(run, decision.reason, repause=False)
        elif decision.action is Action.AWAIT_APPROVAL:
            took = (decision.run.pause_verified_at or 0.0) - (run.pause_started_at or 0.0)
            record = self._system_record(
                decision.run, "runbook.pause_verified", detail=f"verified stopped in {took:.1f}s"
            )
            await self.ledger.commit(RunChange(decision.run, SYSTEM_ACTOR, self.clock()), [record])

    async def _step_wave(self, run: Run, book: Runbook, hold: Hold) -> None:
        index = run.current_wave
        gates = book.waves[index].gates
        reading = await self._prometheus(gates.prometheus)
        obs = observe_wave(book, run, hold, index, self._verdicts(), prometheus=reading)
        now = self.clock()
        if run.state is RunState.AWAITING_CONFIRMATION:
            trouble = breached(evaluate_gates(gates, obs))
            if trouble:
                await self._fail(
                    run, book, f"while awaiting confirmation: {describe_failures(trouble)}"
                )
            return
        decision = decide_wave(book, run, obs, now=now)
        if decision.action is Action.FAIL:
            await self._fail(decision.run, book, decision.reason)
        elif decision.action is Action.NEXT_WAVE:
            passed = self._system_record(
                decision.run, "runbook.wave_passed", detail=_wave_summary(decision.run, index)
            )
            await self.next_wave(decision.run, book, by=None, audit=[passed])
        elif decision.action is Action.AWAIT_CONFIRMATION:
            record = self._system_record(
                decision.run,
                "runbook.wave_passed",
                detail=f"{_wave_summary(decision.run, index)}; awaiting confirmation",
            )
            await self.ledger.commit(RunChange(decision.run, SYSTEM_ACTOR, now), [record])
        elif decision.action is Action.COMPLETE:
            record = self._system_record(
                decision.run, "runbook.complete", detail=_wave_summary(decision.run, index)
            )
            done = end_run(decision.run, RunState.COMPLETED, now=now, repaused=False)
            lift = dataclasses.replace(
                self._system_record(
                    done, "hold.lift", detail=f"run {run.id} re-enabled every wave"
                ),
                target=f"{hold.id} {hold.kind.value}",
            )
            await self.ledger.commit(
                RunChange(done, SYSTEM_ACTOR, now, lift_hold_id=hold.id), [record, lift]
            )
        elif _gates_changed(run, decision.run, index):
            await self.ledger.commit(RunChange(decision.run, SYSTEM_ACTOR, now), [])
        else:
            self.ledger.keep(decision.run)

    async def _prometheus(self, gate: PrometheusGate | None) -> PrometheusReading | None:
        if gate is None:
            return None
        return await self.sources.query(gate)

    # ------------------------------------------------------------ transitions

    async def take_over(
        self,
        run: Run,
        book: Runbook,
        request: ResumeRequest,
        by: Principal,
        audit: list[AuditRecord],
    ) -> None:
        """Swap the approved hold for a rollout hold that already releases wave 1."""
        source = self.plane.hold(request.hold_id)
        if not source.active:
            raise Conflict(f"hold {source.id} was already lifted at epoch {source.lifted_epoch}")
        now = self.clock()
        rollout = draft_hold(
            hold_id=new_hold_id(),
            kind=HoldKind.ROLLOUT,
            scope=source.scope,
            reason=_clip(f"staged re-enable by {run.id} ({book.name}) of: {source.reason}"),
            ticket=source.ticket,
            created_by=by.name,
            created_at=now,
            keep_spool=source.keep_spool,
        )
        run = start_wave(
            dataclasses.replace(
                run, hold_id=rollout.id, lifted_hold_id=source.id, approval_id=request.id
            ),
            0,
            now=now,
            cutoff=self._cutoffs(book, source.scope)[0],
        )
        rollout = dataclasses.replace(rollout, release=book.release_through(0, run.wave(0).cutoff))
        records = [
            *audit,
            self.plane.audit.record(
                by,
                "hold.lift",
                target=f"{source.id} {source.kind.value}",
                reason=request.reason,
                ticket=request.ticket,
                detail=f"by run {run.id} with approved {request.id}; rollout hold {rollout.id}",
            ),
            self.plane.audit.hold_created(by, rollout),
            self._wave_record(run, book, 0, by=by),
        ]
        change = RunChange(
            run,
            by.name,
            now,
            create=rollout,
            lift_hold_id=source.id,
            executed_request=request,
        )
        epoch = await self.ledger.commit(change, records)
        self.governance.consumed(request, epoch)

    async def next_wave(
        self, run: Run, book: Runbook, *, by: Principal | None, audit: list[AuditRecord]
    ) -> None:
        index = run.current_wave + 1
        now = self.clock()
        scope = self.plane.hold(run.hold_id).scope
        started = start_wave(run, index, now=now, cutoff=self._cutoffs(book, scope)[index])
        records = [*audit, self._wave_record(started, book, index, by=by)]
        change = RunChange(
            started,
            by.name if by else SYSTEM_ACTOR,
            now,
            release=(run.hold_id, book.release_through(index, started.wave(index).cutoff)),
        )
        await self.ledger.commit(change, records)

    async def _fail(self, run: Run, book: Runbook, reason: str) -> None:
        index = run.current_wave
        failed = run.with_wave(index, dataclasses.replace(run.wave(index), state=WaveState.FAILED))
        await self._halt(failed, reason, repause=book.on_failure is OnFailure.REPAUSE)

    async def _halt(self, run: Run, reason: str, *, repause: bool) -> None:
        record = self._system_record(
            run,
            "runbook.halt",
            result="halted",
            detail=reason + ("; waves re-paused" if repause else ""),
        )
        log.error("runbook_halted", run_id=run.id, reason=reason, repaused=repause)
        await self.end(run, RunState.HALTED, reason, record, SYSTEM_ACTOR, repause=repause)

    async def end(
        self,
        run: Run,
        state: RunState,
        reason: str,
        record: AuditRecord,
        by: str,
        *,
        repause: bool = True,
    ) -> None:
        """End the run; re-pausing sets the rollout hold back to covering its whole scope."""
        now = self.clock()
        hold = self.plane.hold(run.hold_id) if run.hold_id else None
        rollout = hold is not None and hold.active and hold.kind is HoldKind.ROLLOUT
        repause = repause and rollout
        ended = end_run(run, state, now=now, reason=reason, repaused=repause)
        book = self.ledger.book(run)
        release = (run.hold_id, Release(book.seed)) if repause else None
        await self.ledger.commit(RunChange(ended, by, now, release=release), [record])
        self.unschedule(run.id)

    # ------------------------------------------------------------ records

    def _system_record(
        self, run: Run, action: str, *, result: str = "ok", detail: str = ""
    ) -> AuditRecord:
        return AuditRecord(
            self.clock(),
            SYSTEM_ACTOR,
            "system",
            action,
            target=run.id,
            result=result,
            detail=detail,
        )

    def _wave_record(
        self, run: Run, book: Runbook, index: int, *, by: Principal | None
    ) -> AuditRecord:
        wave = book.waves[index]
        detail = f"wave {index + 1}/{len(book.waves)} ({wave.name}): re-enables {wave.describe()}"
        if by is None:
            return self._system_record(run, "runbook.wave_start", detail=detail)
        return self.plane.audit.record(by, "runbook.wave_start", target=run.id, detail=detail)


def _wave_summary(run: Run, index: int) -> str:
    wave = run.wave(index)
    took = (
        f"; compliant {wave.converged_at - wave.started_at:.1f}s after its start"
        if wave.converged_at is not None and wave.started_at is not None
        else ""
    )
    return f"wave {index + 1} passed: {wave.capturing} of {wave.agents} capturing{took}"


def _gates_changed(before: Run, after: Run, index: int) -> bool:
    """Store gate results when a verdict flips, not on every tick's new count."""
    old, new = before.wave(index), after.wave(index)
    return [g.passed for g in old.gates] != [g.passed for g in new.gates] or (
        old.converged_at != new.converged_at
    )


def _clip(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."
