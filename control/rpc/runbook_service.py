"""Runbooks: the API behind ``killswitch runbook``.

The server parses every runbook itself (the CLI's own check is a courtesy), so a
run never starts from text the server would not accept.
"""

from __future__ import annotations

from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from control.domain.holds import validate_reason
from control.domain.rollout import Run
from control.domain.rollout import Runbook
from control.errors import InvalidInput
from control.governance import Governance
from control.rpc.authz import current_principal
from control.rpc.convert import resume_request_to_pb
from control.rpc.convert import timestamp
from control.rpc.operator_service import Context
from control.rpc.operator_service import required
from control.runbook_file import parse_runbook
from control.runbooks import Plan
from control.runbooks import RunbookRunner
from control.runbooks import next_step
from control.runbooks import runbook_sha256
from control.untrusted import off_loop

SAMPLE_AGENTS = 20


async def _book_from_pb(source: pb.RunbookSource) -> tuple[Runbook, str, str]:
    """The caller's runbook, read off the event loop within ``control.untrusted``'s caps."""
    if not source.text.strip():
        raise InvalidInput("the runbook text is empty")
    file_name = source.file_name.strip()[:200] or "<runbook>"
    return await off_loop(parse_runbook, source.text, file_name), source.text, file_name


def run_to_pb(run: Run, book: Runbook) -> pb.RunbookRun:
    waves = []
    for index, (wave, progress) in enumerate(zip(book.waves, run.waves, strict=True)):
        converged = (
            progress.converged_at - progress.started_at
            if progress.converged_at is not None and progress.started_at is not None
            else 0.0
        )
        waves.append(
            pb.WaveProgress(
                index=index,
                name=wave.name,
                target=wave.describe(),
                state=progress.state.value,
                agents=progress.agents,
                capturing=progress.capturing,
                started_at=timestamp(progress.started_at),
                passed_at=timestamp(progress.passed_at),
                time_to_compliance_seconds=converged,
                gates=[
                    pb.GateResult(name=g.name, passed=g.passed, observed=g.observed, limit=g.limit)
                    for g in progress.gates
                ],
                soak_seconds=wave.soak,
                confirm=wave.confirm,
            )
        )
    paused_in = (
        run.pause_verified_at - run.pause_started_at
        if run.pause_verified_at is not None and run.pause_started_at is not None
        else 0.0
    )
    return pb.RunbookRun(
        id=run.id,
        runbook=run.runbook,
        file_name=run.file_name,
        state=run.state.value,
        hold_id=run.hold_id,
        lifted_hold_id=run.lifted_hold_id,
        approval_id=run.approval_id,
        started_by=run.started_by,
        started_at=timestamp(run.started_at),
        current_wave=run.current_wave,
        waves=waves,
        halt_reason=run.halt_reason,
        ended_at=timestamp(run.ended_at),
        pause_time_to_compliance_seconds=paused_in,
        next_step=next_step(run),
    )


def plan_to_pb(plan: Plan) -> pb.PlanRunbookResponse:
    book = plan.book
    return pb.PlanRunbookResponse(
        runbook=book.name,
        hold_id=plan.hold_id,
        scope=plan.scope.describe(),
        waves=[
            pb.WavePlan(
                index=w.index,
                name=w.name,
                target=w.target,
                agents=len(w.agent_ids),
                sample_agent_ids=w.agent_ids[:SAMPLE_AGENTS],
                held_back=len(w.held_back),
                soak_seconds=w.soak,
                starts_after_seconds=w.starts_after,
                confirm=w.confirm,
            )
            for w in plan.waves
        ],
        min_duration_seconds=book.min_duration(),
        pause_scope=book.pause.scope.describe() if book.pause is not None else "",
    )


class RunbookService(pb_grpc.RunbooksServicer):
    def __init__(self, runner: RunbookRunner, governance: Governance) -> None:
        self._runner = runner
        self._governance = governance

    def _reply(self, run: Run) -> pb.RunbookRunResponse:
        return pb.RunbookRunResponse(run=run_to_pb(run, self._runner.book(run.id)))

    async def PlanRunbook(  # noqa: N802
        self, request: pb.PlanRunbookRequest, context: Context
    ) -> pb.PlanRunbookResponse:
        book, _, _ = await _book_from_pb(request.runbook)
        plan = self._runner.plan(book, hold_id=request.hold_id, approval_id=request.approval_id)
        return plan_to_pb(plan)

    async def StartRunbook(  # noqa: N802
        self, request: pb.StartRunbookRequest, context: Context
    ) -> pb.RunbookRunResponse:
        book, source, file_name = await _book_from_pb(request.runbook)
        run = await self._runner.start_run(
            book,
            source=source,
            file_name=file_name,
            approval_id=request.approval_id.strip(),
            by=current_principal(),
        )
        return self._reply(run)

    async def RequestDrill(  # noqa: N802
        self, request: pb.RequestDrillRequest, context: Context
    ) -> pb.ResumeRequestResponse:
        book, source, _ = await _book_from_pb(request.runbook)
        if book.pause is None:
            raise InvalidInput(
                f"runbook {book.name!r} does not pause: it re-enables, with an approved"
                " `killswitch resume --hold H --for-runbook` request"
            )
        self._runner.check_sources(book)
        drill = await self._governance.request_drill(
            current_principal(),
            runbook=book.name,
            sha256=runbook_sha256(source),
            reason=request.reason,
            ticket=request.ticket,
            expires_in=request.expires_in_seconds,
        )
        return pb.ResumeRequestResponse(request=resume_request_to_pb(drill, drill.created_at))

    async def GetRunbookRun(  # noqa: N802
        self, request: pb.GetRunbookRunRequest, context: Context
    ) -> pb.RunbookRunResponse:
        return self._reply(self._runner.run(request.run_id.strip()))

    async def ListRunbookRuns(  # noqa: N802
        self, request: pb.ListRunbookRunsRequest, context: Context
    ) -> pb.ListRunbookRunsResponse:
        return pb.ListRunbookRunsResponse(
            runs=[run_to_pb(r, self._runner.book(r.id)) for r in self._runner.runs()]
        )

    async def AdvanceRunbook(  # noqa: N802
        self, request: pb.AdvanceRunbookRequest, context: Context
    ) -> pb.RunbookRunResponse:
        run = await self._runner.advance(
            required(request.run_id, "run id"),
            approval_id=request.approval_id.strip(),
            by=current_principal(),
        )
        return self._reply(run)

    async def AbortRunbook(  # noqa: N802
        self, request: pb.AbortRunbookRequest, context: Context
    ) -> pb.RunbookRunResponse:
        run = await self._runner.abort(
            required(request.run_id, "run id"),
            reason=validate_reason(request.reason),
            by=current_principal(),
        )
        return self._reply(run)
