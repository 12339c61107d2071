"""History compaction: finished holds, requests and runs leave the hot path.

Every replica archives, once at start (before it loads its state) and then every
``COMPACT_EVERY_SECONDS``, what finished more than the retention period ago
(``control.domain.history``), one store transaction per batch. Running it on every
replica at once is safe: a row is archived once, whoever gets it (see
``Store.archive_history``). Then each replica forgets the same requests and runs
from memory; archived holds drop out of memory at the next resync, which reads only
hot holds (``HoldCommits.adopt_holds``).

The archive stays in the database, and everything that happened is in the audit
log. Asked by id for something archived, the server says so in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import KW_ONLY
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime
from typing import Protocol

import structlog

from control.domain.approvals import OPEN_STATES
from control.domain.approvals import ResumeState
from control.domain.history import request_closed_at
from control.errors import NotFound
from control.errors import StoreError
from control.errors import UnknownItem
from control.store import ArchivedCounts
from control.store import Store

log = structlog.get_logger("killswitch.history")

COMPACT_EVERY_SECONDS = 600.0
# Rows of each kind per transaction: short enough never to hold up a pause for long.
BATCH_ROWS = 1000

ARCHIVED_HINT = "the audit log has its history (`killswitch audit`)"


class Forgetful(Protocol):
    """What keeps finished history in memory and must drop what was archived."""

    def forget_history(self, before: float) -> int:
        """Drop what finished before ``before`` by ``control.domain.history``'s rule
        (the one the store archives by); returns how many."""


@dataclass(eq=False)
class HistoryCompactor:
    """Archives what finished more than ``retention`` seconds ago, ``batch`` rows of each
    kind per transaction, and has ``holders`` forget it from memory: when asked
    (``compact``), and every ``every`` seconds between ``start`` and ``stop``."""

    store: Store
    holders: Sequence[Forgetful]
    _: KW_ONLY
    clock: Callable[[], float]
    retention: float
    every: float = COMPACT_EVERY_SECONDS
    batch: int = BATCH_ROWS
    _task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    async def compact(self) -> ArchivedCounts:
        """Archive everything due, a batch per transaction, then forget it from memory."""
        now = self.clock()
        before = now - self.retention
        holds = requests = runs = 0
        while True:
            counts = await self.store.archive_history(before, now, self.batch)
            holds, requests, runs = (
                holds + counts.holds,
                requests + counts.requests,
                runs + counts.runs,
            )
            if max(counts.holds, counts.requests, counts.runs) < self.batch:
                break
        forgotten = sum(holder.forget_history(before) for holder in self.holders)
        total = ArchivedCounts(holds, requests, runs)
        if total.total or forgotten:
            log.info(
                "history_archived",
                holds=holds,
                requests=requests,
                runs=runs,
                forgotten=forgotten,
                before=before,
            )
        return total

    async def compact_logged(self) -> None:
        """Compaction is housekeeping: a failure is logged and tried again next time."""
        try:
            await self.compact()
        except StoreError as exc:
            log.warning("history_compaction_failed", error=str(exc))

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="history-compaction")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            await self.compact_logged()


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


async def explain_unknown(store: Store, error: UnknownItem) -> NotFound:
    """What to tell someone who named a hold, request or run this server does not hold:
    when it finished and that it was archived, or else ``error`` as it is."""
    try:
        ended = await _how_it_ended(store, error)
    except StoreError as exc:
        log.warning("archive_lookup_failed", kind=error.kind, error=str(exc))
        return error
    return error if ended is None else NotFound(f"{ended} and archived; {ARCHIVED_HINT}")


async def _how_it_ended(store: Store, error: UnknownItem) -> str | None:
    """When and how the archived item ``error`` names finished; None if it is not archived."""
    item_id = error.item_id
    if error.kind == UnknownItem.HOLD:
        hold = await store.archived_hold(item_id)
        if hold is None or hold.lifted_at is None:
            return None
        lifted = f"lifted on {_when(hold.lifted_at)} by {hold.lifted_by}"
        return f"hold {item_id} was {lifted} (epoch {hold.lifted_epoch})"
    if error.kind == UnknownItem.REQUEST:
        request = await store.archived_request(item_id)
        if request is None:
            return None
        state = ResumeState.EXPIRED if request.state in OPEN_STATES else request.state
        closed = f"{state.value} on {_when(request_closed_at(request))}"
        return f"resume request {item_id} for hold {request.hold_id} was {closed}"
    if error.kind == UnknownItem.RUN:
        run = await store.archived_run(item_id)
        if run is None or run.ended_at is None:
            return None
        return f"run {item_id} ({run.runbook}) ended {run.state.value} on {_when(run.ended_at)}"
    return None
