"""The runbook runner: schedules each active run's ticks and takes the commands.

APScheduler ticks every active run (``RunSteps.step`` moves it); commands start,
advance and abort runs. One lock orders them all, so a tick never interleaves with
an abort; with several replicas only the leader ticks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from control.domain import Hold
from control.domain import HoldKind
from control.domain import draft_hold
from control.domain.approvals import ResumeRequest
from control.domain.identity import Principal
from control.domain.identity import Role
from control.domain.rollout import DEFAULT_TICK_SECONDS
from control.domain.rollout import FROM_APPROVAL
from control.domain.rollout import Run
from control.domain.rollout import Runbook
from control.domain.rollout import RunState
from control.domain.rollout import WavePlan
from control.domain.rollout import new_run
from control.domain.rollout import plan_waves
from control.domain.scope import Scope
from control.errors import Conflict
from control.errors import InvalidInput
from control.errors import NotFound
from control.errors import PermissionDenied
from control.errors import UnknownItem
from control.events import PlaneObserver
from control.governance import Governance
from control.plane import ControlPlane
from control.plane import new_hold_id
from control.prometheus_sources import PrometheusSources
from control.runbooks.ledger import RunLedger
from control.runbooks.steps import RunSteps
from control.store import RunChange

log = structlog.get_logger("killswitch.runbooks")


@dataclass(frozen=True, slots=True)
class Plan:
    """What a run of ``book`` would do to today's fleet, wave by wave, without starting
    it: ``runbook plan`` shows it so a human checks the waves before anything changes."""

    book: Runbook
    hold_id: str
    scope: Scope
    waves: list[WavePlan]


def runbook_sha256(source: str) -> str:
    """What a drill approval is for: this exact text, so an edited file needs a new one."""
    return hashlib.sha256(source.encode()).hexdigest()


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
        self._ledger = RunLedger(plane)
        self._steps = RunSteps(
            plane,
            governance,
            self._ledger,
            clock=clock,
            sources=self._sources,
            unschedule=self._unschedule,
        )
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
            self._ledger.keep(run)
            if run.active:
                self._ledger.book(run)
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

    def _unschedule(self, run_id: str) -> None:
        if self._scheduler.get_job(run_id) is not None:
            self._scheduler.remove_job(run_id)

    def adopt(self, runs: Sequence[Run]) -> None:
        """Steps stored by another replica (or this one): keep the newest version of each."""
        for run in runs:
            if not self._ledger.adopt(run):
                continue
            if run.active:
                self._schedule(run.id)
            else:
                self._unschedule(run.id)

    def hold_changed(self, hold: Hold, *, epoch: int, at: float) -> None:
        """A new incident hold halts active runs: tick them now rather than in a second."""
        if hold.kind is HoldKind.INCIDENT and hold.active:
            for run in self._ledger:
                job = self._scheduler.get_job(run.id) if run.active else None
                if job is not None:
                    job.modify(next_run_time=_utcnow())

    async def tick(self, run_id: str) -> None:
        try:
            async with self._lock:
                run = self._ledger.get(run_id)
                if run is None or not run.active:
                    self._unschedule(run_id)
                    return
                if await self._leads():
                    await self._steps.step(run, self._ledger.book(run))
        except Exception:
            # The next tick tries again from the stored step; nothing was half-applied.
            log.exception("runbook_tick_failed", run_id=run_id)

    # ------------------------------------------------------------ queries

    def runs(self) -> list[Run]:
        return sorted(self._ledger, key=lambda r: (r.started_at, r.id))

    def run(self, run_id: str = "") -> Run:
        if not run_id:
            if not self._ledger:
                raise NotFound(
                    "no runbook has been run yet, or every run ended before the history"
                    " retention and was archived"
                )
            return self.runs()[-1]
        run = self._ledger.get(run_id)
        if run is None:
            raise UnknownItem(UnknownItem.RUN, run_id)
        return run

    def forget_history(self, before: float) -> int:
        """Drop the runs the store archived (``HistoryCompactor``)."""
        return self._ledger.forget_history(before)

    def book(self, run_id: str) -> Runbook:
        return self._ledger.book(self.run(run_id))

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
        for run in self._ledger:
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
                epoch = await self._ledger.commit(change, [start, pause])
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
                await self._steps.take_over(run, book, request, by, [start])
            self._schedule(run.id)
            return self.run(run.id)

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
                await self._steps.take_over(run, book, request, by, [record])
            elif run.state is RunState.AWAITING_CONFIRMATION:
                if approval_id:
                    raise InvalidInput(f"run {run.id} needs a confirmation, not an approval")
                record = self._plane.audit.record(
                    by,
                    "runbook.advance",
                    target=run.id,
                    detail=f"confirmed wave {run.current_wave + 2}",
                )
                await self._steps.next_wave(run, book, by=by, audit=[record])
            else:
                raise Conflict(f"run {run.id} is {run.state.value}: there is nothing to confirm")
            return self.run(run.id)

    async def abort(self, run_id: str, *, reason: str, by: Principal) -> Run:
        async with self._lock:
            run = self.run(run_id)
            if not run.active:
                raise Conflict(f"run {run.id} already ended: {run.state.value}")
            record = self._plane.audit.record(by, "runbook.abort", target=run.id, reason=reason)
            await self._steps.end(
                run, RunState.ABORTED, f"aborted by {by.name}: {reason}", record, by.name
            )
            return self.run(run.id)


async def _always() -> bool:
    return True


def _utcnow() -> datetime:
    return datetime.now(UTC)
