"""The runbook runner: APScheduler ticks each active run; the domain decides each step.

Level-triggered like a Kubernetes controller: every tick reads the run's stored
progress and the plane's current verdicts, asks ``control.domain.rollout`` what to
do, and commits the step together with its hold changes and audit entries. A
restarted server reloads the runs and carries on from the stored step, so a wave
is never enabled twice or skipped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from control.domain import Hold, HoldKind, draft_hold
from control.domain.approvals import ResumeRequest
from control.domain.audit import AuditRecord
from control.domain.history import run_archivable
from control.domain.holds import MAX_REASON_CHARS
from control.domain.identity import Principal, Role
from control.domain.release import Release
from control.domain.rollout import (
    FROM_APPROVAL,
    Action,
    AgentVerdict,
    OnFailure,
    PrometheusGate,
    PrometheusReading,
    Run,
    Runbook,
    RunState,
    WavePlan,
    WaveState,
    breached,
    decide_pause,
    decide_wave,
    describe_failures,
    end_run,
    evaluate_gates,
    halting_hold,
    new_run,
    observe_pause,
    observe_wave,
    plan_waves,
    start_wave,
)
from control.domain.scope import Scope
from control.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    PermissionDenied,
    UnknownItem,
)
from control.events import PlaneObserver
from control.evidence import SYSTEM_ACTOR
from control.governance import Governance
from control.plane import ControlPlane, new_hold_id
from control.prometheus_sources import PrometheusSources
from control.runbook_file import parse_runbook
from control.store import RunChange

log = structlog.get_logger("killswitch.runbooks")

DEFAULT_TICK_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Plan:
    book: Runbook
    hold_id: str
    scope: Scope
    waves: list[WavePlan]


def runbook_sha256(source: str) -> str:
    """What a drill approval is for: this exact text, so an edited file needs a new one."""
    return hashlib.sha256(source.encode()).hexdigest()


def _clip(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def next_step(run: Run) -> str:
    """What a human runs next, so `status` at 3 a.m. answers "now what?"."""
    if run.state is RunState.AWAITING_CONFIRMATION:
        return f"killswitch runbook advance {run.id}"
    if run.state is RunState.AWAITING_APPROVAL:
        return (
            f"killswitch resume --hold {run.hold_id} --for-runbook --reason TEXT;"
            f" after approval: killswitch runbook advance {run.id} --approval REQUEST_ID"
        )
    if run.state is RunState.HALTED and run.hold_id:
        return f"investigate; then killswitch holds (hold {run.hold_id} is still in force)"
    return ""


class RunbookRunner(PlaneObserver):
    def __init__(
        self,
        plane: ControlPlane,
        governance: Governance,
        *,
        clock: Callable[[], float],
        tick_seconds: float = DEFAULT_TICK_SECONDS,
        prometheus: PrometheusSources | None = None,
        leads: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self._plane = plane
        self._governance = governance
        self._clock = clock
        self._tick_seconds = tick_seconds
        self._sources = prometheus or PrometheusSources(())
        self._runs: dict[str, Run] = {}
        self._books: dict[str, Runbook] = {}
        # One step at a time across every run: a tick never interleaves with an abort.
        self._lock = asyncio.Lock()
        self._scheduler = AsyncIOScheduler(timezone="UTC")
        # With several replicas only the leader ticks; the others serve reads and
        # commands, and adopt the leader's steps.
        self._leads = leads or _always

    # ------------------------------------------------------------ lifecycle

    async def start(self, runs: Sequence[Run]) -> None:
        self._scheduler.start()
        for run in runs:
            self._runs[run.id] = run
            if run.active:
                self._books[run.id] = parse_runbook(run.source, run.file_name)
                self._schedule(run.id)
                log.info("runbook_resumed", run_id=run.id, state=run.state, wave=run.current_wave)

    async def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def _schedule(self, run_id: str) -> None:
        self._scheduler.add_job(
            self.tick,
            "interval",
            args=[run_id],
            id=run_id,
            seconds=self._tick_seconds,
            next_run_time=_utcnow(),
            max_instances=1,
            coalesce=True,
            replace_existing=True,
        )

    def adopt(self, runs: Sequence[Run]) -> None:
        """Steps stored by another replica (or this one): keep the newest version of each."""
        for run in runs:
            known = self._runs.get(run.id)
            if known is not None and known.version >= run.version:
                continue
            self._runs[run.id] = run
            if run.active:
                self._schedule(run.id)
            else:
                self._unschedule(run.id)

    def hold_changed(self, hold: Hold, *, epoch: int, at: float) -> None:
        """A new incident hold halts active runs: tick them now rather than in a second."""
        if hold.kind is HoldKind.INCIDENT and hold.active:
            for run in self._runs.values():
                job = self._scheduler.get_job(run.id) if run.active else None
                if job is not None:
                    job.modify(next_run_time=_utcnow())

    # ------------------------------------------------------------ queries

    def runs(self) -> list[Run]:
        return sorted(self._runs.values(), key=lambda r: (r.started_at, r.id))

    def run(self, run_id: str = "") -> Run:
        if not run_id:
            if not self._runs:
                raise NotFound(
                    "no runbook has been run yet, or every run ended before the history"
                    " retention and was archived"
                )
            return self.runs()[-1]
        try:
            return self._runs[run_id]
        except KeyError:
            raise UnknownItem(UnknownItem.RUN, run_id) from None

    def forget_history(self, before: float) -> int:
        """Drop the runs the store archived (``HistoryCompactor``)."""
        gone = [r.id for r in self._runs.values() if run_archivable(r, before)]
        for run_id in gone:
            del self._runs[run_id]
            self._books.pop(run_id, None)
        return len(gone)

    def book(self, run_id: str) -> Runbook:
        book = self._books.get(run_id)
        if book is None:
            run = self.run(run_id)
            book = self._books[run_id] = parse_runbook(run.source, run.file_name)
        return book

    def check_sources(self, book: Runbook) -> None:
        """A gate naming a Prometheus source this server lacks is refused up front."""
        self._sources.check(book)

    def plan(self, book: Runbook, *, hold_id: str = "", approval_id: str = "") -> Plan:
        self.check_sources(book)
        if approval_id:
            hold_id = self._governance.requests(approval_id)[0].hold_id
        if not hold_id and book.hold != FROM_APPROVAL:
            hold_id = book.hold
        if book.pause is not None:
            scope = book.pause.scope
        elif hold_id:
            scope = self._plane.hold(hold_id).scope
        else:
            scope = Scope.fleet()
        agents = [
            (agent_id, labels, bool(set(desired.hold_ids) - {hold_id}))
            for agent_id, labels, desired, _, _ in self._plane.snapshot()
        ]
        return Plan(book, hold_id, scope, plan_waves(book, scope, agents))

    # ------------------------------------------------------------ commands

    def _check_none_active(self) -> None:
        for run in self._runs.values():
            if run.active:
                raise Conflict(
                    f"run {run.id} ({run.runbook}) is still {run.state.value}:"
                    f" let it finish or `killswitch runbook abort {run.id}`"
                )

    async def start_run(
        self, book: Runbook, *, source: str, file_name: str, approval_id: str, by: Principal
    ) -> Run:
        self.check_sources(book)
        async with self._lock:
            self._check_none_active()
            now = self._clock()
            run = new_run(
                book,
                file_name=file_name,
                source=source,
                started_by=by.name,
                now=now,
                epoch=self._plane.epoch,
            )
            start = self._plane.audit.record(
                by,
                "runbook.start",
                target=run.id,
                reason=book.name,
                detail=f"{file_name}; approved {approval_id}" if approval_id else file_name,
            )
            if book.pause is not None:
                drill = self._drill_approval(book, book.pause.scope, source, approval_id, by)
                draft = draft_hold(
                    hold_id=new_hold_id(),
                    kind=HoldKind.INCIDENT,
                    scope=book.pause.scope,
                    reason=book.pause.reason,
                    ticket=book.pause.ticket,
                    created_by=by.name,
                    created_at=now,
                )
                run = dataclasses.replace(run, hold_id=draft.id)
                pause = self._plane.audit.hold_created(by, draft, detail=f"paused by run {run.id}")
                change = RunChange(run, by.name, now, create=draft, executed_request=drill)
                epoch = await self._commit(change, [start, pause])
                if drill is not None:
                    self._governance.consumed(drill, epoch)
            else:
                if not approval_id:
                    raise PermissionDenied(
                        "a re-enable needs --approval REQUEST_ID: a `killswitch resume --hold H"
                        " --for-runbook` request approved by a different approver"
                    )
                wanted = "" if book.hold == FROM_APPROVAL else book.hold
                request = self._governance.runbook_approval(approval_id, hold_id=wanted)
                await self._take_over(run, book, request, by, [start])
            self._schedule(run.id)
            return self._runs[run.id]

    def _drill_approval(
        self, book: Runbook, scope: Scope, source: str, approval_id: str, by: Principal
    ) -> ResumeRequest | None:
        """A drill pauses capture: an incident commander's call, or a two-person approval."""
        if approval_id:
            return self._governance.drill_approval(
                approval_id, runbook=book.name, sha256=runbook_sha256(source)
            )
        if by.role is not Role.INCIDENT_COMMANDER:
            raise PermissionDenied(
                f"drill {book.name!r} pauses {scope.describe()}:"
                " only an incident commander may start it without an approved"
                " `killswitch runbook request FILE` (pass --approval REQUEST_ID)"
            )
        return None

    async def _take_over(
        self,
        run: Run,
        book: Runbook,
        request: ResumeRequest,
        by: Principal,
        audit: list[AuditRecord],
    ) -> None:
        """Swap the approved hold for a rollout hold that already releases wave 1."""
        source = self._plane.hold(request.hold_id)
        if not source.active:
            raise Conflict(f"hold {source.id} was already lifted at epoch {source.lifted_epoch}")
        now = self._clock()
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
            self._plane.audit.record(
                by,
                "hold.lift",
                target=f"{source.id} {source.kind.value}",
                reason=request.reason,
                ticket=request.ticket,
                detail=f"by run {run.id} with approved {request.id}; rollout hold {rollout.id}",
            ),
            self._plane.audit.hold_created(by, rollout),
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
        epoch = await self._commit(change, records)
        self._governance.consumed(request, epoch)

    async def advance(self, run_id: str, *, approval_id: str, by: Principal) -> Run:
        async with self._lock:
            run, book = self.run(run_id), self.book(run_id)
            if run.state is RunState.AWAITING_APPROVAL:
                if not approval_id:
                    raise PermissionDenied(
                        f"run {run.id} waits for an approved re-enable of hold {run.hold_id}:"
                        " pass --approval REQUEST_ID"
                    )
                request = self._governance.runbook_approval(approval_id, hold_id=run.hold_id)
                record = self._plane.audit.record(by, "runbook.advance", target=run.id)
                await self._take_over(run, book, request, by, [record])
            elif run.state is RunState.AWAITING_CONFIRMATION:
                if approval_id:
                    raise InvalidInput(f"run {run.id} needs a confirmation, not an approval")
                record = self._plane.audit.record(
                    by,
                    "runbook.advance",
                    target=run.id,
                    detail=f"confirmed wave {run.current_wave + 2}",
                )
                await self._next_wave(run, book, by=by, audit=[record])
            else:
                raise Conflict(f"run {run.id} is {run.state.value}: there is nothing to confirm")
            return self._runs[run.id]

    async def abort(self, run_id: str, *, reason: str, by: Principal) -> Run:
        async with self._lock:
            run = self.run(run_id)
            if not run.active:
                raise Conflict(f"run {run.id} already ended: {run.state.value}")
            record = self._plane.audit.record(by, "runbook.abort", target=run.id, reason=reason)
            await self._end(
                run, RunState.ABORTED, f"aborted by {by.name}: {reason}", record, by.name
            )
            return self._runs[run.id]

    # ------------------------------------------------------------ ticks

    async def tick(self, run_id: str) -> None:
        try:
            async with self._lock:
                run = self._runs.get(run_id)
                if run is None or not run.active:
                    self._unschedule(run_id)
                    return
                if await self._leads():
                    await self._step(run, self.book(run_id))
        except Exception:
            # The next tick tries again from the stored step; nothing was half-applied.
            log.exception("runbook_tick_failed", run_id=run_id)

    async def _step(self, run: Run, book: Runbook) -> None:
        halting = halting_hold(run, self._plane.active_holds())
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
            hold = self._plane.hold(run.hold_id)
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
            for agent_id, labels, *_ in self._plane.snapshot()
            if scope.covers(agent_id, labels)
        )

    def _verdicts(self) -> list[AgentVerdict]:
        return [
            AgentVerdict(agent_id, labels, desired.mode, desired.hold_ids, compliance.state)
            for agent_id, labels, desired, _, compliance in self._plane.snapshot()
        ]

    async def _step_pause(self, run: Run, book: Runbook) -> None:
        decision = decide_pause(
            book, run, observe_pause(run.hold_id, self._verdicts()), now=self._clock()
        )
        if decision.action is Action.FAIL:
            await self._halt(run, decision.reason, repause=False)
        elif decision.action is Action.AWAIT_APPROVAL:
            took = (decision.run.pause_verified_at or 0.0) - (run.pause_started_at or 0.0)
            record = self._system_record(
                decision.run, "runbook.pause_verified", detail=f"verified stopped in {took:.1f}s"
            )
            await self._commit(RunChange(decision.run, SYSTEM_ACTOR, self._clock()), [record])

    async def _step_wave(self, run: Run, book: Runbook, hold: Hold) -> None:
        index = run.current_wave
        gates = book.waves[index].gates
        reading = await self._prometheus(gates.prometheus)
        obs = observe_wave(book, run, hold, index, self._verdicts(), prometheus=reading)
        now = self._clock()
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
                decision.run, "runbook.wave_passed", detail=self._wave_summary(decision.run, index)
            )
            await self._next_wave(decision.run, book, by=None, audit=[passed])
        elif decision.action is Action.AWAIT_CONFIRMATION:
            record = self._system_record(
                decision.run,
                "runbook.wave_passed",
                detail=f"{self._wave_summary(decision.run, index)}; awaiting confirmation",
            )
            await self._commit(RunChange(decision.run, SYSTEM_ACTOR, now), [record])
        elif decision.action is Action.COMPLETE:
            record = self._system_record(
                decision.run, "runbook.complete", detail=self._wave_summary(decision.run, index)
            )
            done = end_run(decision.run, RunState.COMPLETED, now=now, repaused=False)
            lift = dataclasses.replace(
                self._system_record(
                    done, "hold.lift", detail=f"run {run.id} re-enabled every wave"
                ),
                target=f"{hold.id} {hold.kind.value}",
            )
            await self._commit(
                RunChange(done, SYSTEM_ACTOR, now, lift_hold_id=hold.id), [record, lift]
            )
        elif _gates_changed(run, decision.run, index):
            await self._commit(RunChange(decision.run, SYSTEM_ACTOR, now), [])
        else:
            self._runs[run.id] = decision.run

    async def _prometheus(self, gate: PrometheusGate | None) -> PrometheusReading | None:
        if gate is None:
            return None
        return await self._sources.query(gate)

    # ------------------------------------------------------------ transitions

    async def _next_wave(
        self, run: Run, book: Runbook, *, by: Principal | None, audit: list[AuditRecord]
    ) -> None:
        index = run.current_wave + 1
        now = self._clock()
        scope = self._plane.hold(run.hold_id).scope
        started = start_wave(run, index, now=now, cutoff=self._cutoffs(book, scope)[index])
        records = [*audit, self._wave_record(started, book, index, by=by)]
        change = RunChange(
            started,
            by.name if by else SYSTEM_ACTOR,
            now,
            release=(run.hold_id, book.release_through(index, started.wave(index).cutoff)),
        )
        await self._commit(change, records)

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
        await self._end(run, RunState.HALTED, reason, record, SYSTEM_ACTOR, repause=repause)

    async def _end(
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
        now = self._clock()
        hold = self._plane.hold(run.hold_id) if run.hold_id else None
        rollout = hold is not None and hold.active and hold.kind is HoldKind.ROLLOUT
        repause = repause and rollout
        ended = end_run(run, state, now=now, reason=reason, repaused=repause)
        book = self.book(run.id)
        release = (run.hold_id, Release(book.seed)) if repause else None
        await self._commit(RunChange(ended, by, now, release=release), [record])
        self._unschedule(run.id)

    async def _commit(self, change: RunChange, audit: list[AuditRecord]) -> int:
        known = self._runs.get(change.run.id)
        version = (known.version if known is not None else 0) + 1
        change = dataclasses.replace(change, run=dataclasses.replace(change.run, version=version))
        commit = await self._plane.commit_run(change, audit)
        previous = self._runs.get(change.run.id)
        self._runs[change.run.id] = change.run
        if (
            previous is None
            or previous.state is not change.run.state
            or previous.current_wave != change.run.current_wave
        ):
            log.info(
                "runbook_step",
                run_id=change.run.id,
                runbook=change.run.runbook,
                state=change.run.state,
                wave=change.run.current_wave + 1,
                epoch=commit.epoch,
            )
        return commit.epoch

    def _unschedule(self, run_id: str) -> None:
        if self._scheduler.get_job(run_id) is not None:
            self._scheduler.remove_job(run_id)

    # ------------------------------------------------------------ records

    def _system_record(
        self, run: Run, action: str, *, result: str = "ok", detail: str = ""
    ) -> AuditRecord:
        return AuditRecord(
            self._clock(),
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
        return self._plane.audit.record(by, "runbook.wave_start", target=run.id, detail=detail)

    @staticmethod
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


async def _always() -> bool:
    return True


def _utcnow() -> datetime:
    return datetime.now(UTC)
