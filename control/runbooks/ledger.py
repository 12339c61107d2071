"""The runs this server knows, their parsed runbooks, and the one way a step is stored.

Every step, whether a tick's or a command's, goes through ``RunLedger.commit``: it
bumps the run's version (the store refuses a step based on an older one, so two
replicas never both move a run) and commits the step with its hold changes and audit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import structlog

from control.domain.audit import AuditRecord
from control.domain.history import run_archivable
from control.domain.rollout import Run
from control.domain.rollout import Runbook
from control.plane import ControlPlane
from control.runbook_file import parse_runbook
from control.store import RunChange

log = structlog.get_logger("killswitch.runbooks")


class RunLedger:
    def __init__(self, plane: ControlPlane) -> None:
        self._plane = plane
        self._runs: dict[str, Run] = {}
        self._books: dict[str, Runbook] = {}

    def __iter__(self) -> Iterator[Run]:
        return iter(self._runs.values())

    def __bool__(self) -> bool:
        return bool(self._runs)

    def get(self, run_id: str) -> Run | None:
        return self._runs.get(run_id)

    def keep(self, run: Run) -> None:
        """This tick's observations, not worth a commit (see ``RunSteps``)."""
        self._runs[run.id] = run

    def adopt(self, run: Run) -> bool:
        """A step stored by another replica (or this one): True if it is newer than ours."""
        known = self._runs.get(run.id)
        if known is not None and known.version >= run.version:
            return False
        self._runs[run.id] = run
        return True

    def book(self, run: Run) -> Runbook:
        """The run's runbook, parsed once from the text the run stored."""
        book = self._books.get(run.id)
        if book is None:
            book = self._books[run.id] = parse_runbook(run.source, run.file_name)
        return book

    def forget_history(self, before: float) -> int:
        """Drop the runs the store archived (``HistoryCompactor``)."""
        gone = [r.id for r in self._runs.values() if run_archivable(r, before)]
        for run_id in gone:
            del self._runs[run_id]
            self._books.pop(run_id, None)
        return len(gone)

    async def commit(self, change: RunChange, audit: list[AuditRecord]) -> int:
        """Store the step as the run's next version; the epoch it was committed at."""
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
